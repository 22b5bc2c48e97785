"""The optimizer step's numbers through ``train()`` at every parallel layout (issue 11):

1. the global gradient norm and clipping: the pre-clip norm, and the weights after clipped
   steps, equal the single-rank run at TP2, PP2, TP2xPP2, PP2xVPP2 and DP2, with and without
   the distributed optimizer. The model is built as ``train()`` builds it
   (``perform_initialization=False``), which left tensor-parallel weights unmarked;
2. ``--skip-nonfinite-batches``: a non-finite gradient on one rank leaves every rank's weights
   and Adam moments bit-identical and the LR schedule where it was.

Ranks are forked from this process: ``warm_imports`` loads megatron-core here once, so each
rank starts in about a second instead of importing it again.
"""

import json
import math

import numpy as np
import pytest
import torch

from megatron_pref.arguments import parse_run_config
from megatron_pref.model import ModelConfig, ParallelConfig, PrecisionConfig, unwrap_model
from tests.test_training import MODEL_FLAGS, _demo_subset

# Adam with epsilon 1 and a large LR is close to SGD on the clipped gradient, so a clipping
# coefficient that is off shows in the weights (Adam with a tiny epsilon is nearly invariant to
# the gradient's scale). --clip-grad 0.05 is far below the norms (about 2): every step clips.
STEP_FLAGS = ["--loss", "sft", "--train-iters", "3", "--clip-grad", "0.05", "--adam-eps", "1", "--lr", "1",
              "--lr-decay-style", "constant", "--log-interval", "1"]
LAYOUTS = {
    "tp2": (2, ["--tensor-model-parallel-size", "2"]),
    "pp2": (2, ["--pipeline-model-parallel-size", "2"]),
    "tp2pp2": (4, ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"]),
    "pp2vpp2": (2, ["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1"]),
    "dp2": (2, []),
}
OPTIMIZERS = {"ddp": [], "distributed-optimizer": ["--use-distributed-optimizer"]}


@pytest.fixture(scope="module")
def warm_imports():
    import megatron.core.dist_checkpointing  # noqa: F401
    import megatron.core.distributed  # noqa: F401
    import megatron.core.models.gpt  # noqa: F401
    import megatron.core.optimizer  # noqa: F401
    import megatron.core.optimizer_param_scheduler  # noqa: F401
    import megatron.core.pipeline_parallel  # noqa: F401

    import megatron_pref.training  # noqa: F401


@pytest.fixture(scope="module")
def flags(tmp_path_factory, warm_imports):
    """32 demo pairs, no held-out split (no evaluation), the tiny model of test_training
    (tied embeddings: the last stage's output weight is a shared copy at PP > 1)."""
    from megatron_pref.data import demo_task

    directory = tmp_path_factory.mktemp("numerics")
    return ["--data-path", _demo_subset(directory, "train.jsonl", 32), "--tokenizer-type", "SentencePieceTokenizer",
            "--tokenizer-model", demo_task.demo_tokenizer_path()] + MODEL_FLAGS


def _sharded_weights(model_chunks) -> list:
    """(key, global shape, global offset, values) of this rank's slice of every weight, from the
    sharded state dict that checkpoints use (its keys and offsets are layout-independent)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    out = []

    def visit(item):
        if isinstance(item, ShardedTensorFactory):
            built = item.build()
            for sub in built if isinstance(built, (list, tuple)) else [built]:
                visit(sub)
        elif isinstance(item, ShardedTensor):
            local_shape = (1,) * item.prepend_axis_num + tuple(item.data.shape)
            out.append((item.key, tuple(item.global_shape), tuple(item.global_offset),
                        item.data.detach().reshape(local_shape).double().numpy().copy()))
        elif isinstance(item, dict):
            for value in item.values():
                visit(value)
        elif isinstance(item, (list, tuple)):
            for value in item:
                visit(value)

    for chunk in model_chunks:
        visit(unwrap_model(chunk).sharded_state_dict())
    return out


def _train_and_collect(argv, unmarked_build=False):
    """train(argv) on this rank; returns this rank's slices of the final weights.

    ``unmarked_build``: the negative control, the model built as before the fix (initialisation
    off, tensor-parallel weights left unmarked)."""
    from megatron_pref import model, training

    captured = {}
    digest = training.weights_digest

    def capture(chunks):  # train() digests its final weights: take them there (a forked rank)
        captured["chunks"] = chunks
        return digest(chunks)

    training.weights_digest = capture
    if unmarked_build:
        model.mark_tensor_parallel_weights = lambda gpt: None
    training.train(parse_run_config(argv))
    return _sharded_weights(captured["chunks"])


def _assemble(per_rank: list) -> dict:
    """Full weights from every rank's slices (replicas overwrite each other with equal values)."""
    full = {}
    for rank in per_rank:
        for key, shape, offset, values in rank:
            target = full.setdefault(key, np.full(shape, np.nan))
            target[tuple(slice(o, o + s) for o, s in zip(offset, values.shape))] = values
    for key, values in full.items():
        assert not np.isnan(values).any(), f"{key}: not every slice was collected"
    return full


def _run(run_on_ranks, world, argv, metrics_file, unmarked_build=False):
    """train() on ``world`` ranks: the logged pre-clip gradient norms and the full final weights."""
    per_rank = run_on_ranks(_train_and_collect, world, ParallelConfig(), argv + ["--metrics-file", str(metrics_file)],
                            unmarked_build, init_parallel=False)
    steps = [json.loads(line) for line in metrics_file.read_text().splitlines() if '"grad_norm"' in line]
    return [s["grad_norm"] for s in steps], _assemble(per_rank)


@pytest.fixture(scope="module")
def single_rank(flags, tmp_path_factory):
    """The reference: the same 3 clipped steps on one rank."""
    from megatron_pref.forked_ranks import run_on_ranks

    return _run(run_on_ranks, 1, flags + STEP_FLAGS, tmp_path_factory.mktemp("tp1") / "metrics.jsonl")


def _max_weight_gap(got: dict, want: dict) -> float:
    """Largest difference of any weight; vocabulary rows are compared up to the smaller padding
    (padded to a multiple of 16 x TP, the rows past the true vocabulary are never used)."""
    assert got.keys() == want.keys()
    gaps = []
    for key, value in want.items():
        rows = min(value.shape[0], got[key].shape[0])
        assert got[key].shape[1:] == value.shape[1:] and (rows == value.shape[0] or "word_embeddings" in key), key
        gaps.append(float(np.abs(got[key][:rows] - value[:rows]).max()))
    return max(gaps)


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_grad_norm_and_clipped_weights_match_one_rank(distributed, tmp_path, flags, single_rank, layout, optimizer):
    want_norms, want_weights = single_rank
    world, layout_flags = LAYOUTS[layout]
    norms, weights = _run(distributed, world, flags + STEP_FLAGS + layout_flags + OPTIMIZERS[optimizer],
                          tmp_path / "metrics.jsonl")
    assert len(norms) == 3 and min(want_norms) > 20 * 0.05  # every step clipped
    assert norms == pytest.approx(want_norms, rel=1e-6, abs=0)
    assert _max_weight_gap(weights, want_weights) <= 1e-6


def test_unmarked_tensor_parallel_weights_give_another_norm(distributed, tmp_path, flags, single_rank):
    """Negative control: built as before (initialisation off, weights unmarked), TP rank 1's
    shards leave the norm, and clipping scales by the wrong norm."""
    want_norms, want_weights = single_rank
    norms, weights = _run(distributed, 2, flags + STEP_FLAGS + LAYOUTS["tp2"][1], tmp_path / "metrics.jsonl",
                          unmarked_build=True)
    assert norms[0] < want_norms[0] * 0.99
    # Control for the tolerance above: the clipped steps moved the weights by far more.
    assert _max_weight_gap(weights, want_weights) > 1e-4


def _parallel_attributes(model_cfg, perform_initialization: bool) -> dict:
    from megatron_pref.engine import build_model_chunks

    (chunk,) = build_model_chunks(model_cfg, ParallelConfig(tensor_model_parallel_size=2), PrecisionConfig(),
                                  perform_initialization=perform_initialization)
    names = ("tensor_model_parallel", "partition_dim", "partition_stride", "sequence_parallel", "shared", "allreduce")
    return {name: {a: getattr(p, a, None) for a in names} for name, p in unwrap_model(chunk).named_parameters()}


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_uninitialised_build_marks_parameters_as_an_initialised_one(distributed, warm_imports, tied):
    """Every parameter of a model built without initialisation (train(), the reference, the
    converters) carries the attributes megatron-core gives an initialised one: TP2, local spec."""
    model_cfg = ModelConfig(vocab_size=300, num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64,
                            swiglu=True, untie_embeddings_and_output_weights=not tied)
    for rank in distributed(lambda: (_parallel_attributes(model_cfg, False), _parallel_attributes(model_cfg, True)),
                            2, ParallelConfig(tensor_model_parallel_size=2)):
        uninitialised, initialised = rank
        assert uninitialised == initialised
        marked = {name for name, attrs in uninitialised.items() if attrs["tensor_model_parallel"]}
        assert "embedding.word_embeddings.weight" in marked and "decoder.layers.0.mlp.linear_fc1.weight" in marked
        assert ("output_layer.weight" in marked) == (not tied)
        assert uninitialised["decoder.layers.0.mlp.linear_fc1.weight"]["partition_stride"] == 2  # SwiGLU's [gate, up]
        assert not uninitialised["decoder.final_layernorm.weight"]["tensor_model_parallel"]  # replicated: counted once


# ----------------------------------------------------------------------------------------------
# --skip-nonfinite-batches
# ----------------------------------------------------------------------------------------------
POISONED_STEP = 2
SKIP_FLAGS = ["--loss", "sft", "--train-iters", "3", "--log-interval", "1"]


def _state(model_chunks, optimizer) -> dict:
    """This rank's weights and optimizer state (Adam moments, step counts, main parameters)."""
    state = {f"weight/{i}/{name}": p.detach().clone().numpy()
             for i, chunk in enumerate(model_chunks) for name, p in unwrap_model(chunk).named_parameters()}
    for i, sub in enumerate(getattr(optimizer, "chained_optimizers", [optimizer])):
        params = [p for group in sub.optimizer.param_groups for p in group["params"]]
        for j, param in enumerate(params):
            state[f"main/{i}/{j}"] = param.detach().clone().numpy()
            for key, value in sub.optimizer.state.get(param, {}).items():
                state[f"adam/{i}/{j}/{key}"] = torch.as_tensor(value).detach().clone().numpy()
    return state


def _train_with_a_nonfinite_gradient(argv, poisoned_rank, poisoned_param, legacy_step=False):
    """train(argv) with inf in the first row of ``poisoned_param``'s gradient on ``poisoned_rank``
    at step 2 (the loss stays finite); returns this rank's state before and after that step and
    after step 3, the LR scheduler's step count, and the error if the run stopped.

    ``legacy_step``: the negative control, megatron-core's ``optimizer.step()`` as train_step
    called it before the fix (the norm checked after the update)."""
    import os

    from megatron_pref import engine, training

    rank = int(os.environ["RANK"])
    record, schedulers = {}, []
    build_scheduler, train_step = training.build_scheduler, training.train_step

    def keep_scheduler(*args, **kwargs):
        schedulers.append(build_scheduler(*args, **kwargs))
        return schedulers[-1]

    def poisoned_train_step(model_chunks, optimizer, micro, forward_step, names, iteration, skip):
        handles = []
        if iteration == POISONED_STEP:
            record["before"] = _state(model_chunks, optimizer)
            if rank == poisoned_rank:
                param = dict(unwrap_model(model_chunks[-1]).named_parameters())[poisoned_param]
                handles.append(param.register_hook(lambda grad: grad.index_put((torch.tensor([0]),),
                                                                               torch.tensor(float("inf")))))
        try:
            result = train_step(model_chunks, optimizer, micro, forward_step, names, iteration, skip)
        except engine.NonFiniteLoss as exc:
            record["error"], record["after"] = str(exc), _state(model_chunks, optimizer)
            raise
        finally:
            for handle in handles:
                handle.remove()
        record[{POISONED_STEP: "after"}.get(iteration, f"step{iteration}")] = _state(model_chunks, optimizer)
        record.setdefault("skipped", {})[iteration] = result.skipped
        return result

    training.build_scheduler, training.train_step = keep_scheduler, poisoned_train_step
    if legacy_step:
        def step(optimizer):
            update_successful, grad_norm, _ = optimizer.step()
            return update_successful, grad_norm

        engine.step_if_finite = step
    try:
        training.train(parse_run_config(argv))
    except engine.NonFiniteLoss:
        pass
    record["scheduler_steps"] = schedulers[0].num_steps
    return record


def _bit_identical(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)  # NaN != NaN


EMBEDDING, FINAL_NORM = "embedding.word_embeddings.weight", "decoder.final_layernorm.weight"


@pytest.mark.parametrize("poisoned_rank,poisoned_param,extra", [
    pytest.param(1, EMBEDDING, [], id="dp2-rank1"),
    pytest.param(1, EMBEDDING, ["--use-distributed-optimizer"], id="dp2-distributed-optimizer-rank1"),
    pytest.param(0, EMBEDDING, ["--pipeline-model-parallel-size", "2"], id="pp2-first-stage"),
    # A replicated weight's copy on TP rank 1: the gradient norm leaves it out as a duplicate.
    pytest.param(1, FINAL_NORM, ["--tensor-model-parallel-size", "2"], id="tp2-rank1-replicated-norm"),
])
def test_nonfinite_gradient_on_one_rank_skips_the_update_everywhere(distributed, tmp_path, flags, poisoned_rank,
                                                                    poisoned_param, extra):
    """An inf in a gradient on one rank at step 2 (finite loss): with --skip-nonfinite-batches
    no rank changes a weight or an Adam moment, the LR schedule does not advance, the batch is
    logged as skipped, and step 3 trains again."""
    metrics = tmp_path / "metrics.jsonl"
    argv = flags + SKIP_FLAGS + extra + ["--skip-nonfinite-batches", "--metrics-file", str(metrics)]
    ranks = distributed(_train_with_a_nonfinite_gradient, 2, ParallelConfig(), argv, poisoned_rank, poisoned_param,
                        init_parallel=False)
    for rank in ranks:
        assert rank["skipped"] == {1: False, 2: True, 3: False}
        assert any(k.startswith("adam/") for k in rank["before"])  # moments exist after step 1
        assert _bit_identical(rank["after"], rank["before"])
        assert rank["scheduler_steps"] == 2  # steps 1 and 3
        moved = [k for k in rank["after"] if not np.array_equal(rank["step3"][k], rank["after"][k])]
        assert moved and all(np.isfinite(v).all() for v in rank["step3"].values())
    logged = [json.loads(line) for line in metrics.read_text().splitlines() if '"skipped"' in line]
    assert [(s["iteration"], s["skipped"]) for s in logged] == [(1, 0.0), (2, 1.0), (3, 0.0)]
    # The norm sees the inf, except in a duplicate copy (the norm counts TP rank 0's copy only).
    assert math.isfinite(logged[1]["grad_norm"]) == (poisoned_param == FINAL_NORM)


def test_nonfinite_gradient_was_applied_by_the_old_step(distributed, flags):
    """Negative control: megatron-core's optimizer.step() (fp32, no grad scaler) applies the
    inf gradient: the weights change (to NaN) on every rank."""
    argv = flags + SKIP_FLAGS + ["--skip-nonfinite-batches"]
    for rank in distributed(_train_with_a_nonfinite_gradient, 2, ParallelConfig(), argv, 1, EMBEDDING, True,
                            init_parallel=False):
        assert not _bit_identical(rank["after"], rank["before"])
        assert any(np.isnan(v).any() for k, v in rank["after"].items() if k.startswith("weight/"))


def test_nonfinite_gradient_without_the_flag_stops_naming_the_step(distributed, flags):
    """Without --skip-nonfinite-batches every rank stops at step 2, naming it, before any update."""
    for rank in distributed(_train_with_a_nonfinite_gradient, 2, ParallelConfig(), flags + SKIP_FLAGS, 1, EMBEDDING,
                            init_parallel=False):
        assert "non-finite gradients at step 2 (gradient norm inf" in rank["error"]
        assert _bit_identical(rank["after"], rank["before"])
        assert "step3" not in rank


def _train_with_megatron_core_step(argv, legacy_step):
    """train(argv), stepping through step_if_finite or megatron-core's optimizer.step()."""
    from megatron_pref import engine, training

    if legacy_step:
        engine.step_if_finite = lambda optimizer: optimizer.step()[:2]
    return training.train(parse_run_config(argv))["weights_sha256"]


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_finite_steps_equal_megatron_core_step(distributed, flags, optimizer):
    """With finite gradients the split step is megatron-core's optimizer.step(): 3 clipped steps
    at DP2 end with bit-identical weights."""
    argv = flags + STEP_FLAGS + OPTIMIZERS[optimizer]
    split = distributed(_train_with_megatron_core_step, 2, ParallelConfig(), argv, False, init_parallel=False)
    whole = distributed(_train_with_megatron_core_step, 2, ParallelConfig(), argv, True, init_parallel=False)
    assert split == whole


@pytest.mark.parametrize("normalization", ["RMSNorm", "LayerNorm"])
def test_sequence_parallel_with_torch_norms_is_one_line(flags, monkeypatch, normalization):
    """--sequence-parallel on the local spec without apex (CPU here): megatron-core's torch norms
    assert deep in the model build; train() refuses it first, before any process group."""
    from megatron.core.models.gpt import gpt_layer_specs

    from megatron_pref.arguments import ConfigError
    from megatron_pref.training import train

    if normalization == "LayerNorm" and gpt_layer_specs.HAVE_APEX:
        pytest.skip("apex's fused LayerNorm supports --sequence-parallel")
    monkeypatch.setenv("WORLD_SIZE", "2")
    argv = flags + STEP_FLAGS + LAYOUTS["tp2"][1] + ["--sequence-parallel", "--normalization", normalization,
                                                     "--transformer-impl", "local"]
    try:
        with pytest.raises(ConfigError, match=f"--sequence-parallel needs Transformer Engine layers.*local spec's {normalization}"):
            train(parse_run_config(argv))
        assert not torch.distributed.is_initialized()
    finally:  # a failing run may have got as far as the process groups: leave none behind
        if torch.distributed.is_initialized():
            from megatron_pref import parallel

            parallel.destroy()
