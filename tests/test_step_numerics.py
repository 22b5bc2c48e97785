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

    ``unmarked_build``: the negative control, megatron-core's layers built with initialisation
    off, as train() built them before the fix (no tensor-parallel attributes)."""
    from megatron_pref import model, training

    captured = {}
    digest = training.weights_digest

    def capture(chunks):  # train() digests its final weights: take them there (a forked rank)
        captured["chunks"] = chunks
        return digest(chunks)

    training.weights_digest = capture
    if unmarked_build:
        config = model.transformer_config

        def unmarked(*args, perform_initialization=True, **kwargs):
            built = config(*args, perform_initialization=perform_initialization, **kwargs)
            built.perform_initialization = perform_initialization
            return built

        model.transformer_config = unmarked
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
    from megatron_pref.testing import run_on_ranks

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
    """Negative control: built the old way (initialisation off, no tensor-parallel attributes),
    TP rank 1's shards leave the norm; clipping then scales by the wrong norm."""
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
