"""One type for bad input.

Flags, data, checkpoints and conversion each raise a subclass of :class:`UserError`. The entry
points (``pretrain_pref.py`` and every tool) turn exactly these into one ``error: ...`` line;
any other exception is a bug in megatron-pref and keeps its traceback.
"""


class UserError(Exception):
    """Bad input from the user: a flag, a file, the data or a checkpoint.

    Its message is the whole report: one line that names the flag or file at fault."""
