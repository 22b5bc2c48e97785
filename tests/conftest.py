import os
import warnings

import pytest
import torch

# Each gloo rank gets one thread: N ranks x all cores thrash a 2-core machine.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)
warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs CUDA (and Transformer Engine); skipped on CPU")
    config.addinivalue_line("markers", "slow: end-to-end runs of more than a few seconds")


def pytest_collection_modifyitems(config, items):
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
