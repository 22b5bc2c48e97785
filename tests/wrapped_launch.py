"""Run a script (``python tests/wrapped_launch.py SCRIPT ARGS...``, or under torchrun) on a
node that the environment describes, for tests of what users see:

* ``TEST_SLEEP_RANK_<N>=S``: rank N starts S seconds late (forces the order in which ranks fail);
* ``TEST_GPUS=N``: torch reports N CUDA devices (and gloo stays the backend), so that ranks
  from N on have no GPU;
* ``TEST_BLOCK_MODULES=a,b``: importing (or looking for) these packages fails as if they were
  not installed;
* ``TEST_NO_ONE_LINE_STOPS=1``: pretrain_pref runs without megatron_pref.stopping.one_line_stops
  (the negative control of tests/test_stopping.py).
"""

import importlib.abc
import os
import runpy
import sys
import time


class BlockModules(importlib.abc.MetaPathFinder):
    """A finder in front of all others: the blocked packages (and their submodules) are absent."""

    def __init__(self, names):
        self.names = set(names)

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in self.names:
            raise ModuleNotFoundError(f"No module named {fullname!r}", name=fullname)
        return None


def main() -> None:
    script = os.path.abspath(sys.argv[1])
    sys.argv = sys.argv[1:]
    sys.path[0] = os.path.dirname(script)  # as `python SCRIPT` has it
    time.sleep(float(os.environ.get("TEST_SLEEP_RANK_" + os.environ.get("RANK", "0"), "0")))
    blocked = [m for m in os.environ.get("TEST_BLOCK_MODULES", "").split(",") if m]
    if blocked:
        sys.meta_path.insert(0, BlockModules(blocked))
    if os.environ.get("TEST_GPUS"):
        import torch

        from megatron_pref import cpu

        gpus = int(os.environ["TEST_GPUS"])
        torch.cuda.is_available = lambda: True
        torch.cuda.device_count = lambda: gpus
        torch.cuda.set_device = lambda device: None
        cpu.default_backend = lambda: "gloo"
    if os.environ.get("TEST_NO_ONE_LINE_STOPS"):
        import contextlib

        from megatron_pref import stopping

        stopping.one_line_stops = lambda run: contextlib.nullcontext()
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
