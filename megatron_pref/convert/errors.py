"""The one exception type the converters raise for bad input or options."""

import json
from pathlib import Path

from megatron_pref.errors import UserError


class ConversionError(UserError, ValueError):
    """A problem with the user's input or options, reported as one line (``error: ...``).

    The command-line tools print it to stderr and exit with status 2, without a traceback.
    Every check that can raise it runs before anything is written. Still also a ``ValueError``
    while checkpointing.py reads checkpoints through convert/ and catches it as one (issue 12
    item 2 gives the checkpoint format its own error type); no entry point reports a plain
    ValueError as bad input.
    """


def read_json_object(path, what: str = "") -> dict:
    """The JSON object in ``path``, or one ConversionError naming the file (unreadable, not
    JSON, or JSON that is not an object). ``what`` prefixes the file in the message."""
    label = f"{what} {path}" if what else str(path)
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ConversionError(f"cannot parse {label}: {exc}") from None
    if not isinstance(value, dict):
        raise ConversionError(f"{label} is not a JSON object (got {type(value).__name__})")
    return value
