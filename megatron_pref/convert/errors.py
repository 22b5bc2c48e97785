"""The one exception type the converters raise for bad input or options."""

from megatron_pref import checkpoint_format
from megatron_pref.errors import UserError


class ConversionError(UserError):
    """A problem with the user's input or options, reported as one line (``error: ...``).

    The command-line tools print it to stderr and exit with status 2, without a traceback.
    Every check that can raise it runs before anything is written."""


def read_json_object(path, what: str = "") -> dict:
    """The JSON object in ``path``, or one ConversionError naming the file (unreadable, not
    JSON, or JSON that is not an object). ``what`` prefixes the file in the message."""
    return checkpoint_format.read_json_object(path, what, error=ConversionError)
