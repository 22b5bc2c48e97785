"""HF <-> megatron-core conversion: logits at TP=1/TP=2/PP=2, bit-exact round trips, negative
controls and bad input. Tiny random models (2 layers, hidden 64) built locally; no downloads.

Conversions and megatron-core forwards run in forked gloo ranks (``run_on_ranks``), so the
pytest process itself never initialises torch.distributed or the CPU compatibility layer.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_pref.convert import mapping as mapping_mod
from megatron_pref.convert.cli import hf_to_megatron_main, megatron_to_hf_main
from megatron_pref.convert.verify import DEFAULT_TEXT, compare_logits, hf_logits, megatron_logits
from megatron_pref.model import ParallelConfig
from megatron_pref.forked_ranks import run_on_ranks

REPO = Path(__file__).resolve().parents[1]
ARCHS = ("llama", "qwen2", "mistral", "gpt2")
LAYOUTS = {"tp1": (1, 1), "tp2": (2, 1), "pp2": (1, 2)}
SEQ = 48


def hf_config(arch: str, **overrides):
    import transformers as T

    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, rms_norm_eps=1e-5)
    if arch == "llama":  # GQA + Llama-3 rope scaling (positions past the scaled wavelengths matter)
        cfg = T.LlamaConfig(vocab_size=1000, max_position_embeddings=16384, tie_word_embeddings=False,
                            rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                             "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                             "original_max_position_embeddings": 8192}, **common)
    elif arch == "qwen2":  # QKV bias, tied embeddings
        cfg = T.Qwen2Config(vocab_size=1000, max_position_embeddings=4096, tie_word_embeddings=True,
                            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, **common)
    elif arch == "mistral":  # window >= max positions: no effect, accepted as is
        cfg = T.MistralConfig(vocab_size=1000, max_position_embeddings=4096, sliding_window=4096, **common)
    elif arch == "gpt2":  # vocab 1100 pads to 1152 at TP=1 and 1280 at TP=2: exercises re-padding on load
        cfg = T.GPT2Config(vocab_size=1100, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                           bos_token_id=1, eos_token_id=2)
    else:
        raise ValueError(arch)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def randomize(model, seed: int) -> None:
    """Every parameter random (norm weights around 1), so misplaced tensors change the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            is_norm = "norm" in name or ".ln_" in name or name.startswith("ln_") or "ln_f" in name
            if is_norm and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)
            else:
                p.copy_(0.1 * noise)


def make_tokenizer(out_dir: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for word in re.findall(r"\w+|[^\w\s]", DEFAULT_TEXT):
        vocab.setdefault(word, len(vocab))
    while len(vocab) < vocab_size:
        vocab[f"tok{len(vocab)}"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(str(out_dir))


def make_hf_model(out_dir: Path, arch: str, seed: int = 0, max_shard_size=None, tokenizer=False,
                  dtype=torch.float32, **overrides) -> Path:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(arch, **overrides))
    randomize(model, seed)
    model = model.to(dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(str(out_dir), **kwargs)
    if tokenizer:
        make_tokenizer(out_dir, model.config.vocab_size)
    return out_dir


def load_hf_tensors(directory: Path) -> dict:
    from safetensors.torch import load_file

    index = directory / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() \
        else ["model.safetensors"]
    out = {}
    for f in files:
        out.update(load_file(str(directory / f)))
    return out


# --- conversions in a forked rank ------------------------------------------------------------

def _to_megatron(hf_dir, save_dir, kwargs):
    from megatron_pref.convert.hf_to_megatron import convert_hf_to_megatron

    return convert_hf_to_megatron(hf_dir, save_dir, log=lambda _: None, **kwargs)


def _to_hf(load_dir, save_dir, kwargs):
    from megatron_pref.convert.megatron_to_hf import convert_megatron_to_hf

    return convert_megatron_to_hf(load_dir, save_dir, log=lambda _: None, **kwargs)


def to_megatron(hf_dir, save_dir, **kwargs):
    return run_on_ranks(_to_megatron, 1, ParallelConfig(), str(hf_dir), str(save_dir), kwargs)[0]


def to_hf(load_dir, save_dir, **kwargs):
    return run_on_ranks(_to_hf, 1, ParallelConfig(), str(load_dir), str(save_dir), kwargs)[0]


def mcore_logits(load_dir, tokens, tp=1, pp=1):
    results = run_on_ranks(megatron_logits, tp * pp, ParallelConfig(tp, pp), str(load_dir), list(tokens))
    return next(r for r in results if r is not None)


def fixed_ids(vocab: int, n: int = SEQ, seed: int = 1234):
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


# --- fixtures: one converted model per architecture --------------------------------------------

@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    cache = {}

    def get(arch):
        if arch not in cache:
            root = tmp_path_factory.mktemp(arch)
            # Llama is saved in several shards (index + lazy reads); Llama also carries a tokenizer.
            hf_dir = make_hf_model(root / "hf", arch, max_shard_size="200KB" if arch == "llama" else None,
                                   tokenizer=arch == "llama")
            mc_dir = root / "megatron"
            to_megatron(hf_dir, mc_dir)
            vocab = json.loads((hf_dir / "config.json").read_text())["vocab_size"]
            tokens = fixed_ids(vocab)
            cache[arch] = dict(root=root, hf=hf_dir, mc=mc_dir, tokens=tokens, ref=hf_logits(hf_dir, tokens))
        return cache[arch]

    return get


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("arch", ARCHS)
def test_logits_match_hf(converted, arch, layout):
    c = converted(arch)
    tp, pp = LAYOUTS[layout]
    result = compare_logits(mcore_logits(c["mc"], c["tokens"], tp, pp), c["ref"], atol=1e-4)
    print(f"{arch} {layout}: {result.summary()}")
    assert result.max_abs_logit_diff <= 1e-4, result.summary()
    assert result.argmax_agreement == 1.0, result.summary()
    assert result.passed


@pytest.mark.parametrize("arch", ARCHS)
def test_round_trip_is_bit_exact(converted, arch):
    c = converted(arch)
    back = c["root"] / "back"
    to_hf(c["mc"], back)
    original, restored = load_hf_tensors(c["hf"]), load_hf_tensors(back)
    assert sorted(restored) == sorted(original)
    for name, tensor in original.items():
        assert restored[name].dtype == tensor.dtype, name
        assert torch.equal(restored[name], tensor), name
    # A loadable HF directory: sharded with an index, config.json that transformers reads.
    assert (back / "model.safetensors.index.json").is_file()
    from transformers import AutoConfig, AutoModelForCausalLM

    src_cfg, out_cfg = AutoConfig.from_pretrained(str(c["hf"])), AutoConfig.from_pretrained(str(back))
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "tie_word_embeddings",
                "max_position_embeddings"):
        assert getattr(out_cfg, key) == getattr(src_cfg, key), key
    if arch != "gpt2":
        assert out_cfg.num_key_value_heads == src_cfg.num_key_value_heads
        assert dict(out_cfg.rope_parameters) == dict(src_cfg.rope_parameters)
    model = AutoModelForCausalLM.from_pretrained(str(back), dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    with torch.no_grad():
        logits = model(torch.tensor([c["tokens"]])).logits[0]
    assert torch.equal(logits, c["ref"])


def test_tokenizer_travels_both_ways(converted):
    from transformers import AutoTokenizer

    c = converted("llama")
    assert (c["mc"] / "tokenizer" / "tokenizer.json").is_file()
    back = c["root"] / "back_tok"
    to_hf(c["mc"], back, max_shard_size="150KB")
    assert len(json.loads((back / "model.safetensors.index.json").read_text())["weight_map"]) == 21
    assert len(list(back.glob("model-*-of-*.safetensors"))) > 1
    original, restored = AutoTokenizer.from_pretrained(str(c["hf"])), AutoTokenizer.from_pretrained(str(back))
    ids = original(DEFAULT_TEXT)["input_ids"]
    assert restored(DEFAULT_TEXT)["input_ids"] == ids
    assert 0 not in ids, "the test tokenizer covers the text"
    # verify_conversion's fixed text goes through the checkpoint's tokenizer.
    from megatron_pref.convert.verify import fixed_tokens

    assert fixed_tokens(c["mc"]) == ids


def _reshard_and_save(src, dst):
    """A training-like rank: load at this TP/PP, save a new iteration from every rank."""
    from megatron_pref.checkpoint_format import read_checkpoint_metadata, read_model_config
    from megatron_pref.convert.checkpoint_io import load_model_checkpoint, save_model_checkpoint
    from megatron.core import parallel_state as ps

    from megatron_pref.model import PrecisionConfig, build_gpt_model

    cfg = read_model_config(src)
    parallel = ParallelConfig(ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size())
    model = build_gpt_model(cfg, parallel, PrecisionConfig())
    load_model_checkpoint(model, src)
    save_model_checkpoint(model, cfg, dst, iteration=5, tokenizer_dir=Path(src) / "tokenizer",
                          source=read_checkpoint_metadata(src)["source"])
    return model.embedding.word_embeddings.weight.shape[0] if ps.is_pipeline_first_stage() else None


def _load_with_extra_state(src, bogus_key=None):
    """Load ``src`` into a model whose final norm carries a TE-style ``_extra_state`` (the
    checkpoint, written without TE, has none); optionally also request a tensor it lacks."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from megatron_pref.checkpoint_format import read_model_config
    from megatron_pref.convert.checkpoint_io import load_model_checkpoint
    from megatron_pref.convert.errors import ConversionError
    from megatron_pref.model import PrecisionConfig, build_gpt_model

    model = build_gpt_model(read_model_config(src), ParallelConfig(), PrecisionConfig())
    norm = model.decoder.final_layernorm
    norm.__class__ = type("NormWithExtraState", (type(norm),), {
        "get_extra_state": lambda self: torch.zeros(2), "set_extra_state": lambda self, state: None})
    requested = model.sharded_state_dict
    assert "decoder.final_layernorm._extra_state" in requested()  # what TE modules add
    if bogus_key:
        model.sharded_state_dict = lambda *a, **k: dict(
            requested(*a, **k), **{bogus_key: ShardedTensor.from_rank_offsets(bogus_key, torch.zeros(4))})
    with torch.no_grad():
        model.decoder.final_layernorm.weight.fill_(float("nan"))
    try:
        load_model_checkpoint(model, src)
    except ConversionError as exc:
        return "error", str(exc)
    return "ok", bool(torch.isfinite(model.decoder.final_layernorm.weight).all())


def test_checkpoint_without_te_extra_state_loads_into_te_style_modules(converted):
    """Converted (or CPU-saved) checkpoints have no TE ``_extra_state``; a TE model asks for it.
    It may be absent; any other missing tensor is one clear error naming it (control)."""
    c = converted("llama")
    assert run_on_ranks(_load_with_extra_state, 1, ParallelConfig(), str(c["mc"]))[0] == ("ok", True)
    status, message = run_on_ranks(_load_with_extra_state, 1, ParallelConfig(), str(c["mc"]),
                                   "decoder.bogus.weight")[0]
    assert status == "error" and "decoder.bogus.weight" in message and "\n" not in message


def test_checkpoint_saved_at_tp2_pp2_exports_bit_exactly(converted, tmp_path):
    """save_model_checkpoint from 4 ranks (TP=2 x PP=2, vocab re-padded to 1280), then export."""
    c = converted("gpt2")
    resaved = tmp_path / "resaved"
    padded = run_on_ranks(_reshard_and_save, 4, ParallelConfig(2, 2), str(c["mc"]), str(resaved))
    assert {p for p in padded if p is not None} == {1280 // 2}
    assert (resaved / "latest").read_text().strip() == "iter_0000005"
    to_hf(resaved, tmp_path / "back")
    original, restored = load_hf_tensors(c["hf"]), load_hf_tensors(tmp_path / "back")
    assert sorted(original) == sorted(restored)
    assert all(torch.equal(restored[k], v) for k, v in original.items())


def test_checkpoint_layout_and_config(converted):
    from megatron_pref.checkpoint_format import read_checkpoint_metadata, read_model_config

    c = converted("qwen2")
    assert (c["mc"] / "latest").read_text().strip() == "iter_0000000"
    assert (c["mc"] / "iter_0000000" / "metadata.json").is_file()
    meta = read_checkpoint_metadata(c["mc"])
    assert meta["format_version"] == 1 and meta["source"]["model_type"] == "qwen2"
    cfg = read_model_config(c["mc"])
    assert cfg.add_qkv_bias and not cfg.untie_embeddings_and_output_weights
    assert cfg.vocab_size == 1000 and cfg.num_query_groups == 2 and cfg.rotary_base == 1000000
    assert not any(p.name.startswith(".") for p in c["mc"].parent.iterdir()), "temporary dirs left behind"


def test_te_spec_names_match_the_checkpoint_keys(converted):
    """The dist checkpoint uses Transformer Engine names (norms fused into the next linear), so
    te_key() of each local name is the key a TE-spec model loads: one checkpoint, both specs."""
    from megatron.core import dist_checkpointing

    from megatron_pref.convert.checkpoint_io import resolve_iteration_dir

    for arch in ("llama", "gpt2"):
        c = converted(arch)
        stored = set(dist_checkpointing.load_tensors_metadata(str(resolve_iteration_dir(c["mc"]))))
        from megatron_pref.checkpoint_format import read_model_config

        m = mapping_mod.mapping_for(arch, read_model_config(c["mc"]))
        wanted = {re.sub(r"layers\.\d+\.", "layers.", mapping_mod.te_key(k)) for k in m.megatron_shapes()}
        if m.tied:
            wanted.discard(mapping_mod.OUTPUT_LAYER)
        assert wanted == stored - {k for k in stored if k.endswith("_extra_state")}
        assert any(k.endswith("layer_norm_weight") for k in stored)


def test_fill_model_with_te_names():
    """fill_model writes the same values whichever spec's names the model uses."""
    from megatron_pref.convert.architectures import model_config_from_hf
    from megatron_pref.convert.hf_to_megatron import fill_model

    cfg = model_config_from_hf("gpt2", hf_config("gpt2"))
    m = mapping_mod.mapping_for("gpt2", cfg)
    g = torch.Generator().manual_seed(0)
    hf = {k: torch.randn(s, generator=g) for k, s in m.hf_shapes().items()}

    class Fake:
        def __init__(self, names):
            self.sd = {}
            for k, s in m.megatron_shapes().items():
                shape = (1152,) + tuple(s[1:]) if k in mapping_mod.VOCAB_KEYS else s
                self.sd[names(k)] = torch.full(shape, float("nan"))

        def state_dict(self):
            return self.sd

    local, te = Fake(lambda k: k), Fake(mapping_mod.te_key)
    assert fill_model(local, m, hf.__getitem__, 1100) == fill_model(te, m, hf.__getitem__, 1100)
    assert "decoder.layers.0.self_attention.linear_qkv.layer_norm_bias" in te.sd
    for k, v in local.sd.items():
        assert torch.equal(v, te.sd[mapping_mod.te_key(k)]), k
    assert torch.all(local.sd[mapping_mod.WORD_EMBEDDINGS][1100:] == 0)


def test_bf16_round_trip_is_bit_exact(tmp_path):
    hf_dir = make_hf_model(tmp_path / "hf", "qwen2", seed=3, dtype=torch.bfloat16)
    summary = to_megatron(hf_dir, tmp_path / "mc")
    assert summary["model"]["vocab_size"] == 1000
    from megatron_pref.convert.checkpoint_io import checkpoint_tensor_dtype

    assert checkpoint_tensor_dtype(tmp_path / "mc") == torch.bfloat16
    to_hf(tmp_path / "mc", tmp_path / "back")
    original, restored = load_hf_tensors(hf_dir), load_hf_tensors(tmp_path / "back")
    assert sorted(original) == sorted(restored)
    assert all(restored[k].dtype == torch.bfloat16 and torch.equal(restored[k], v) for k, v in original.items())
    assert json.loads((tmp_path / "back" / "config.json").read_text())["dtype"] == "bfloat16"


# --- negative controls: a wrong mapping must fail verification ----------------------------------

def _swapped_gate_up(gate, up):
    return torch.cat([up, gate], dim=0)


def _plain_qkv(q, k, v, groups):
    return torch.cat([q, k, v], dim=0)


@pytest.mark.parametrize("arch,attr,broken", [
    ("llama", "merge_gate_up", _swapped_gate_up),
    ("llama", "interleave_qkv", _plain_qkv),
    ("gpt2", "gpt2_qkv_to_megatron", lambda qkv, heads: qkv),
])
def test_negative_controls_fail_verification(converted, tmp_path, monkeypatch, arch, attr, broken):
    c = converted(arch)
    monkeypatch.setattr(mapping_mod, attr, broken)  # inherited by the forked converter
    to_megatron(c["hf"], tmp_path / "broken")
    result = compare_logits(mcore_logits(tmp_path / "broken", c["tokens"]), c["ref"])
    print(f"{arch} {attr}: {result.summary()}")
    assert not result.passed
    assert result.max_abs_logit_diff > 1e-2


def test_llama3_rope_scaling_matters(converted, tmp_path):
    """Negative control for the rope mapping: the same weights without Llama-3 scaling differ."""
    c = converted("llama")
    unscaled = tmp_path / "unscaled"
    shutil.copytree(c["mc"], unscaled)
    meta = json.loads((unscaled / "megatron_pref_config.json").read_text())
    meta["model"]["use_rope_scaling"] = False
    (unscaled / "megatron_pref_config.json").write_text(json.dumps(meta))
    tokens = fixed_ids(1000, n=256)
    ref = hf_logits(c["hf"], tokens)
    assert compare_logits(mcore_logits(c["mc"], tokens), ref).passed
    assert not compare_logits(mcore_logits(unscaled, tokens), ref).passed


def test_sliding_window_refused_or_exact_within_window(tmp_path, capsys):
    hf_dir = make_hf_model(tmp_path / "hf", "mistral", seed=5, sliding_window=16)
    save = tmp_path / "mc"
    assert hf_to_megatron_main(["--hf-dir", str(hf_dir), "--save", str(save)]) == 2
    err = capsys.readouterr().err
    assert "sliding_window=16" in err and "--allow-sliding-window-as-full" in err
    assert not save.exists()

    to_megatron(hf_dir, save, allow_sliding_window_as_full=True)
    inside, beyond = fixed_ids(1000, n=16), fixed_ids(1000, n=48)
    assert compare_logits(mcore_logits(save, inside), hf_logits(hf_dir, inside)).passed
    assert not compare_logits(mcore_logits(save, beyond), hf_logits(hf_dir, beyond)).passed


# --- bad input: one line, exit 2, nothing written ----------------------------------------------

def _assert_clean_error(capsys, code, save: Path, *needles):
    captured = capsys.readouterr()
    assert code == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert "Traceback" not in captured.err + captured.out
    if save.exists():
        assert save.is_dir()
    leftovers = [p for p in save.parent.iterdir() if p.name.startswith(f".{save.name}.")]
    assert not leftovers


def test_unsupported_architecture(tmp_path, capsys):
    hf_dir = tmp_path / "falcon"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text(json.dumps({"model_type": "falcon", "architectures": ["FalconForCausalLM"]}))
    save = tmp_path / "out"
    code = hf_to_megatron_main(["--hf-dir", str(hf_dir), "--save", str(save)])
    _assert_clean_error(capsys, code, save, "FalconForCausalLM", "LlamaForCausalLM", "Qwen2ForCausalLM",
                        "MistralForCausalLM", "GPT2LMHeadModel")
    assert not save.exists()


def test_missing_shard(converted, tmp_path, capsys):
    hf_dir = tmp_path / "hf"
    shutil.copytree(converted("llama")["hf"], hf_dir)
    shards = sorted(hf_dir.glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[1].unlink()
    save = tmp_path / "out"
    code = hf_to_megatron_main(["--hf-dir", str(hf_dir), "--save", str(save)])
    _assert_clean_error(capsys, code, save, shards[1].name)
    assert not save.exists()


def test_config_and_weights_disagree(converted, tmp_path, capsys):
    hf_dir = tmp_path / "hf"
    shutil.copytree(converted("mistral")["hf"], hf_dir)
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg["num_key_value_heads"] = 4  # weights hold 2 KV heads
    (hf_dir / "config.json").write_text(json.dumps(cfg))
    save = tmp_path / "out"
    code = hf_to_megatron_main(["--hf-dir", str(hf_dir), "--save", str(save)])
    _assert_clean_error(capsys, code, save, "model.layers.0.self_attn.k_proj.weight", "(32, 64)", "(64, 64)")
    assert not save.exists()


def test_extra_layer_in_weights(converted, tmp_path, capsys):
    hf_dir = tmp_path / "hf"
    shutil.copytree(converted("qwen2")["hf"], hf_dir)
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg["num_hidden_layers"] = 1
    cfg["layer_types"] = cfg["layer_types"][:1]
    (hf_dir / "config.json").write_text(json.dumps(cfg))
    save = tmp_path / "out"
    code = hf_to_megatron_main(["--hf-dir", str(hf_dir), "--save", str(save)])
    _assert_clean_error(capsys, code, save, "model.layers.1.")


def test_unsupported_rope_scaling(tmp_path, capsys):
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    cfg = hf_config("llama").to_dict()
    cfg["rope_parameters"]["low_freq_factor"] = 2.0
    (hf_dir / "config.json").write_text(json.dumps(cfg))
    save = tmp_path / "out"
    code = hf_to_megatron_main(["--hf-dir", str(hf_dir), "--save", str(save)])
    _assert_clean_error(capsys, code, save, "low_freq_factor")


def test_target_parallel_sizes_validated(converted, tmp_path, capsys):
    save = tmp_path / "out"
    code = hf_to_megatron_main(["--hf-dir", str(converted("llama")["hf"]), "--save", str(save),
                                "--target-tensor-parallel-size", "4"])
    _assert_clean_error(capsys, code, save, "--target-tensor-parallel-size 4")
    assert not save.exists()


def test_non_empty_output_needs_force(converted, tmp_path, capsys):
    hf_dir = converted("gpt2")["hf"]
    save = tmp_path / "out"
    save.mkdir()
    (save / "keep.txt").write_text("precious")
    code = hf_to_megatron_main(["--hf-dir", str(hf_dir), "--save", str(save)])
    _assert_clean_error(capsys, code, save, str(save), "--force")
    assert [p.name for p in save.iterdir()] == ["keep.txt"]

    back = tmp_path / "back"
    back.mkdir()
    (back / "x").write_text("x")
    code = megatron_to_hf_main(["--load", str(converted("gpt2")["mc"]), "--save", str(back)])
    _assert_clean_error(capsys, code, back, "--force")

    # With --force the directory is replaced (the CLI in a forked single rank).
    assert run_on_ranks(hf_to_megatron_main, 1, ParallelConfig(), ["--hf-dir", str(hf_dir), "--save", str(save),
                                                                   "--force"])[0] == 0
    assert sorted(p.name for p in save.iterdir()) == ["iter_0000000", "latest", "megatron_pref_config.json"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_cli_end_to_end_in_subprocesses(converted, tmp_path):
    """The real scripts: exit codes, one-line errors without traceback, verify's report."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    c = converted("gpt2")

    def run(script, *args):
        return subprocess.run([sys.executable, str(REPO / "tools" / script), *map(str, args)], env=env,
                              capture_output=True, text=True, timeout=300)

    bad = run("convert_hf_to_megatron.py", "--hf-dir", tmp_path / "nowhere", "--save", tmp_path / "out")
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "Traceback" not in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1

    ok = run("verify_conversion.py", "--hf-dir", c["hf"], "--load", c["mc"], "--pipeline-model-parallel-size", "2")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "argmax agreement 100.00%" in ok.stdout and "PASS" in ok.stdout

    # --atol 0 demands bit-identical logits, which two implementations do not give (~1e-6 apart).
    strict = run("verify_conversion.py", "--hf-dir", c["hf"], "--load", c["mc"], "--atol", "0")
    assert strict.returncode == 1 and "FAIL" in strict.stdout, strict.stdout + strict.stderr


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_verify_runs_on_the_ranks_torchrun_gives_it(converted, tp, pp):
    """torchrun --nproc-per-node TPxPP: torchrun's ranks are the model's (it used to fork ranks
    of its own on every rank, which waited forever for torchrun's store); one report."""
    c = converted("gpt2")
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(tp * pp),
                          str(REPO / "tools" / "verify_conversion.py"), "--hf-dir", str(c["hf"]), "--load", str(c["mc"]),
                          "--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp)],
                         env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    assert out.stdout.count("PASS") == 1 and f"TP={tp} PP={pp}" in out.stdout, out.stdout
    assert "argmax agreement 100.00%" in out.stdout


def test_synthetic_generator_writes_a_convertible_checkpoint(tmp_path):
    """The benchmark generator (docs/conversion.md) at toy size: sharded, and it passes every check."""
    from megatron_pref.convert.hf_to_megatron import plan_hf_to_megatron
    from megatron_pref.convert.synthetic import write_random_llama

    n = write_random_llama(tmp_path / "hf", hidden=64, layers=2, heads=4, kv_heads=2, ffn=128, vocab=1000,
                           max_shard_bytes=100_000)
    plan = plan_hf_to_megatron(tmp_path / "hf", tmp_path / "out")
    assert len(set(plan.reader.weight_map.values())) > 1
    assert plan.dtype == torch.bfloat16 and plan.model_cfg.num_query_groups == 2
    from megatron_pref.convert.architectures import param_count

    assert param_count(plan.model_cfg) + 5 * 64 == n  # param_count leaves out the norm weights
    assert not (tmp_path / "out").exists()
