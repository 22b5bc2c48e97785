"""The bundled demo task: verifiable answers, held-out splits, shipped assets."""

import json
import random

from megatron_pref.data import demo_task
from megatron_pref.data.datasets import InMemoryPreferenceDataset


def test_shipped_splits_match_generator_and_are_disjoint():
    gen = demo_task.generate_splits()
    prompts = {}
    for split, n in demo_task.SPLIT_SIZES.items():
        rows = demo_task.load_demo_rows(split)
        assert len(rows) == n
        assert rows == gen[split]  # shipped files are exactly what the generator makes
        prompts[split] = {r["prompt"] for r in rows}
        assert len(prompts[split]) == n
    assert not prompts["train"] & prompts["test"]
    assert not prompts["train"] & prompts["valid"]
    assert not prompts["valid"] & prompts["test"]


def test_answers_are_verifiable():
    kinds = set()
    for split in demo_task.SPLIT_SIZES:
        for r in demo_task.load_demo_rows(split):
            assert demo_task.is_correct(r["prompt"], r["chosen"])
            assert not demo_task.is_correct(r["prompt"], r["rejected"])
            a, b = demo_task.parse_prompt(r["prompt"])
            s, w = a + b, int(r["rejected"])
            assert w >= 0 and w != s
            if r["kind"] == "off_by_one":
                assert abs(w - s) == 1
            elif r["kind"] == "carry":
                assert abs(w - s) == 10
            else:
                assert r["kind"] == "digit_swap" and w == int(str(s)[::-1])
            kinds.add(r["kind"])
    assert kinds == set(demo_task.REJECTED_KINDS)


def test_is_correct_and_accuracy():
    assert demo_task.is_correct("12+35=", "47")
    assert demo_task.is_correct("12+35=", " 47 ")
    assert not demo_task.is_correct("12+35=", "047")
    assert not demo_task.is_correct("12+35=", "48")
    assert not demo_task.is_correct("12+35=", "")
    assert not demo_task.is_correct("hello", "47")
    assert demo_task.correct_answer("99+99=") == "198"
    assert demo_task.exact_match_accuracy(["1+1=", "2+2="], ["2", "5"]) == 0.5
    rng = random.Random(0)
    for _ in range(200):
        a, b = rng.randrange(100), rng.randrange(100)
        row = demo_task.make_pair(a, b, rng)
        assert demo_task.is_correct(row["prompt"], row["chosen"])
        assert not demo_task.is_correct(row["prompt"], row["rejected"])


def test_shipped_tokenizer_is_reproducible_and_fits():
    gen = demo_task.generate_splits()
    model = demo_task.train_tokenizer(gen["train"] + gen["valid"])
    assert model == open(demo_task.demo_tokenizer_path(), "rb").read()
    tok = demo_task.demo_tokenizer()
    ds = demo_task.load_demo_dataset("test")
    assert isinstance(ds, InMemoryPreferenceDataset) and len(ds) == 200 and ds.has_scores
    for i in range(len(ds)):
        pair = ds[i]
        assert pair.prompt_ids[0] == tok.bos_id and pair.chosen_ids[-1] == tok.eos_id
        assert pair.num_tokens <= 2 * 8 + 5 + 5
        row = demo_task.load_demo_rows("test")[i] if i < 3 else None
        if row:
            assert tok.decode(pair.chosen_ids[:-1]) == row["chosen"]


def test_build_assets_writes_everything(tmp_path):
    paths = demo_task.build_assets(str(tmp_path))
    assert set(paths) == {"train", "valid", "test", "tokenizer"}
    with open(paths["test"]) as f:
        first = json.loads(f.readline())
    assert first == demo_task.load_demo_rows("test")[0]
