"""Statistics, computed where the tensors live: drift of a path against the reference (``drift``), outliers and
massive activations (``outliers``), the smoothing-K effect (``smoothing``), logit and perplexity statistics
(``logits``), and the long-form records they are collected in (``records``)."""
