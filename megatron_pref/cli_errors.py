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
* :func:`report_error` -- the one line under ``torchrun``, where every rank may fail: an error
  that every rank finds alike is printed once; any other as ``[rank N] error: ...`` by the rank
  that fails.
* :func:`refuse_torchrun` -- one-process tools refuse a ``torchrun`` launch in one line, before
  importing torch.
* :func:`missing_dependency` -- the one line for an optional package that a flag needs and that
  is not installed (:data:`OPTIONAL_PACKAGES` says which pip install brings it).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import sys
import tempfile
import time
from typing import NoReturn, Optional

EXIT_BAD_INPUT = 2


def exit_with_error(message: str, status: int = EXIT_BAD_INPUT) -> NoReturn:
    """Print ``error: <message>`` (one line) to stderr and exit with ``status`` (default 2).

    Under ``torchrun`` the message is taken to be the same on every rank: it is printed once."""
    sys.exit(report_error(message, status=status))


# --------------------------------------------------------------------------- several ranks

def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ


def _world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def report_error(message, label: str = "error", status: int = EXIT_BAD_INPUT,
                 same_on_every_rank: Optional[bool] = None) -> int:
    """Print ``<label>: <message>`` as one line on stderr; returns ``status`` (to exit with).

    Under ``torchrun`` (or any launcher that sets ``WORLD_SIZE`` > 1) every rank that fails calls
    this, and torchrun stops the other ranks as soon as the first one exits, so the line must
    come from the rank that fails, whichever exits first:

    * ``same_on_every_rank`` (bad flags, files, configurations found before any process group
      exists: every rank checks the same inputs the same way): printed once, by the first rank of
      this node to get here (:func:`print_once_on_this_node`);
    * otherwise (found by some ranks, e.g. after the process groups exist): every failing rank
      prints its own line, ``[rank N] <label>: <message>``.

    ``same_on_every_rank=None``: True until this process starts its process groups
    (``megatron_pref.parallel.initialize``), False from then on.
    """
    if same_on_every_rank is None:
        parallel = sys.modules.get("megatron_pref.parallel")
        same_on_every_rank = parallel is None or not parallel.initialization_started()
    line = f"{label}: {' '.join(str(message).splitlines())}"
    if _world_size() > 1 and not same_on_every_rank:
        print(f"[rank {os.environ.get('RANK', '?')}] {line}", file=sys.stderr, flush=True)
    else:
        print_once_on_this_node(line)
    return status


def _launch_id() -> str:
    """An id that the ranks one launcher started on this node share, and no other launch has:
    the launcher's process id and start time (torchrun's agent, srun's step daemon are the
    ranks' parent), the rendezvous port (one process may launch several groups of ranks, as
    forked_ranks.run_on_ranks does) and torchrun's restart count."""
    parent = os.getppid()
    try:
        with open(f"/proc/{parent}/stat") as stat:
            started = stat.read().rsplit(")", 1)[1].split()[19]  # field 22: start time since boot
    except (OSError, IndexError):
        started = "0"
    return (f"{parent}-{started}-{os.environ.get('MASTER_PORT', '')}-"
            f"{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}")


def print_once_on_this_node(line: str) -> None:
    """Print ``line`` on stderr once among the ranks of this launch on this node.

    The first rank to get here prints it; the others find its digest in a file of this launch
    (in the temporary directory) and print nothing. The file is locked while the line is
    printed, so no rank can exit (and make torchrun stop the printing one) before the line is
    out. Without a launcher (one process) the line is simply printed."""
    if _world_size() <= 1:
        print(line, file=sys.stderr, flush=True)
        return
    try:
        import fcntl

        directory = os.path.join(tempfile.gettempdir(), f"megatron_pref-errors-{os.getuid()}")
        os.makedirs(directory, exist_ok=True)
        _remove_old_files(directory)
        digest = hashlib.sha256(line.encode()).hexdigest()[:32]
        with open(os.path.join(directory, _launch_id()), "a+") as record:
            fcntl.flock(record, fcntl.LOCK_EX)  # released when the file is closed
            record.seek(0)
            if digest in record.read().split():
                return
            print(line, file=sys.stderr, flush=True)
            record.write(digest + "\n")
            record.flush()
    except OSError:  # no usable temporary directory: better on every rank than on none
        print(line, file=sys.stderr, flush=True)


def _remove_old_files(directory: str, max_age_s: float = 86400.0) -> None:
    now = time.time()
    for entry in os.scandir(directory):
        try:
            if now - entry.stat().st_mtime > max_age_s:
                os.unlink(entry.path)
        except OSError:
            pass


def refuse_torchrun(tool: str, why: str) -> None:
    """Exit with one line when ``torchrun`` started this one-process tool.

    Every rank would run the whole tool (and write the same outputs), and torchrun's rendezvous
    settings make its own process group wait forever; called before torch is imported, so the
    refusal takes a fraction of a second."""
    if launched_by_torchrun():
        exit_with_error(f"{tool} runs as one process ({why}): start it with python, not torchrun")


# --------------------------------------------------------------------------- optional packages

# The optional packages that some flag needs: import name -> what installs it.
OPTIONAL_PACKAGES = {
    "tensorboard": "pip install -e '.[logging]'",
    "wandb": "pip install -e '.[logging]'",
    "pyarrow": "pip install pyarrow",
    "transformers": "pip install transformers",
    "transformer_engine": "pip install -e '.[gpu]', or use the Docker image",
}


def missing_dependency(flag: str, package: str) -> Optional[str]:
    """The one line ``<flag> needs <package> (<pip install>)`` when ``package`` (a key of
    :data:`OPTIONAL_PACKAGES`) is not installed, else None. Looks for the package without
    importing it (milliseconds)."""
    try:
        found = importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):
        found = False
    if found:
        return None
    return f"{flag} needs {package} ({OPTIONAL_PACKAGES[package]})"


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
