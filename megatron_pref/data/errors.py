"""Error types of the preference data pipeline."""

from megatron_pref.errors import UserError


class DataError(UserError):
    """A problem with the user's data, files or options.

    ``str(err)`` is one self-contained line (it names the file and line/row
    where that applies); command-line tools print it as ``error: <message>``
    and exit with status 2.
    """


class SkipPair(Exception):
    """A row that is valid but carries no training signal (or cannot fit).

    ``reason`` is one of :data:`SKIP_REASONS`. Skipped pairs are counted and
    reported in a summary; ``--strict`` turns the data-quality reasons
    (``STRICT_REASONS``) into :class:`DataError`.
    """

    def __init__(self, reason: str, message: str = ""):
        super().__init__(message or reason)
        self.reason = reason


SKIP_REASONS = (
    "empty_chosen",
    "empty_rejected",
    "empty_prompt",
    "identical",
    "too_long",
    "identical_after_truncation",
)
# Reasons that --strict turns into errors (they are problems of the data, not
# of the length budget).
STRICT_REASONS = ("empty_chosen", "empty_rejected", "empty_prompt", "identical")
