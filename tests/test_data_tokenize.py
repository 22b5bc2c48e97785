"""Tokenizers: round trips, BOS/EOS policy, chat templates."""

import pickle

import numpy as np
import pytest

from megatron_pref.data import demo_task
from megatron_pref.data.errors import DataError
from megatron_pref.data.formats import normalize_row
from megatron_pref.data.pairs import ProcessOptions, ProcessStats, process_row
from megatron_pref.data.testing import make_tiny_hf_tokenizer
from megatron_pref.data.tokenizer import (
    HuggingFaceTokenizer,
    SentencePieceTokenizer,
    build_tokenizer,
    default_render_chat,
)


@pytest.fixture(scope="module")
def sp():
    return demo_task.demo_tokenizer()


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return make_tiny_hf_tokenizer(str(tmp_path_factory.mktemp("hf_tok")))


@pytest.fixture(scope="module")
def hf(hf_dir):
    return build_tokenizer("HuggingFaceTokenizer", hf_dir)


def test_sentencepiece_properties_and_round_trip(sp):
    assert isinstance(sp, SentencePieceTokenizer)
    assert (sp.bos_id, sp.eos_id, sp.pad_id) == (1, 2, 3)
    assert sp.vocab_size == 16
    for row in demo_task.load_demo_rows("valid")[:50]:
        for text in (row["prompt"], row["chosen"], row["prompt"] + row["rejected"]):
            ids = sp.encode(text)
            assert all(0 <= i < sp.vocab_size for i in ids)
            assert sp.decode(ids) == text
    # digits are single tokens
    assert len(sp.encode("1234")) == 4


def test_hf_properties_and_round_trip(hf):
    assert isinstance(hf, HuggingFaceTokenizer)
    assert hf.has_chat_template
    assert hf.bos_id is not None and hf.eos_id is not None and hf.pad_id is not None
    assert len({hf.bos_id, hf.eos_id, hf.pad_id}) == 3
    for text in ["hello world", " the quick brown fox 12+35=47", "Ünïcödé ok? ✓", "<|user|>hi<|end|>"]:
        assert hf.decode(hf.encode(text)) == text
    # special tokens in rendered templates are single ids
    assert len(hf.encode("<|assistant|>")) == 1


def test_tokenizer_pickles_by_spec(sp, hf):
    for t in (sp, hf):
        t2 = pickle.loads(pickle.dumps(t))
        assert type(t2) is type(t) and t2.encode("12+35=") == t.encode("12+35=")


def test_text_pair_bos_eos_policy(sp):
    ex = normalize_row({"prompt": "12+35=", "chosen": "47", "rejected": "48"})
    p, c, r = sp.tokenize_example(ex)
    assert p[0] == sp.bos_id and list(p[1:]) == sp.encode("12+35=")
    assert c[-1] == sp.eos_id and r[-1] == sp.eos_id
    assert list(c[:-1]) == sp.encode("47") and list(r[:-1]) == sp.encode("48")
    p2, c2, r2 = sp.tokenize_example(ex, add_bos=False, add_eos=False)
    assert list(p2) == sp.encode("12+35=") and list(c2) == sp.encode("47")


def test_chat_template_split(hf):
    ex = normalize_row({
        "prompt": "hi",
        "chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
        "rejected": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "go away"}],
    })
    p, c, r = hf.tokenize_example(ex)
    tok = hf.hf_tokenizer
    assert hf.decode(p) == "<s><|user|>hi<|end|><|assistant|>"
    assert p[0] == hf.bos_id and np.count_nonzero(p == hf.bos_id) == 1  # BOS from the template, not doubled
    assert hf.decode(c) == "hello<|end|></s>" and hf.decode(r) == "go away<|end|></s>"
    # prompt + response equals the template's rendering of the whole conversation (+ EOS)
    full = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}], tokenize=False)
    assert hf.decode(np.concatenate([p, c[:-1]])) == full


@pytest.fixture(scope="module")
def sp_text(tmp_path_factory):
    """A general SentencePiece model (byte fallback) trained on a few sentences."""
    import sentencepiece as spm

    d = tmp_path_factory.mktemp("sp")
    lines = ["Human: what is one plus one?", "Assistant: it is two.", "System: be nice"] * 20
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(d / "m"), vocab_size=300, byte_fallback=True,
        model_type="bpe", add_dummy_prefix=False, remove_extra_whitespaces=False,
        normalization_rule_name="identity", minloglevel=2, num_threads=1)
    return build_tokenizer("sentencepiece", str(d / "m.model"))


def test_sentencepiece_general_round_trip(sp_text):
    for text in ["\n\nHuman: hi there\n\nAssistant:", " it is two.", "Ünïcödé ✓ 123"]:
        assert sp_text.decode(sp_text.encode(text)) == text


def test_chat_rows_without_template_use_default_rendering(sp_text, tmp_path):
    sp = sp_text
    ex = normalize_row({"prompt": [{"role": "user", "content": "1+1="}], "chosen": "2", "rejected": "3"})
    p, c, r = sp.tokenize_example(ex)
    assert sp.decode(p[1:]) == default_render_chat([{"role": "user", "content": "1+1="}], True)
    assert sp.decode(p[1:]) == "\n\nHuman: 1+1=\n\nAssistant:"
    assert sp.decode(c[:-1]) == " 2"
    hf_plain = build_tokenizer("HuggingFaceTokenizer", make_tiny_hf_tokenizer(str(tmp_path / "t"), chat_template=None))
    assert not hf_plain.has_chat_template
    p, c, r = hf_plain.tokenize_example(ex)
    assert hf_plain.decode(p) == "<s>\n\nHuman: 1+1=\n\nAssistant:"


def test_bad_chat_template_is_a_data_error(tmp_path):
    # a template that renders the generation prompt differently from the assistant turn
    tmpl = ("{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
            "{% if add_generation_prompt %}[ASSISTANT]{% endif %}")
    t = build_tokenizer("HuggingFaceTokenizer", make_tiny_hf_tokenizer(str(tmp_path / "t"), chat_template=tmpl))
    with pytest.raises(DataError, match=r"x.jsonl:1: the chat template does not render the prompt"):
        process_row({"prompt": [{"role": "user", "content": "hi"}], "chosen": "a", "rejected": "b"},
                    "x.jsonl:1", t, ProcessOptions(), ProcessStats())


def test_tokenizer_path_errors(tmp_path):
    with pytest.raises(DataError, match="tokenizer model not found"):
        build_tokenizer("SentencePieceTokenizer", str(tmp_path / "nope.model"))
    with pytest.raises(DataError, match="unknown tokenizer type"):
        build_tokenizer("GPT2BPETokenizer", str(tmp_path))
    with pytest.raises(DataError, match="no tokenizer.json"):
        build_tokenizer("HuggingFaceTokenizer", str(tmp_path))
    with pytest.raises(DataError, match="expects a .model file"):
        build_tokenizer("SentencePieceTokenizer", str(tmp_path))


def test_pair_without_prompt_tokens_is_skipped(sp):
    """No prompt and no BOS: nothing predicts the first response token, so a one-token
    response would have no log-prob at all (its per-token average 0/0)."""
    stats = ProcessStats()
    row = {"prompt": "", "chosen": "12", "rejected": "13"}
    assert process_row(row, "x.jsonl:1", sp, ProcessOptions(add_bos=False), stats) is None
    assert stats.skipped["empty_prompt"] == 1 and stats.pairs == 0
    with pytest.raises(DataError, match=r"x.jsonl:1: no prompt tokens and no BOS.*\(--strict\)"):
        process_row(row, "x.jsonl:1", sp, ProcessOptions(add_bos=False, strict=True), ProcessStats())
    # Control: the same row with a BOS has a token before the response and is kept.
    kept = process_row(row, "x.jsonl:1", sp, ProcessOptions(), stats)
    assert kept is not None and kept.prompt_ids.tolist() == [sp.bos_id]


def test_hh_row_end_to_end(sp_text):
    conv = "\n\nHuman: what is one plus one?\n\nAssistant:"
    stats = ProcessStats()
    pair = process_row({"chosen": conv + " it is two.", "rejected": conv + " it is one."}, "hh.jsonl:1",
                       sp_text, ProcessOptions(), stats)
    assert sp_text.decode(pair.prompt_ids[1:]) == conv
    assert sp_text.decode(pair.chosen_ids[:-1]) == " it is two."
    assert sp_text.decode(pair.rejected_ids[:-1]) == " it is one."
    assert stats.pairs == 1 and stats.num_skipped == 0
    # identical conversations are counted, not errors (without --strict)
    assert process_row({"chosen": conv + " x", "rejected": conv + " x"}, "hh.jsonl:2", sp_text,
                       ProcessOptions(), stats) is None
    assert stats.skipped["identical"] == 1
