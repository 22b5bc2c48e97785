"""Run a function on N gloo ranks (CPU), each with megatron-core's parallel state set up.

Used by the test-suite's ``distributed`` fixture; the launcher itself lives in
:mod:`megatron_pref.parallel` (tools/verify_conversion.py forks its ranks with it too).
"""

from megatron_pref.parallel import run_on_ranks

__all__ = ["run_on_ranks"]
