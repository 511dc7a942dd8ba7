"""Statistics, computed where the tensors live: drift of a path against the reference and outlier statistics, in one
pass per site (``fused``), the residual stream's massive activations (``outliers``), the smoothing-K effect
(``smoothing``), logit and perplexity statistics (``logits``), and the long-form records they are collected in
(``records``)."""
