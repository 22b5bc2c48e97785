import os
import warnings

import pytest
import torch

# Each gloo rank gets one thread: N ranks x all cores thrash a 2-core machine.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)
warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")


# The modules of the core's numbers (losses, log-probs, the pack layout): `pytest -m fast` runs
# their tests, but the ones that start gloo ranks, in seconds.
FAST_MODULES = ("test_losses", "test_logprobs", "test_data_packing")


def pytest_ignore_collect(collection_path, config):
    """Under ``-m fast`` the other modules are not even imported (TRL, transformers: seconds each)."""
    if (config.getoption("markexpr") == "fast" and collection_path.suffix == ".py"
            and collection_path.name.startswith("test_") and collection_path.stem not in FAST_MODULES):
        return True
    return None


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.module.__name__.rsplit(".", 1)[-1] in FAST_MODULES and "distributed" not in item.fixturenames:
            item.add_marker(pytest.mark.fast)
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def distributed():
    """``distributed(fn, world_size, ParallelConfig(...), *args)`` runs fn on gloo ranks.

    Returns the per-rank results. Each rank has megatron-core's parallel state initialised
    and the CPU compatibility layer on.
    """
    from megatron_pref.forked_ranks import run_on_ranks

    return run_on_ranks
