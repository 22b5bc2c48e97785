"""The full path: Hugging Face -> megatron-core -> pretrain_pref.py --load (no architecture
flags, TP=2) -> Hugging Face again, loadable by transformers."""

import json
import math
import os
import random

import pytest
import torch

from megatron_pref.arguments import parse_run_config
from megatron_pref.model import ParallelConfig
from tests.test_convert import load_hf_tensors, make_hf_model, to_hf, to_megatron

WORDS = ("The quick brown fox jumps over the lazy dog . Preference optimisation compares a chosen and a "
         "rejected answer to the same prompt").split()


def _pairs_file(path, rows, seed):
    rng = random.Random(seed)

    def sentence(n):
        return " ".join(rng.choice(WORDS) for _ in range(n))

    with open(path, "w") as f:
        for _ in range(rows):
            f.write(json.dumps({"prompt": sentence(6), "chosen": sentence(4), "rejected": sentence(5)}) + "\n")
    return str(path)


def _train(argv):
    from megatron_pref.training import train

    return train(parse_run_config(argv))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # GQA + untied; learned positions + tied
def test_converted_checkpoint_trains_and_converts_back(distributed, tmp_path, arch):
    hf_dir = make_hf_model(tmp_path / "hf", arch, tokenizer=True)
    to_megatron(hf_dir, tmp_path / "mc")
    # No architecture and no tokenizer flags: both come with the converted checkpoint.
    argv = ["--loss", "dpo", "--load", str(tmp_path / "mc"), "--tensor-model-parallel-size", "2",
            "--data-path", _pairs_file(tmp_path / "train.jsonl", 32, 0),
            "--valid-data-path", _pairs_file(tmp_path / "valid.jsonl", 16, 1),
            "--seq-length", "64", "--global-batch-size", "8", "--train-iters", "2", "--lr", "1e-3",
            "--log-interval", "1", "--no-progress-bar", "--save", str(tmp_path / "trained")]
    result = distributed(_train, 2, ParallelConfig(), argv, init_parallel=False)[0]
    # The reference is the converted checkpoint itself: DPO starts at ln 2.
    assert abs(result["eval_before"]["eval/loss"] - math.log(2)) < 1e-6
    assert result["iteration"] == 2

    to_hf(tmp_path / "trained", tmp_path / "hf_out")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf_out"))
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "hf_out"))
    ids = torch.tensor([tokenizer.encode("The quick brown fox")])
    assert torch.isfinite(model(ids).logits).all()
    before, after = load_hf_tensors(hf_dir), load_hf_tensors(tmp_path / "hf_out")
    assert set(before) == set(after)
    changed = [name for name in before if not torch.equal(before[name], after[name])]
    assert changed, "training must change the weights"


def _user_commands(commands, forget_provenance):
    """The user's commands, in order, in this forked process: ``(tool, argv)`` with tool one of
    the converters' mains or pretrain_pref's. ``forget_provenance``: the negative control, a
    save that does not carry the --load checkpoint's source (as before it was carried)."""
    from megatron_pref import checkpointing
    from megatron_pref.convert import cli
    from megatron_pref.parallel import free_port
    from tests.test_inputs import _pretrain_main

    if forget_provenance:
        checkpointing.read_provenance = lambda load_dir: checkpointing.Provenance({})
        import megatron_pref.training as training

        training.read_provenance = checkpointing.read_provenance
    mains = {"hf_to_megatron": cli.hf_to_megatron_main, "megatron_to_hf": cli.megatron_to_hf_main,
             "pretrain_pref": _pretrain_main()}
    codes = []
    for tool, argv in commands:
        os.environ["MASTER_PORT"] = str(free_port())  # a fresh rendezvous for each command
        codes.append(mains[tool](argv))
    return codes


@pytest.mark.parametrize("forget_provenance", [False, True])
def test_export_after_training_keeps_the_source_models_special_tokens(distributed, tmp_path, forget_provenance):
    """Issue 16 item 1: an HF Llama with bos 5 / eos 7 converted to A, trained --load A --save B,
    resumed --load B --save B, exported from B: config.json keeps bos 5 / eos 7 (Hugging Face's
    defaults would be 1 / 2), and B keeps A's tokenizer. Control: a save that forgets the
    provenance exports without them."""
    hf_dir = make_hf_model(tmp_path / "hf", "llama", tokenizer=True, bos_token_id=5, eos_token_id=7)
    a, b, out = tmp_path / "A", tmp_path / "B", tmp_path / "hf_out"
    data = ["--data-path", _pairs_file(tmp_path / "train.jsonl", 16, 0), "--seq-length", "64",
            "--global-batch-size", "4", "--lr", "1e-3", "--no-progress-bar", "--ref-cache-dir", str(tmp_path / "c")]
    commands = [("hf_to_megatron", ["--hf-dir", str(hf_dir), "--save", str(a)]),
                ("pretrain_pref", ["--loss", "dpo", "--load", str(a), "--save", str(b), "--train-iters", "1", *data]),
                ("pretrain_pref", ["--loss", "dpo", "--load", str(b), "--save", str(b), "--train-iters", "2",
                                   "--override-opt_param-scheduler", *data]),
                ("megatron_to_hf", ["--load", str(b), "--save", str(out)])]
    codes = distributed(_user_commands, 1, ParallelConfig(), commands, forget_provenance, init_parallel=False)[0]
    assert codes == [0, 0, 0, 0]
    assert (b / "latest").read_text().strip() == "iter_0000002"
    config = json.loads((out / "config.json").read_text())
    special = (config.get("bos_token_id"), config.get("eos_token_id"))
    if forget_provenance:
        assert special != (5, 7)
        return
    assert special == (5, 7)
    assert json.loads((b / "megatron_pref_config.json").read_text())["source"]["hf_dir"] == str(hf_dir.absolute())
    assert sorted(p.name for p in (b / "tokenizer").iterdir()) == sorted(p.name for p in (a / "tokenizer").iterdir())
