"""The stages as library functions, each what one command runs: ``capture.run_capture``,
``evaluate.run_evaluate``, ``throughput.run_throughput``. ``tap`` is the capture's per-attention-call logic."""
