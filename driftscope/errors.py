"""User-facing errors: each is one sentence naming the bad value and what would be accepted.

Every error a user can cause derives from `DriftscopeError` (the store's errors included); `driftscope.cli.run`
turns any of them into that sentence on stderr and exit code 2, never a traceback. A message may end with advice
to pass `--resume` (`resume_advice`): `cli.run` leaves it out for a command that has no `--resume`.
"""


class DriftscopeError(Exception):
    """Bad input or an unusable environment, explained in one line."""

    def __init__(self, *args, resume_advice: str = ""):
        if resume_advice and args:
            args = (f"{args[0]}{resume_advice}", *args[1:])
        super().__init__(*args)
        self.resume_advice = resume_advice

    def one_line(self, resumable: bool = True) -> str:
        """The message as one line; without its `--resume` advice unless `resumable`."""
        text = str(self).strip()
        advice = self.resume_advice.strip()
        if not resumable and advice and text.endswith(advice):
            text = text[: -len(advice)].rstrip(" ;,")
        return text.splitlines()[0] if text else type(self).__name__


class UnknownModelError(DriftscopeError, ValueError):
    pass


class ModelUnavailableError(DriftscopeError):
    pass


class CorpusError(DriftscopeError, ValueError):
    pass


class ConfigError(DriftscopeError, ValueError):
    pass


class UnsupportedModelError(DriftscopeError, TypeError):
    """A model whose structure driftscope cannot instrument (no decoder `layers`)."""


class DeviceError(DriftscopeError, ValueError):
    """A device, device map or sage implementation this machine cannot provide."""


class OutputError(DriftscopeError):
    """An output that cannot be written: a directory where a file is due (or the reverse), a read-only place."""


class OutputExistsError(OutputError):
    """An existing output that may not be replaced without --overwrite."""
