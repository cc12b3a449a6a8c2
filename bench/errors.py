"""User-facing errors: the CLI prints these as one line and exits non-zero."""


class SpecError(ValueError):
    """Bad user input (a name, an option, a step count...). The message is one line that names
    what is wrong and what is valid."""


class SkipCell(Exception):
    """Raised by an estimator or task when a cell cannot be computed by design (not a failure);
    `fields` go into the skip row beside its reason."""

    def __init__(self, reason: str = "", fields: dict | None = None) -> None:
        super().__init__(reason)
        self.fields = fields or {}


class Diverged(Exception):
    """Raised when a gradient, a loss or an estimator's own reconstruction is no longer finite or
    no longer trustworthy: the cell's row says `diverged` with this message."""


def exception_text(exc: BaseException) -> str:
    """str(exc), or a stand-in where a plug-in's exception cannot say what it is (its __str__
    raises): a failure is reported even then."""
    try:
        return str(exc)
    except BaseException:
        try:
            return repr(exc)
        except BaseException:
            return f"<{type(exc).__name__}: its str() raised>"
