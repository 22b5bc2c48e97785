"""tools/preprocess_pref_data.py: IndexedDataset round trip, summaries, and every bad-input case
(message, exit status, nothing written)."""

import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from megatron_pref.data import demo_task
from megatron_pref.data.datasets import InMemoryPreferenceDataset
from megatron_pref.data.testing import make_tiny_hf_tokenizer, write_jsonl
from megatron_pref.data.tokenizer import build_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "preprocess_pref_data.py")
SP_MODEL = os.path.join(ROOT, "megatron_pref", "assets", "demo", "tokenizer.model")


def run_tool(*args, workers=1):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env.pop("PREF_DATA_DEBUG", None)
    cmd = [sys.executable, TOOL, "--workers", str(workers), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120, cwd=ROOT)


def sp_args(inp, prefix, *extra):
    return ["--input", inp, "--output-prefix", prefix, "--tokenizer-type", "SentencePieceTokenizer",
            "--tokenizer-model", SP_MODEL, *extra]


def assert_one_line_error(res, *fragments):
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert "Traceback" not in res.stderr
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


def assert_nothing_written(prefix):
    left = glob.glob(prefix + "*")
    assert left == [], left


GOOD = [{"prompt": "12+35=", "chosen": "47", "rejected": "48"}, {"prompt": "1+1=", "chosen": "2", "rejected": "3"}]


# --------------------------------------------------------------------------- round trips
def test_round_trip_sentencepiece_jsonl_with_skips(tmp_path):
    rows = demo_task.load_demo_rows("valid")[:60]
    bad = [
        {"prompt": "1+2=", "chosen": "", "rejected": "4"},  # empty chosen
        {"prompt": "1+2=", "chosen": "3", "rejected": "3"},  # identical
        {"prompt": "1+2=", "chosen": "3", "rejected": "  "},  # empty rejected
        {"prompt": "9" * 40 + "+1=", "chosen": "3", "rejected": "4"},  # too long for --seq-length 64
    ]
    inp = write_jsonl(str(tmp_path / "in.jsonl"), rows[:10] + bad + rows[10:])
    prefix = str(tmp_path / "out" / "ds")
    res = run_tool(*sp_args(inp, prefix, "--seq-length", "64", "--chunk-size", "7"), workers=2)
    assert res.returncode == 0, res.stderr
    assert "wrote 60 pairs" in res.stdout and "pairs/s" in res.stdout
    assert "empty_chosen=1" in res.stdout and "empty_rejected=1" in res.stdout
    assert "identical=1" in res.stdout and "too_long=1" in res.stdout
    assert sorted(os.listdir(tmp_path / "out")) == ["ds.bin", "ds.idx", "ds.meta.json", "ds.pairs.npy"]

    from megatron_pref.data.datasets import PreferenceDataset

    ds = PreferenceDataset(prefix)
    tok = demo_task.demo_tokenizer()
    ref = InMemoryPreferenceDataset.from_files([inp], tok, seq_length=64)
    assert len(ds) == len(ref) == 60
    assert np.array_equal(ds.lengths(), ref.lengths())
    for i in range(60):
        a, b = ds[i], ref[i]
        assert a.pair_id == i
        for x, y in ((a.prompt_ids, b.prompt_ids), (a.chosen_ids, b.chosen_ids), (a.rejected_ids, b.rejected_ids)):
            assert np.array_equal(np.asarray(x, np.int64), np.asarray(y, np.int64))
        assert (a.score_chosen, a.score_rejected) == (1.0, 0.0)
        # decode back to the source text
        assert tok.decode(a.prompt_ids[1:]) == rows[i]["prompt"]
        assert tok.decode(a.chosen_ids[:-1]) == rows[i]["chosen"]
    meta = json.load(open(prefix + ".meta.json"))
    assert meta["num_pairs"] == 60 and meta["token_dtype"] == "uint16" and meta["has_scores"]
    assert meta["stats"]["skipped"]["identical"] == 1 and meta["tokenizer"]["vocab_size"] == tok.vocab_size
    assert ds.pairs["source_row"][10] == 15  # rows 11..14 were skipped
    ds.check_tokenizer(tok)

    # training reads it through the loader (memory-mapped, no tokenizer involved)
    from megatron_pref.data.packing import PackedPairLoader

    packs = PackedPairLoader(ds, 64, 20, pad_multiple=16).next_global_batch()
    assert sum(p.num_pairs for p in packs) == 20 and all(p.pack_length % 16 == 0 for p in packs)


def test_round_trip_parquet_chat_hf_field_map(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    hf_dir = make_tiny_hf_tokenizer(str(tmp_path / "tok"))
    u = lambda c: {"role": "user", "content": c}  # noqa: E731
    a = lambda c: {"role": "assistant", "content": c}  # noqa: E731
    rows = [
        {"question": f"q{i}", "good": [u(f"q{i}"), a(f"yes {i}")], "bad": [u(f"q{i}"), a(f"no {i}")],
         "score_chosen": float(i), "score_rejected": None}
        for i in range(12)
    ]
    inp = str(tmp_path / "uf.parquet")
    pq.write_table(pa.Table.from_pylist(rows), inp)
    prefix = str(tmp_path / "uf")
    res = run_tool("--input", inp, "--output-prefix", prefix, "--tokenizer-type", "HuggingFaceTokenizer",
                   "--tokenizer-model", hf_dir, "--data-field-map", "question=prompt,good=chosen,bad=rejected")
    assert res.returncode == 0, res.stderr
    from megatron_pref.data.datasets import PreferenceDataset

    ds = PreferenceDataset(prefix)
    tok = build_tokenizer("HuggingFaceTokenizer", hf_dir)
    assert len(ds) == 12 and ds.has_scores
    assert tok.decode(ds[3].prompt_ids) == "<s><|user|>q3<|end|><|assistant|>"
    assert tok.decode(ds[3].chosen_ids) == "yes 3<|end|></s>"
    assert ds[3].score_chosen == 3.0 and ds[3].score_rejected is None


# --------------------------------------------------------------------------- bad input
def test_malformed_json_names_file_and_line(tmp_path):
    inp = write_jsonl(str(tmp_path / "d.jsonl"), GOOD + ['{"prompt": "x", "chosen": "1" "rejected": "2"}'])
    prefix = str(tmp_path / "o")
    assert_one_line_error(run_tool(*sp_args(inp, prefix)), f"{inp}:3: malformed JSON")
    assert_nothing_written(prefix)


def test_invalid_utf8_names_line(tmp_path):
    inp = write_jsonl(str(tmp_path / "d.jsonl"), [GOOD[0], b'{"prompt": "1+1=", "chosen": "\xff\xfe", "rejected": "3"}'])
    prefix = str(tmp_path / "o")
    assert_one_line_error(run_tool(*sp_args(inp, prefix)), f"{inp}:2: invalid UTF-8")
    assert_nothing_written(prefix)


def test_missing_field_names_field_and_line(tmp_path):
    inp = write_jsonl(str(tmp_path / "d.jsonl"), GOOD + [{"prompt": "1+1=", "chosen": "2"}])
    prefix = str(tmp_path / "o")
    assert_one_line_error(run_tool(*sp_args(inp, prefix)), f"{inp}:3:", "missing field 'rejected'")
    assert_nothing_written(prefix)


def test_renamed_field_without_map_names_field_and_line(tmp_path):
    inp = write_jsonl(str(tmp_path / "d.jsonl"), [{"prompt": "1+1=", "response_j": "2", "response_k": "3"}])
    prefix = str(tmp_path / "o")
    msg = assert_one_line_error(run_tool(*sp_args(inp, prefix)), f"{inp}:1:", "missing field 'chosen'")
    assert "--data-field-map" in msg
    assert_nothing_written(prefix)


def test_parquet_missing_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    inp = str(tmp_path / "d.parquet")
    pq.write_table(pa.Table.from_pylist([{"prompt": "1+1=", "chosen": "2"}]), inp)
    prefix = str(tmp_path / "o")
    assert_one_line_error(run_tool(*sp_args(inp, prefix)), inp, "missing field 'rejected'")
    assert_nothing_written(prefix)


def test_unknown_role(tmp_path):
    row = {"prompt": [{"role": "user", "content": "1+1="}], "chosen": [{"role": "robot", "content": "2"}],
           "rejected": "3"}
    inp = write_jsonl(str(tmp_path / "d.jsonl"), [GOOD[0], row])
    prefix = str(tmp_path / "o")
    assert_one_line_error(run_tool(*sp_args(inp, prefix)), f"{inp}:2:", "unknown role 'robot'")
    assert_nothing_written(prefix)


@pytest.mark.parametrize("row,reason", [
    ({"prompt": "1+1=", "chosen": "", "rejected": "3"}, "empty chosen"),
    ({"prompt": "1+1=", "chosen": "2", "rejected": ""}, "empty rejected"),
    ({"prompt": "1+1=", "chosen": "2", "rejected": "2"}, "identical"),
])
def test_strict_turns_skips_into_errors(tmp_path, row, reason):
    inp = write_jsonl(str(tmp_path / "d.jsonl"), GOOD + [row])
    prefix = str(tmp_path / "o")
    assert_one_line_error(run_tool(*sp_args(inp, prefix, "--strict")), f"{inp}:3:", reason, "--strict")
    assert_nothing_written(prefix)


def test_missing_tokenizer_is_checked_before_any_work(tmp_path):
    inp = write_jsonl(str(tmp_path / "d.jsonl"), ["not json at all"])
    prefix = str(tmp_path / "sub" / "o")
    res = run_tool("--input", inp, "--output-prefix", prefix, "--tokenizer-type", "SentencePieceTokenizer",
                   "--tokenizer-model", str(tmp_path / "missing.model"))
    assert_one_line_error(res, "tokenizer model not found", "missing.model")
    assert not os.path.exists(tmp_path / "sub")
    res = run_tool("--input", inp, "--output-prefix", prefix, "--tokenizer-type", "HuggingFaceTokenizer",
                   "--tokenizer-model", str(tmp_path / "no_dir"))
    assert_one_line_error(res, "tokenizer model not found")


def test_usage_and_input_errors_are_one_line(tmp_path):
    assert_one_line_error(run_tool("--input", "x.jsonl"), "required")
    assert_one_line_error(run_tool(*sp_args(str(tmp_path / "nope.jsonl"), str(tmp_path / "o"))), "input file not found")
    txt = tmp_path / "d.txt"
    txt.write_text("x")
    assert_one_line_error(run_tool(*sp_args(str(txt), str(tmp_path / "o"))), "unknown input format")
    inp = write_jsonl(str(tmp_path / "d.jsonl"), GOOD)
    assert_one_line_error(run_tool(*sp_args(inp, str(tmp_path / "o"), "--seq-length", "16",
                                            "--max-prompt-length", "8")), "max-prompt-length")
    assert_one_line_error(run_tool(*sp_args(inp, str(tmp_path / "o"), "--data-field-map", "a:b")), "old=new")
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    assert_one_line_error(run_tool(*sp_args(inp, str(a_file / "o"))), f"--output-prefix {a_file}/o: {a_file} is not a directory")
    all_bad = write_jsonl(str(tmp_path / "e.jsonl"), [{"prompt": "1", "chosen": "2", "rejected": "2"}])
    assert_one_line_error(run_tool(*sp_args(all_bad, str(tmp_path / "o"))), "no usable pairs")
    assert_nothing_written(str(tmp_path / "o"))


def test_error_after_pairs_were_written_leaves_nothing(tmp_path):
    # many good rows in small chunks, with workers: some chunks are written before the bad line
    rows = demo_task.load_demo_rows("valid")[:40] + ['{"prompt": oops}']
    inp = write_jsonl(str(tmp_path / "d.jsonl"), rows)
    prefix = str(tmp_path / "o")
    # an older complete dataset under the same prefix stays untouched
    from megatron_pref.data.datasets import PreferenceDatasetWriter

    tok = demo_task.demo_tokenizer()
    writer = PreferenceDatasetWriter(prefix, tok.vocab_size)
    for p in InMemoryPreferenceDataset.from_files([write_jsonl(str(tmp_path / "old.jsonl"), GOOD)], tok):
        writer.add(p)
    writer.finalize({})
    before = {p: open(p, "rb").read() for p in glob.glob(prefix + "*")}
    res = run_tool(*sp_args(inp, prefix, "--chunk-size", "4"), workers=2)
    assert_one_line_error(res, f"{inp}:41: malformed JSON")
    after = {p: open(p, "rb").read() for p in glob.glob(prefix + "*")}
    assert after == before  # no temp files left, nothing replaced
