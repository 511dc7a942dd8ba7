"""The only code in driftscope that knows transformers' internals (installed as `driftscope.hooks`).

- `attention`: driftscope's paths as AttentionInterface functions; scoped registration and model switching.
- `layers`: `instrumented()`, every attention call and decoder-layer output of a model to plain callbacks.
- `decode`: the forward, greedy and teacher-forced decode loops and the KV cache, across transformers versions.
"""
