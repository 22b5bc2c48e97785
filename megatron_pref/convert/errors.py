"""The one exception type the converters raise for bad input or options."""

from megatron_pref.errors import UserError

from megatron_pref.errors import UserError

class ConversionError(UserError):
    """A problem with the user's input or options, reported as one line (``error: ...``).

    The command-line tools print it to stderr and exit with status 2, without a traceback.
    Every check that can raise it runs before anything is written."""


def read_json_object(path, what: str = "") -> dict:
    """The JSON object in ``path``, or one ConversionError naming the file (unreadable, not
    JSON, or JSON that is not an object). ``what`` prefixes the file in the message."""
    # Imported here: the tools import this module before torch (see cli_errors.refuse_torchrun).
    from megatron_pref.checkpoint_format import read_json_object as read

    return read(path, what, error=ConversionError)
