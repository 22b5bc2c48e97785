"""CPU/gloo compatibility layer for megatron-core 0.16.1.

megatron-core assumes CUDA in a handful of places that are not about compute. With these
redirected, ``GPTModel`` (local layer spec) runs at TP>1, the 1F1B schedule runs at PP>1, and
DDP + the (non-distributed) optimizer step, all under gloo on CPU. That is what lets CI test
parallel correctness without a GPU, and what lets users run the demo on a laptop.

The redirected touch points:
  1. ``torch.cuda.current_device()`` (global memory buffer, DDP buffers) -> the CPU device;
  2. the CUDA RNG tracker's state get/set and ``torch.cuda.manual_seed``
     (``megatron.core.tensor_parallel.random``) -> the CPU default generator, so that
     ``tracker.fork()`` still swaps the generator that CPU dropout really uses;
  3. ``torch.cuda.synchronize`` in pipeline p2p communication -> no-op;
  4. tensors created with ``device="cuda"`` (pipeline schedules, optimizer, clip_grads) ->
     a ``TorchFunctionMode`` that maps that device to CPU;
  5. the default causal mask built on CUDA: callers pass an explicit mask (see ``model.py``).
Plus gradient clipping, whose megatron-core version asserts ``torch.cuda.FloatTensor`` grads,
and the bf16 and distributed optimizers, which sort parameters by their ``Tensor.type()`` names
(``torch.cuda.FloatTensor`` ...): while they are constructed, CPU tensors report CUDA names.

``enable()`` refuses to run when CUDA is available: on a GPU machine nothing here is active.
"""

from __future__ import annotations

import functools

import torch
from torch.overrides import TorchFunctionMode

_ENABLED = False


def _is_cuda_device(device) -> bool:
    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, torch.device):
        return device.type == "cuda"
    # A bare int device means a CUDA ordinal to torch factory functions.
    return isinstance(device, int) and not isinstance(device, bool)


class _CudaToCpuDeviceMode(TorchFunctionMode):
    """Rewrites ``device=`` arguments that name CUDA to the CPU, for every torch call."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        device = kwargs.get("device")
        if device is not None and _is_cuda_device(device):
            kwargs = dict(kwargs, device="cpu")
        return func(*args, **kwargs)


def _to_cpu_passthrough(tensor_self, *args, **kwargs):
    # Tensor.cuda() -> stays on CPU.
    return tensor_self


def _clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad=False):
    """megatron-core's clip, without its CUDA-type assertion and its fused kernel."""
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff >= 1.0:
        return
    for param in parameters:
        grad = getattr(param, "decoupled_grad", None) if use_decoupled_grad else param.grad
        if grad is not None:
            grad.detach().mul_(clip_coeff)


_ACTIVATION_TAG, _GRADIENT_TAG = 1, 2


def _tagged_p2p_ops(*, tensor_send_prev, tensor_recv_prev, tensor_send_next, tensor_recv_next,
                    group, prev_pipeline_rank, next_pipeline_rank):
    """megatron-core's p2p ops with a tag per direction.

    At PP=2 the previous and next stage are the same rank. NCCL orders the messages by stream,
    but gloo matches same-tag receives from one peer in posting order, so the interleaved
    schedule's paired receives (an activation and a gradient of the same shape) can swap
    silently. Activations (-> next) and gradients (-> prev) get distinct tags.
    """
    dist = torch.distributed
    ops = []
    if tensor_send_prev is not None:
        ops.append(dist.P2POp(dist.isend, tensor_send_prev, prev_pipeline_rank, group, tag=_GRADIENT_TAG))
    if tensor_recv_prev is not None:
        ops.append(dist.P2POp(dist.irecv, tensor_recv_prev, prev_pipeline_rank, group, tag=_ACTIVATION_TAG))
    if tensor_send_next is not None:
        ops.append(dist.P2POp(dist.isend, tensor_send_next, next_pipeline_rank, group, tag=_ACTIVATION_TAG))
    if tensor_recv_next is not None:
        ops.append(dist.P2POp(dist.irecv, tensor_recv_next, next_pipeline_rank, group, tag=_GRADIENT_TAG))
    return dist.batch_isend_irecv(ops) if ops else []


def _with_cuda_type_names(function):
    """``function`` run while ``Tensor.type()`` (no argument) names CPU tensors as CUDA ones."""

    @functools.wraps(function)
    def wrapped(*args, **kwargs):
        real_type = torch.Tensor.type

        def cuda_named_type(tensor, dtype=None, non_blocking=False, **type_kwargs):
            if dtype is not None or type_kwargs:
                return real_type(tensor, dtype, non_blocking, **type_kwargs)
            name = real_type(tensor)
            # Idempotent: with the CUDA->CPU TorchFunctionMode active, real_type re-enters this
            # function (the mode calls the patched attribute), so the name may be renamed already.
            if tensor.device.type == "cpu" and not name.startswith("torch.cuda."):
                return name.replace("torch.", "torch.cuda.", 1)
            return name

        torch.Tensor.type = cuda_named_type
        try:
            return function(*args, **kwargs)
        finally:
            torch.Tensor.type = real_type

    return wrapped


def enable() -> None:
    """Redirect megatron-core's CUDA touch points to the CPU. Idempotent; no-op with CUDA."""
    global _ENABLED
    if _ENABLED:
        return
    if torch.cuda.is_available():
        raise RuntimeError("megatron_pref.cpu.enable() called on a machine with CUDA")

    # megatron-core imports these lazily; import them now so the patches land on the modules.
    from megatron.core.optimizer import clip_grads as mcore_clip_grads
    from megatron.core.optimizer import distrib_optimizer as mcore_distrib_optimizer
    from megatron.core.pipeline_parallel import p2p_communication as mcore_p2p
    from megatron.core.optimizer import optimizer as mcore_optimizer
    from megatron.core.tensor_parallel import random as mcore_random

    cpu = torch.device("cpu")

    # 1. The current device is the CPU.
    torch.cuda.current_device = lambda: cpu
    torch.cuda.set_device = lambda *a, **k: None
    torch.cuda.device_count = lambda: 0

    # 2. "CUDA" RNG == the CPU default generator.
    def get_rng_state(device="cuda", clone=False, graph_safe=False):
        return torch.get_rng_state()

    def set_rng_state(new_state, device=-1, graph_safe=False):
        torch.set_rng_state(new_state)

    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    torch.cuda.set_rng_state = lambda new_state, device="cuda": torch.set_rng_state(new_state)
    # torch.manual_seed itself calls torch.cuda.manual_seed_all: seed the generator directly.
    torch.cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    mcore_random._get_cuda_rng_state = get_rng_state
    mcore_random._set_cuda_rng_state = set_rng_state

    # 3. Nothing to synchronise; and gloo needs the p2p directions told apart by tags.
    torch.cuda.synchronize = lambda *a, **k: None
    mcore_p2p._batched_p2p_ops = _tagged_p2p_ops
    mcore_p2p._p2p_ops = _tagged_p2p_ops

    # 4. device="cuda" -> CPU, and Tensor.cuda() stays put.
    _CudaToCpuDeviceMode().__enter__()
    torch.Tensor.cuda = _to_cpu_passthrough

    # Clipping without the CUDA assertion.
    mcore_clip_grads.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm_fp32
    mcore_optimizer.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm_fp32
    # The mixed-precision and distributed optimizers sort parameters by CUDA type names while
    # they are built.
    for optimizer_class in (mcore_optimizer.Float16OptimizerWithFloat16Params,
                            mcore_distrib_optimizer.DistributedOptimizer):
        optimizer_class.__init__ = _with_cuda_type_names(optimizer_class.__init__)

    _ENABLED = True


def enable_if_no_cuda() -> bool:
    """Enable the CPU layer when there is no GPU; returns True if CPU mode is on."""
    if torch.cuda.is_available():
        return False
    enable()
    return True


@functools.cache
def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"
