"""pretrain_pref end to end on CPU/gloo: step-0 identity, resume, resharding, the reference
cache, every loss, the demo learning (bad input: test_inputs.py)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megatron_pref.arguments import ConfigError, parse_run_config
from megatron_pref.model import ParallelConfig

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(__file__).resolve().parent / "_data"


def _demo_subset(directory, name, rows, mutate=None):
    """The first ``rows`` pairs of the bundled demo data as a JSONL file."""
    from megatron_pref.data import demo_task

    lines = Path(demo_task.demo_data_path("train")).read_text().splitlines()[:rows]
    if mutate:
        lines = mutate(lines)
    path = Path(directory) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def data_flags(train_file, valid_file):
    from megatron_pref.data import demo_task

    return ["--data-path", train_file, "--valid-data-path", valid_file,
            "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", demo_task.demo_tokenizer_path()]


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """Flags for a small model on 96 demo pairs (47 held out): seconds per run."""
    directory = tmp_path_factory.mktemp("data")
    train_file = _demo_subset(directory, "train.jsonl", 96)
    valid_file = _demo_subset(directory, "valid.jsonl", 47, mutate=lambda ls: ls[::-1])
    return data_flags(train_file, valid_file) + MODEL_FLAGS


MODEL_FLAGS = ["--num-layers", "4", "--hidden-size", "32", "--num-attention-heads", "4", "--ffn-hidden-size", "64",
               "--max-position-embeddings", "128", "--normalization", "RMSNorm", "--swiglu",
               "--position-embedding-type", "rope", "--make-vocab-size-divisible-by", "16",
               "--global-batch-size", "8", "--seq-length", "64", "--log-interval", "1", "--no-progress-bar",
               "--eval-iters", "1", "--lr", "1e-3", "--clip-grad", "1.0"]


def _train(argv):
    from megatron_pref.training import train

    return train(parse_run_config(argv))


def run_training(distributed, world_size, argv):
    """pretrain_pref's train() on ``world_size`` gloo ranks; rank 0's result."""
    results = distributed(_train, world_size, ParallelConfig(), argv, init_parallel=False)
    return results


def layout_flags(tp, pp):
    return ["--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp)]


@pytest.mark.parametrize("world,tp,pp,seq_length,reference", [
    (1, 1, 1, 64, "precompute"), (2, 2, 1, 64, "precompute"), (2, 2, 1, 64, "online"),
    (2, 1, 2, 64, "precompute"), (1, 1, 1, 128, "precompute")])
def test_step_zero_identity(distributed, tmp_path, world, tp, pp, seq_length, reference, tiny):
    """Reference = initial policy: DPO loss ln 2 and rewards exactly 0 at every layout and
    packing, so no held-out pair counts as accurate at step 0 (issue 16: TP=2 gave 0.23)."""
    argv = tiny + layout_flags(tp, pp) + ["--loss", "dpo", "--train-iters", "1", "--seq-length", str(seq_length),
                                          "--ref-cache-dir", str(tmp_path / "cache"), "--ref-logprobs", reference]
    result = run_training(distributed, world, argv)[0]
    first, before = result["train"], result["eval_before"]
    assert abs(first["loss"] - math.log(2)) < 1e-6
    assert abs(before["eval/loss"] - math.log(2)) < 1e-6
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert first[name] == 0.0, (name, first[name])
        assert before[f"eval/{name}"] == 0.0, (name, before[f"eval/{name}"])


def _freeze_reference_parameters(monkeypatch):
    """The bug of issue 16 item 6, put back: the reference's parameters get
    ``requires_grad=False``, which makes torch.matmul pick another GEMM (a folded 2-D one) for
    the tensor-parallel input layout than the policy's pass uses, so the two differ by
    rounding (~5e-7) and ties break."""
    import sys as _sys
    from megatron_pref import engine

    build = engine.build_model_chunks

    def build_frozen(*args, **kwargs):
        chunks = build(*args, **kwargs)
        if not kwargs.get("wrap_ddp", True):
            for chunk in chunks:
                chunk.requires_grad_(False)
        return chunks

    for module in list(_sys.modules.values()):
        if (getattr(module, "__name__", "") or "").startswith("megatron_pref") \
                and getattr(module, "build_model_chunks", None) is build:
            monkeypatch.setattr(module, "build_model_chunks", build_frozen)


def test_step_zero_ties_break_with_a_frozen_reference_at_tp2(distributed, tmp_path, tiny, monkeypatch):
    """Negative control of test_step_zero_identity at TP=2: with the reference's parameters
    frozen by requires_grad, the online reference no longer ties with the policy."""
    _freeze_reference_parameters(monkeypatch)
    argv = tiny + layout_flags(2, 1) + ["--loss", "dpo", "--train-iters", "1", "--ref-logprobs", "online",
                                        "--ref-cache-dir", str(tmp_path / "cache")]
    result = run_training(distributed, 2, argv)[0]
    assert result["eval_before"]["eval/rewards/margins"] != 0.0 or result["train"]["rewards/margins"] != 0.0
    assert result["eval_before"]["eval/rewards/accuracies"] > 0.0 or result["train"]["rewards/accuracies"] > 0.0


def _step_zero(distributed, world, argv):
    result = run_training(distributed, world, argv)[0]
    return result["train"], result["eval_before"]


@pytest.mark.parametrize("world", [1, 2], ids=["dp1", "dp2"])
def test_step_zero_precomputed_reference_ties_exactly_like_online(distributed, tmp_path, tiny, world):
    """Issue 11: at step 0 the policy is the reference. The precomputed pass packs the first
    epoch as training does, so the rewards are exactly 0, no pair counts as "accurate" (TRL
    and --ref-logprobs online give 0) and the loss equals online's bit for bit. bf16 makes
    rounding differences between packings large enough to break ties (the negative control)."""
    from megatron_pref.data.packing import PackedPairLoader

    argv = tiny + ["--loss", "dpo", "--train-iters", "1", "--bf16", "--ref-cache-dir", str(tmp_path / "cache")]
    train, before = _step_zero(distributed, world, argv)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert train[name] == 0.0, (name, train[name])
        assert before[f"eval/{name}"] == 0.0, name
    online, _ = _step_zero(distributed, world, argv + ["--ref-logprobs", "online"])
    assert train["loss"] == online["loss"] and online["rewards/accuracies"] == 0.0

    # Negative control: the reference pass in evaluation's packs (the original pass) breaks ties.
    original = PackedPairLoader.iter_reference_pass
    try:
        PackedPairLoader.iter_reference_pass = PackedPairLoader.iter_once
        other, _ = _step_zero(distributed, world, argv + ["--ref-cache-dir", str(tmp_path / "other")])
    finally:
        PackedPairLoader.iter_reference_pass = original
    assert other["rewards/accuracies"] > 0 and other["loss"] != online["loss"]


def test_step_zero_identity_breaks_with_another_reference(distributed, tmp_path, tiny):
    """Negative control: a reference from another seed gives a loss away from ln 2."""
    argv = tiny + ["--loss", "dpo", "--train-iters", "1", "--ref-cache-dir", str(tmp_path / "cache")]
    from megatron_pref import reference

    original = reference.reference_source
    try:
        reference.reference_source = lambda run, saved_state: {"kind": "init", "seed": run.seed + 1}
        result = run_training(distributed, 1, argv)[0]
    finally:
        reference.reference_source = original
    # Tiny random models give log-probs near uniform: the gap is small but far above 1e-6.
    assert abs(result["eval_before"]["eval/loss"] - math.log(2)) > 1e-4


@pytest.mark.parametrize("optimizer_flags", [
    [], ["--use-distributed-optimizer"], ["--use-distributed-optimizer", "--overlap-grad-reduce"],
    ["--use-distributed-optimizer", "--dist-ckpt-optim-fully-reshardable"],
], ids=["ddp", "distributed-optimizer", "distributed-optimizer-overlap", "distributed-optimizer-fully-reshardable"])
def test_resume_equals_uninterrupted(distributed, tmp_path, tiny, optimizer_flags):
    """2 steps + save + load + 2 steps == 4 steps, bit for bit (with the distributed optimizer:
    its sharded Adam states go through the checkpoint too)."""
    common = tiny + ["--loss", "spo", "--ref-cache-dir", str(tmp_path / "cache"), "--eval-interval", "100"] \
        + optimizer_flags
    whole = run_training(distributed, 2, common + ["--train-iters", "4"])
    run_training(distributed, 2, common + ["--train-iters", "4", "--save", str(tmp_path / "ckpt"),
                                           "--save-interval", "2", "--exit-interval", "2"])
    assert (tmp_path / "ckpt" / "latest").read_text().strip() == "iter_0000002"
    resumed = run_training(distributed, 2, common + ["--train-iters", "4", "--load", str(tmp_path / "ckpt")])
    assert [r["weights_sha256"] for r in resumed] == [r["weights_sha256"] for r in whole]
    assert resumed[0]["train"]["loss"] == whole[0]["train"]["loss"]


def test_overlap_grad_reduce_trains_like_the_default(distributed, tmp_path, tiny):
    """--overlap-grad-reduce moves the data-parallel reduction into the backward: 3 steps at
    DP=2 (several packs per rank) end with the same weights."""
    common = tiny + ["--loss", "dpo", "--ref-cache-dir", str(tmp_path / "cache"), "--eval-interval", "100",
                     "--train-iters", "3"]
    plain = run_training(distributed, 2, common)
    overlapped = run_training(distributed, 2, common + ["--overlap-grad-reduce"])
    assert [r["weights_sha256"] for r in overlapped] == [r["weights_sha256"] for r in plain]
    assert overlapped[0]["train"]["loss"] == pytest.approx(plain[0]["train"]["loss"], abs=1e-7)


def _train_without_param_sync(argv):
    """_train with synchronize_params disabled: the negative control for --overlap-param-gather."""
    from megatron_pref import training

    training.synchronize_params = lambda chunks: None  # a forked rank: the patch dies with it
    return _train(argv)


@pytest.mark.parametrize("layout", [[], ["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1"]],
                         ids=["dp2", "pp2vpp2dp2"])
def test_overlap_param_gather_trains_like_the_default(distributed, tmp_path, tiny, layout):
    """--overlap-param-gather leaves the distributed optimizer's all-gather to the next forward
    (with virtual stages, to the interleaved schedule). 3 steps, saving after each, end with the
    weights and loss of the run without it; the last checkpoint, resumed, holds those weights and
    evaluates the same. Control (DP 2): without the gather before the weights are read, the
    digests see other ranks' stale shards."""
    world = 4 if layout else 2
    common = tiny + layout + ["--loss", "dpo", "--ref-cache-dir", str(tmp_path / "cache"), "--train-iters", "3",
                              "--eval-interval", "100", "--use-distributed-optimizer", "--overlap-grad-reduce"]
    plain = run_training(distributed, world, common)
    # --exit-interval 3 returns before the final evaluation, whose forward would gather anyway.
    overlap = common + ["--overlap-param-gather", "--exit-interval", "3"]
    overlapped = run_training(distributed, world, overlap + ["--save", str(tmp_path / "ckpt"), "--save-interval", "1"])
    assert [r["weights_sha256"] for r in overlapped] == [r["weights_sha256"] for r in plain]
    assert overlapped[-1]["train"]["loss"] == plain[-1]["train"]["loss"]
    resumed = run_training(distributed, world, common + ["--overlap-param-gather", "--load", str(tmp_path / "ckpt")])
    assert resumed[0]["iteration"] == 3
    assert [r["weights_sha256"] for r in resumed] == [r["weights_sha256"] for r in plain]
    assert resumed[0]["eval_after"]["eval/loss"] == plain[0]["eval_after"]["eval/loss"]
    if not layout:
        stale = distributed(_train_without_param_sync, world, ParallelConfig(), overlap, init_parallel=False)
        assert [r["weights_sha256"] for r in stale] != [r["weights_sha256"] for r in plain]


def test_distributed_optimizer_checkpoint_layouts(distributed, tmp_path, tiny):
    """A distributed-optimizer checkpoint (DP=2, saved at step 2) resumes at another DP size, and
    with --dist-ckpt-optim-fully-reshardable at another TP, with its Adam state: step 4's loss
    (after an update that uses the loaded moments) equals the uninterrupted run's. Control: the
    same resume without the optimizer state (--no-load-optim) lands elsewhere. Layouts the format
    cannot serve, another bucket size and a plain optimizer are one clear error each."""
    common = tiny + ["--loss", "dpo", "--ref-cache-dir", str(tmp_path / "cache"), "--eval-interval", "100",
                     "--train-iters", "4"]
    dist_opt = ["--use-distributed-optimizer"]

    def step4_loss(world, extra):
        return run_training(distributed, world, common + dist_opt + extra)[0]["train"]["loss"]

    def save(name, extra):
        step4_loss(2, extra + ["--save", str(tmp_path / name), "--save-interval", "2", "--exit-interval", "2"])
        return str(tmp_path / name)

    whole = step4_loss(2, [])
    dp_only = save("dp", [])
    assert step4_loss(1, ["--load", dp_only]) == pytest.approx(whole, abs=1e-6)  # DP 2 -> 1
    fresh = step4_loss(1, ["--load", dp_only, "--no-load-optim"])
    assert abs(fresh - whole) > 1e-5, "the control: Adam state matters at step 4"
    anywhere = save("full", ["--dist-ckpt-optim-fully-reshardable"])
    assert step4_loss(2, ["--load", anywhere, "--tensor-model-parallel-size", "2"]) == pytest.approx(whole, abs=1e-6)

    with pytest.raises(RuntimeError, match=r"loads only at the layout it was saved at \(tp=1\)"):
        step4_loss(2, ["--load", dp_only, "--tensor-model-parallel-size", "2"])
    with pytest.raises(RuntimeError, match="saved with gradient buckets of all parameters and this run uses 40000000"):
        step4_loss(2, ["--load", dp_only, "--overlap-grad-reduce"])
    with pytest.raises(RuntimeError, match="saved with --use-distributed-optimizer; run with it"):
        run_training(distributed, 2, common + ["--load", dp_only])


@pytest.mark.parametrize("optimizer_flags", [[], ["--use-distributed-optimizer"]], ids=["ddp", "distributed-optimizer"])
def test_weights_loaded_without_optimizer_state_survive_the_first_step(distributed, tmp_path, tiny, optimizer_flags):
    """--bf16 keeps fp32 master weights copied when the optimizer is built; a load that brings
    no optimizer state (--no-load-optim, a converted checkpoint) must refresh them, or the first
    step writes the stale copy back. With lr 0 the weights after one step are the loaded ones."""
    common = tiny + ["--loss", "dpo", "--ref-cache-dir", str(tmp_path / "cache"), "--eval-interval", "100", "--bf16"] \
        + optimizer_flags
    saved = run_training(distributed, 1, common + ["--train-iters", "4", "--save", str(tmp_path / "ckpt"),
                                                   "--save-interval", "2", "--exit-interval", "2"])[0]
    reloaded = run_training(distributed, 1, common + ["--train-iters", "3", "--load", str(tmp_path / "ckpt"),
                                                      "--no-load-optim", "--lr", "0", "--lr-warmup-iters", "0",
                                                      "--override-opt_param-scheduler"])[0]
    assert reloaded["weights_sha256"] == saved["weights_sha256"]


def test_checkpoint_reshards_between_layouts(distributed, tmp_path, tiny):
    """Saved at TP=2/PP=2, loaded at TP=1/PP=1 (and back): the same held-out loss."""
    common = tiny + ["--loss", "simpo", "--beta", "2.0", "--eval-interval", "100"]
    saved = run_training(distributed, 4, common + layout_flags(2, 2) + ["--train-iters", "2", "--save",
                                                                       str(tmp_path / "a")])
    want = saved[0]["eval_after"]["eval/loss"]
    # --train-iters 2 again: nothing left to train, only the final evaluation runs.
    single = run_training(distributed, 1, common + ["--train-iters", "2", "--load", str(tmp_path / "a"),
                                                    "--save", str(tmp_path / "b")])
    assert single[0]["iteration"] == 2
    assert single[0]["eval_after"]["eval/loss"] == pytest.approx(want, abs=1e-5)
    back = run_training(distributed, 4, common + layout_flags(2, 2) + ["--train-iters", "2", "--load",
                                                                      str(tmp_path / "b")])
    assert back[0]["eval_after"]["eval/loss"] == pytest.approx(want, abs=1e-5)


def _die_during_save(argv):
    """Train, but crash inside the second save after part of it was written."""
    from megatron.core import dist_checkpointing

    from megatron_pref import checkpointing

    original = dist_checkpointing.save
    calls = {"n": 0}

    def flaky_save(state, path, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            Path(path, "partial.bin").write_bytes(b"half written")
            raise KeyboardInterrupt("killed during save")
        return original(state, path, *a, **k)

    dist_checkpointing.save = flaky_save
    try:
        return _train(argv)
    except KeyboardInterrupt:
        return "killed"
    finally:
        dist_checkpointing.save = original
        del checkpointing


def test_killed_save_resumes_from_last_complete_checkpoint(distributed, tmp_path, tiny):
    ckpt = tmp_path / "ckpt"
    argv = tiny + ["--loss", "slime", "--train-iters", "4", "--save", str(ckpt), "--save-interval", "2",
                   "--eval-interval", "100"]
    assert distributed(_die_during_save, 1, ParallelConfig(), argv, init_parallel=False) == ["killed"]
    assert (ckpt / "latest").read_text().strip() == "iter_0000002"
    assert (ckpt / "iter_0000004.tmp").is_dir() and not (ckpt / "iter_0000004").exists()
    resumed = run_training(distributed, 1, argv + ["--load", str(ckpt)])
    assert resumed[0]["iteration"] == 4
    assert (ckpt / "latest").read_text().strip() == "iter_0000004"
    assert not (ckpt / "iter_0000004.tmp").exists()


def test_reference_cache_is_used_and_invalidated(distributed, tmp_path, caplog):
    cache = tmp_path / "cache"
    train_file = _demo_subset(tmp_path, "train.jsonl", 64)
    valid_file = _demo_subset(tmp_path, "valid.jsonl", 16)
    argv = data_flags(train_file, valid_file) + MODEL_FLAGS + ["--loss", "dpo", "--train-iters", "1",
                                                             "--ref-cache-dir", str(cache)]
    first = run_training(distributed, 1, argv)[0]["train"]["loss"]
    table_path = cache / "train" / "reference_logps.npy"
    key = json.loads((cache / "train" / "reference_logps.json").read_text())

    # The cache is really read: perturbing it changes the loss.
    table = np.load(table_path)
    np.save(table_path, table + np.array([0.0, 3.0]))
    perturbed = run_training(distributed, 1, argv)[0]["train"]["loss"]
    assert abs(perturbed - first) > 1e-3
    np.save(table_path, table)
    assert run_training(distributed, 1, argv)[0]["train"]["loss"] == pytest.approx(first, abs=1e-9)

    # Changed data -> rebuilt (key's data field changes).
    changed = _demo_subset(tmp_path, "train.jsonl", 64, mutate=lambda ls: ls[:-1] + [ls[-1].replace('"rejected":"', '"rejected":"9')])
    assert changed == train_file
    run_training(distributed, 1, argv)
    new_key = json.loads((cache / "train" / "reference_logps.json").read_text())
    assert new_key["data"] != key["data"] and new_key["reference"] == key["reference"]

    # Changed reference -> rebuilt (key's reference field changes).
    run_training(distributed, 1, argv + ["--seed", "99"])
    assert json.loads((cache / "train" / "reference_logps.json").read_text())["reference"] != key["reference"]


def test_reference_cache_sees_a_same_size_edit_in_the_middle_of_the_data(distributed, tmp_path):
    """Issue 11: chosen and rejected swapped in one row 1 MiB into a 2.1 MiB JSONL (same size,
    outside the first and last MiB) -> the reference is recomputed, not read from the cache.
    Negative control: an identical copy in another directory hits the cache."""
    import shutil

    from tests.test_data_fingerprint import MIB, swap_chosen_rejected_near, write_padded_jsonl

    cache = tmp_path / "cache"
    train_file = write_padded_jsonl(tmp_path / "train.jsonl")
    valid_file = _demo_subset(tmp_path, "valid.jsonl", 16)
    argv = data_flags(train_file, valid_file) + MODEL_FLAGS + ["--loss", "dpo", "--train-iters", "1",
                                                             "--ref-cache-dir", str(cache)]
    run_training(distributed, 1, argv)
    table_path, key_path = cache / "train" / "reference_logps.npy", cache / "train" / "reference_logps.json"
    table, key = np.load(table_path), json.loads(key_path.read_text())

    (tmp_path / "elsewhere").mkdir()
    copy = shutil.copy(train_file, tmp_path / "elsewhere" / "train.jsonl")  # same bytes, another place
    written = table_path.stat().st_mtime_ns, table_path.stat().st_ino
    run_training(distributed, 1, data_flags(str(copy), valid_file) + argv[len(data_flags(train_file, valid_file)):])
    assert (table_path.stat().st_mtime_ns, table_path.stat().st_ino) == written  # a cache hit

    row, _ = swap_chosen_rejected_near(train_file, MIB + 1000)
    run_training(distributed, 1, argv)
    new_table, new_key = np.load(table_path), json.loads(key_path.read_text())
    assert new_key["data"] != key["data"]
    assert {k for k in key if key[k] != new_key[k]} == {"data"}
    # The recomputed table has the pair's reference log-probs swapped, and nothing else changed.
    np.testing.assert_allclose(new_table[row], table[row][::-1], rtol=0, atol=1e-5)
    assert abs(table[row][0] - table[row][1]) > 1e-3
    assert np.array_equal(np.delete(new_table, row, axis=0), np.delete(table, row, axis=0))


def _train_with_a_cache_miss_on_rank_1(argv):
    from megatron_pref import reference

    if os.environ["RANK"] == "1":  # e.g. a cache directory that this node cannot see
        reference.load_cached_table = lambda *args, **kwargs: None
    return _train(argv)


def test_cache_seen_by_some_ranks_only_is_recomputed_by_all(distributed, tmp_path, tiny):
    argv = tiny + ["--loss", "dpo", "--train-iters", "1", "--ref-cache-dir", str(tmp_path / "cache")]
    first = run_training(distributed, 2, argv)
    again = distributed(_train_with_a_cache_miss_on_rank_1, 2, ParallelConfig(), argv, init_parallel=False,
                        timeout=120)
    assert [r["train"]["loss"] for r in again] == [r["train"]["loss"] for r in first]


def test_stale_cache_log_names_the_changed_field(tmp_path, caplog):
    from megatron_pref.reference import cache_key, load_cached_table, save_cached_table

    key = cache_key("data-a", "ref", "tok", 64, None, "fp32", {"hidden_size": 8})
    save_cached_table(tmp_path, key, np.zeros((3, 2)))
    assert load_cached_table(tmp_path, key, 3) is not None
    stale = cache_key("data-b", "ref", "tok", 64, None, "fp32", {"hidden_size": 8})
    with caplog.at_level("INFO"):
        assert load_cached_table(tmp_path, stale, 3) is None
    assert "stale (data changed)" in caplog.text


@pytest.mark.parametrize("loss", ["dpo", "ipo", "hinge", "spo", "slime", "simpo", "orpo", "sft"])
def test_every_loss_trains_end_to_end(distributed, tmp_path, loss, tiny):
    argv = tiny + ["--loss", loss, "--train-iters", "3", "--ref-cache-dir", str(tmp_path / "cache"),
                   "--ref-logprobs", "online" if loss == "ipo" else "precompute"]
    result = run_training(distributed, 2, argv)[0]
    assert result["iteration"] == 3
    assert math.isfinite(result["train"]["loss"]) and result["train"]["grad_norm"] > 0


# Step 0 (reference = initial policy, every log-ratio 0) closed forms of TRL 1.16's losses at
# beta 0.1, label smoothing 0.1, discopop tau 0.05.
LN2 = math.log(2)
STEP_ZERO_TRL_LOSSES = {
    "sigmoid_norm": LN2, "nca_pair": 2 * LN2, "robust": LN2, "bco_pair": 2 * LN2, "sppo_hard": 2 * 5.0 ** 2,
    "aot": LN2, "aot_unpaired": LN2, "apo_zero": 1.0, "apo_down": 1.0, "discopop": 0.5 * LN2 + 0.5,
    "exo_pair": 0.5 * (math.log(0.5) - math.log(0.9)) + 0.5 * (math.log(0.5) - math.log(0.1)),
}


@pytest.mark.parametrize("world,tp,pp", [(2, 2, 1), (2, 1, 2)])
def test_trl_losses_train_end_to_end_as_a_weighted_sum(distributed, tmp_path, tiny, world, tp, pp):
    """Every TRL 1.16 loss in one weighted combination, with LD-DPO on: each term is logged as
    loss/<name> with its step-0 closed form, and the loss is their weighted sum."""
    names = sorted(STEP_ZERO_TRL_LOSSES)
    weights = [0.5 + 0.1 * i for i in range(len(names))]
    argv = tiny + layout_flags(tp, pp) + [
        "--loss", ",".join(names), "--loss-weights", ",".join(f"{w:g}" for w in weights),
        "--label-smoothing", "0.1", "--ld-alpha", "0.5", "--train-iters", "2",
        "--ref-cache-dir", str(tmp_path / "cache")]
    result = run_training(distributed, world, argv)[0]
    first = result["eval_before"]
    for name in names:
        assert first[f"eval/loss/{name}"] == pytest.approx(STEP_ZERO_TRL_LOSSES[name], abs=1e-5), name
    assert first["eval/loss"] == pytest.approx(sum(w * STEP_ZERO_TRL_LOSSES[n] for n, w in zip(names, weights)),
                                               abs=1e-4)
    assert result["iteration"] == 2 and math.isfinite(result["train"]["loss"]) and result["train"]["grad_norm"] > 0


def test_wpo_and_token_nll_train_end_to_end(distributed, tmp_path, tiny):
    """--use-weighting at step 0: the DPO term is ln 2 times the mean WPO weight (< 1)."""
    argv = tiny + ["--loss", "dpo,sft", "--loss-weights", "1,0.2", "--use-weighting",
                   "--nll-normalization", "token", "--train-iters", "1", "--ref-cache-dir", str(tmp_path / "cache")]
    first = run_training(distributed, 2, argv)[0]["eval_before"]
    assert 0 < first["eval/wpo/weight"] < 1
    assert first["eval/loss/dpo"] == pytest.approx(LN2 * first["eval/wpo/weight"], rel=1e-5)
    assert first["eval/loss"] == pytest.approx(first["eval/loss/dpo"] + 0.2 * first["eval/loss/sft"], rel=1e-5)


def test_bco_running_mean_survives_resume(distributed, tmp_path, tiny):
    """--bco-running-mean: the running mean reward (train state, the same on both data-parallel
    ranks) goes through the checkpoint: 2 steps + save + load + 1 step == 3 steps, bit for bit.
    A checkpoint saved without the flag cannot be resumed with it (one line)."""
    common = tiny + ["--loss", "bco_pair", "--bco-running-mean", "--ref-cache-dir", str(tmp_path / "cache"),
                     "--eval-interval", "100", "--train-iters", "3"]
    whole = run_training(distributed, 2, common)
    # Step 3 uses the mean reward of steps 1 and 2: not zero once the policy has moved.
    delta = whole[0]["train"]["bco/delta"]
    assert delta != 0 and all(r["train"]["bco/delta"] == delta for r in whole)
    run_training(distributed, 2, common + ["--save", str(tmp_path / "ckpt"), "--save-interval", "2",
                                           "--exit-interval", "2"])
    resumed = run_training(distributed, 2, common + ["--load", str(tmp_path / "ckpt")])
    assert resumed[0]["train"]["bco/delta"] == delta
    assert [r["weights_sha256"] for r in resumed] == [r["weights_sha256"] for r in whole]

    plain = [a for a in common if a != "--bco-running-mean"]
    run_training(distributed, 1, plain + ["--save", str(tmp_path / "plain"), "--save-interval", "1",
                                          "--exit-interval", "1"])
    from megatron_pref.checkpointing import CheckpointError

    for no_optimizer in ([], ["--no-load-optim"]):  # the running mean is not optimizer state
        with pytest.raises(CheckpointError, match="saved without --bco-running-mean"):
            _train(common + ["--load", str(tmp_path / "plain")] + no_optimizer)


def test_online_reference_equals_precomputed(distributed, tmp_path, tiny):
    common = tiny + ["--loss", "dpo", "--train-iters", "2", "--ref-cache-dir", str(tmp_path / "cache")]
    pre = run_training(distributed, 1, common)[0]
    online = run_training(distributed, 1, common + ["--ref-logprobs", "online"])[0]
    assert online["train"]["loss"] == pytest.approx(pre["train"]["loss"], abs=1e-6)
    assert online["weights_sha256"] == pre["weights_sha256"] or online["train"]["loss"] == pytest.approx(
        pre["train"]["loss"], abs=1e-6)


def _train_with_small_eval_steps(argv):
    from megatron_pref import training

    training.EVAL_PAIRS_PER_STEP = 5  # 46 pairs: the last step has 1 pair for 2 ranks
    return _train(argv)


def test_evaluation_when_a_rank_gets_no_pairs(distributed, tmp_path):
    valid_file = _demo_subset(tmp_path, "valid.jsonl", 46)
    at = MODEL_FLAGS.index("--eval-iters")  # evaluate every pair, down to the 1-pair last step
    model_flags = MODEL_FLAGS[:at] + MODEL_FLAGS[at + 2:]
    argv = data_flags(_demo_subset(tmp_path, "train.jsonl", 32), valid_file) + model_flags + [
        "--loss", "dpo", "--train-iters", "1", "--ref-cache-dir", str(tmp_path / "cache")]
    results = distributed(_train_with_small_eval_steps, 2, ParallelConfig(), argv, init_parallel=False)
    for result in results:
        assert abs(result["eval_before"]["eval/loss"] - math.log(2)) < 1e-6
    assert results[0]["eval_after"] == results[1]["eval_after"]


def test_metrics_file_and_tensorboard(distributed, tmp_path, tiny):
    argv = tiny + ["--loss", "spo", "--train-iters", "2", "--tensorboard-dir", str(tmp_path / "tb"),
                   "--ref-cache-dir", str(tmp_path / "cache")]
    run_training(distributed, 1, argv)
    lines = [json.loads(l) for l in (tmp_path / "tb" / "metrics.jsonl").read_text().splitlines()]
    steps = [l for l in lines if "loss" in l]
    assert [l["iteration"] for l in steps] == [1, 2]
    for name in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                 "logps/chosen", "logps/rejected", "lr", "grad_norm", "tokens_per_sec"):
        assert name in steps[0], name
    assert any(f.name.startswith("events.out.tfevents") for f in (tmp_path / "tb").iterdir())


def test_wandb_offline(distributed, tmp_path, tiny, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    argv = tiny + ["--loss", "sft", "--train-iters", "1", "--wandb-project", "megatron-pref-test",
                   "--wandb-exp-name", "offline", "--wandb-save-dir", str(tmp_path / "wb")]
    run_training(distributed, 1, argv)
    runs = list((tmp_path / "wb" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].glob("*.wandb"))


# --------------------------------------------------------------------------- the command line


def run_cli(args, env_extra=None, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env_extra or {}))
    return subprocess.run([sys.executable, str(REPO / "pretrain_pref.py"), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def torchrun_cli(nproc, args, timeout=300, env_extra=None, script=REPO / "pretrain_pref.py"):
    """``torchrun --nproc-per-node nproc pretrain_pref.py args``. With ``env_extra``, the ranks run
    under tests/wrapped_launch.py, which reads it (a rank that starts late, a node's GPU count)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env_extra or {}))
    wrapper = [str(REPO / "tests" / "wrapped_launch.py")] if env_extra else []
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
                           *wrapper, str(script), *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_defaults_under_megatron_lm_names(tiny):
    """Megatron-LM's defaults (--lr-decay-style linear, --log-interval 100), one learning-rate
    default for flags and OptimConfig (TRL's 1e-6, documented); the demo's recipe keeps cosine."""
    from megatron_pref.arguments import OptimConfig

    run = parse_run_config(tiny[:8] + ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4"])
    assert (run.optim.lr_decay_style, run.log.log_interval, run.data.shuffle) == ("linear", 100, True)
    assert run.optim.lr == OptimConfig().lr == 1e-6
    demo = parse_run_config([])
    assert (demo.optim.lr_decay_style, demo.optim.lr) == ("cosine", 2e-3)
    assert parse_run_config(["--lr-decay-style", "constant"]).optim.lr_decay_style == "constant"
    with pytest.raises(ConfigError, match="--min-lr 1e-05 is above --lr 1e-06"):
        parse_run_config(tiny[:8] + ["--min-lr", "1e-5"])


def _train_recording_pair_order(argv):
    """train(), returning the global pair ids of each step's batch on this rank."""
    from megatron_pref.data.packing import PackedPairLoader

    order = []
    original = PackedPairLoader.next_global_batch

    def next_global_batch(self):
        packs = original(self)
        order.append(sorted(int(i) for p in packs for i in p.pair_ids))
        return packs

    PackedPairLoader.next_global_batch = next_global_batch
    _train(argv)
    return order


def test_no_shuffle_trains_in_file_order(distributed, tmp_path, tiny):
    """--no-shuffle: step k trains on the file's pairs 8k..8k+7 (split over DP=2); the default
    (negative control) draws them from a permutation."""
    argv = tiny + ["--loss", "dpo", "--train-iters", "2", "--ref-cache-dir", str(tmp_path / "cache")]
    ranks = distributed(_train_recording_pair_order, 2, ParallelConfig(), argv + ["--no-shuffle"], init_parallel=False)
    steps = [sorted(a + b) for a, b in zip(*ranks)]
    assert steps == [list(range(0, 8)), list(range(8, 16))]
    shuffled = distributed(_train_recording_pair_order, 2, ParallelConfig(), argv, init_parallel=False)
    assert [sorted(a + b) for a, b in zip(*shuffled)] != steps


def test_train_epochs_sets_the_step_count(distributed, tmp_path, tiny):
    """96 pairs in batches of 8: half an epoch is 6 steps."""
    argv = tiny + ["--loss", "sft", "--train-epochs", "0.5", "--eval-interval", "100"]
    assert run_training(distributed, 1, argv)[0]["iteration"] == 6


def test_skip_nonfinite_batches_keeps_going(tiny, tmp_path):
    out = run_cli(tiny + ["--loss", "sft", "--train-iters", "4", "--lr", "1e30", "--clip-grad", "0",
                          "--skip-nonfinite-batches", "--metrics-file", str(tmp_path / "m.jsonl")])
    assert out.returncode == 0, out.stderr[-2000:]
    steps = [json.loads(l) for l in (tmp_path / "m.jsonl").read_text().splitlines() if '"skipped"' in l]
    assert [s["iteration"] for s in steps] == [1, 2, 3, 4] and steps[-1]["skipped"] == 1.0


def test_non_finite_loss_stops_naming_the_step(tiny):
    out = run_cli(tiny + ["--loss", "sft", "--train-iters", "5", "--lr", "1e30", "--clip-grad", "0"])
    assert out.returncode == 3, out.stderr[-2000:]
    assert "at step" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.slow
def test_demo_learns(tmp_path):
    """The Quickstart command: held-out preference accuracy rises well above chance."""
    out = torchrun_cli(2, ["--loss", "spo", "--no-progress-bar", "--save", str(tmp_path / "demo")], timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [json.loads(l) for l in (tmp_path / "demo" / "metrics.jsonl").read_text().splitlines()]
    evals = [l for l in lines if "eval/rewards/accuracies" in l]
    before, after = evals[0]["eval/rewards/accuracies"], evals[-1]["eval/rewards/accuracies"]
    assert after > 0.75, (before, after)
    assert "held-out preference accuracy" in out.stdout
