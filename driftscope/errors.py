"""User-facing errors: each is one sentence naming the bad value and what would be accepted.

The CLIs turn any `DriftscopeError` into that sentence on stderr and exit code 2, never a traceback.
"""


class DriftscopeError(Exception):
    """Bad input or an unusable environment, explained in one line."""


class UnknownModelError(DriftscopeError, ValueError):
    pass


class ModelUnavailableError(DriftscopeError):
    pass


class CorpusError(DriftscopeError, ValueError):
    pass


class ConfigError(DriftscopeError, ValueError):
    pass
