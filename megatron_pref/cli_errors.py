"""One-line errors for the command-line tools.

Project rule: every bad user input (a flag, a file, a checkpoint) is reported as exactly one
line on stderr that starts with ``error:``, with exit status 2 and no traceback, and is
detected before any expensive work where possible.

* :class:`OneLineArgumentParser` -- an ``argparse.ArgumentParser`` whose parse errors
  (unknown flag, missing required flag, bad ``type=``/``choices=`` value) are that one line
  instead of argparse's usage dump plus ``prog: error: ...``.
* :func:`exit_with_error` -- print ``error: <message>`` and exit with status 2, for checks the
  tool makes after parsing.
* :func:`check_output_file` / :func:`check_output_dir` -- "can this output location be
  written?" checks that return a one-line problem (or None) before any work is done.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from typing import NoReturn, Optional

EXIT_BAD_INPUT = 2


def exit_with_error(message: str, status: int = EXIT_BAD_INPUT) -> NoReturn:
    """Print ``error: <message>`` (one line) to stderr and exit with ``status`` (default 2)."""
    message = " ".join(str(message).split("\n"))
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(status)


class OneLineArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` that reports a parse error as one line ``error: ... (see --help)``
    on stderr and exits with status 2 (argparse prints the usage and ``prog: error: ...``).

    ``--help`` is unchanged. Use it as a drop-in replacement::

        p = OneLineArgumentParser(prog="tool.py", description=...)
        args = p.parse_args(argv)       # bad flags: one line, exit 2
        if args.steps < 1:
            p.error(f"--steps must be >= 1, got {args.steps}")   # same format for own checks
    """

    def __init__(self, *args, error_type: Optional[type] = None, **kwargs):
        # error_type: raise it with the one-line message instead of exiting, for callers that
        # parse in-process and report errors their own way (pretrain_pref, the preprocessor).
        super().__init__(*args, **kwargs)
        self.error_type = error_type

    def error(self, message: str) -> NoReturn:  # overrides argparse's usage + message
        if self.error_type is not None:
            raise self.error_type(f"{message} (see --help)")
        exit_with_error(f"{message} (see --help)")


def nearest_existing_path(path: str) -> str:
    """``path`` itself if it exists, else its nearest ancestor that does (absolute)."""
    path = os.path.abspath(path)
    while not os.path.lexists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def writable_dir_problem(directory: str, flag: str, target: Optional[str] = None) -> Optional[str]:
    """Why files cannot be created in ``directory`` (created first if missing), or None.

    The one-line message names ``flag`` and ``target`` (default ``directory``), the path the
    user gave. A probe file is created and removed in ``directory``'s nearest existing
    ancestor; nothing else is written.
    """
    target = directory if target is None else target
    base = nearest_existing_path(directory)
    if not os.path.isdir(base):
        return f"{flag} {target}: {base} is not a directory"
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=base)
    except OSError as exc:
        return f"{flag} {target}: cannot write in {base}: {exc.strerror or type(exc).__name__}"
    os.close(fd)
    os.unlink(probe)
    return None


def check_output_dir(path: str, flag: str) -> Optional[str]:
    """Why ``path`` cannot be used as an output directory (one line naming ``flag``), or None.

    ``path`` may exist (it must then be a writable directory) or not (its nearest existing
    ancestor must then be a writable directory, so that it can be created).
    """
    if os.path.lexists(path) and not os.path.isdir(path):
        return f"{flag} {path}: exists and is not a directory"
    return writable_dir_problem(path, flag)


def check_output_file(path: str, flag: str) -> Optional[str]:
    """Why ``path`` cannot be written as an output file (one line naming ``flag``), or None.

    ``path`` must not be a directory; its directory must be writable or creatable.
    """
    if not path:
        return f"{flag}: empty path"
    if os.path.isdir(path):
        return f"{flag} {path}: is a directory (give a file path)"
    return writable_dir_problem(os.path.dirname(os.path.abspath(path)), flag, target=path)
