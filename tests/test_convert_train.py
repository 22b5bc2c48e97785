"""The full path: Hugging Face -> megatron-core -> pretrain_pref.py --load (no architecture
flags, TP=2) -> Hugging Face again, loadable by transformers."""

import json
import math
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
