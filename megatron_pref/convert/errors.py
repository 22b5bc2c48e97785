"""The one exception type the converters raise for bad input or options."""


class ConversionError(ValueError):
    """A problem with the user's input or options, reported as one line (``error: ...``).

    The command-line tools print it to stderr and exit with status 2, without a traceback.
    Every check that can raise it runs before anything is written. It is a ``ValueError`` so
    callers that treat bad configuration generically (training's ``--load``) catch it too.
    """
