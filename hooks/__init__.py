"""The capture layer: the only code in driftscope that knows transformers' internals."""
