"""Row formats: plain text, chat messages (UltraFeedback), HH-RLHF splits, field maps."""

import pytest

from megatron_pref.data.errors import DataError, SkipPair
from megatron_pref.data.formats import normalize_row, split_common_messages, split_hh_text
from megatron_pref.data.readers import apply_field_map, iter_rows, parse_field_map, parse_jsonl_line
from megatron_pref.data.testing import write_jsonl


def u(c):
    return {"role": "user", "content": c}


def a(c):
    return {"role": "assistant", "content": c}


def test_plain_text_row_and_scores():
    ex = normalize_row({"prompt": "Q?", "chosen": " yes", "rejected": " no", "score_chosen": 8, "score_rejected": 2.5})
    assert (ex.prompt, ex.chosen, ex.rejected) == ("Q?", " yes", " no")
    assert (ex.score_chosen, ex.score_rejected) == (8.0, 2.5)
    assert not ex.is_chat


def test_hh_text_split_at_last_assistant_marker():
    conv = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: what is 2+2?\n\nAssistant:"
    p, c, r = split_hh_text(conv + " It is 4.", conv + " It is 5.")
    assert p == conv
    assert (c, r) == (" It is 4.", " It is 5.")
    # normalize_row uses it when there is no prompt field
    ex = normalize_row({"chosen": conv + " 4", "rejected": conv + " Four, I think"})
    assert ex.prompt == conv and ex.chosen == " 4" and ex.rejected == " Four, I think"


def test_hh_split_when_earlier_turns_differ_uses_last_common_marker():
    c = "\n\nHuman: a\n\nAssistant: x\n\nHuman: b\n\nAssistant: y"
    r = "\n\nHuman: a\n\nAssistant: z\n\nHuman: b\n\nAssistant: y"
    p, cc, rr = split_hh_text(c, r)
    assert p == "\n\nHuman: a\n\nAssistant:"
    assert cc.startswith(" x") and rr.startswith(" z")


def test_text_split_without_marker_backs_off_to_whitespace():
    p, c, r = split_hh_text("The answer is 47", "The answer is 48")
    assert (p, c, r) == ("The answer is", " 47", " 48")


def test_ultrafeedback_messages_with_prompt_string():
    row = {
        "prompt": "What is 2+2?",
        "chosen": [u("What is 2+2?"), a("4")],
        "rejected": [u("What is 2+2?"), a("5")],
        "score_chosen": 9.0,
        "score_rejected": 3.0,
    }
    ex = normalize_row(row)
    assert ex.is_chat
    assert ex.prompt == [u("What is 2+2?")]
    assert ex.chosen == [a("4")] and ex.rejected == [a("5")]


def test_messages_with_prompt_message_list_and_response_only():
    ex = normalize_row({"prompt": [u("hi")], "chosen": [a("hello")], "rejected": [a("go away")]})
    assert ex.prompt == [u("hi")] and ex.chosen == [a("hello")]
    # responses that repeat the prompt messages are stripped
    ex = normalize_row({"prompt": [u("hi")], "chosen": [u("hi"), a("hello")], "rejected": [u("hi"), a("bye")]})
    assert ex.prompt == [u("hi")] and ex.rejected == [a("bye")]
    # string responses next to a message prompt become assistant messages
    ex = normalize_row({"prompt": [u("hi")], "chosen": "hello", "rejected": "bye"})
    assert ex.chosen == [a("hello")]


def test_prompt_string_with_assistant_only_messages():
    ex = normalize_row({"prompt": "hi", "chosen": [a("hello")], "rejected": [a("bye")]})
    assert ex.prompt == [u("hi")]


def test_hh_messages_without_prompt_split_at_common_prefix():
    sys = {"role": "system", "content": "be nice"}
    c = [sys, u("q1"), a("a1"), u("q2"), a("good")]
    r = [sys, u("q1"), a("a1"), u("q2"), a("bad")]
    p, cc, rr = split_common_messages(c, r)
    assert p == c[:4] and cc == [a("good")] and rr == [a("bad")]
    # backs off to an assistant boundary when a user turn differs
    c2 = [u("q1"), a("a1"), u("q2"), a("x")]
    r2 = [u("q1"), a("a2"), u("q3"), a("x")]
    p, cc, rr = split_common_messages(c2, r2)
    assert p == [u("q1")] and cc == c2[1:] and rr == r2[1:]


def test_unsplittable_conversations_error():
    with pytest.raises(DataError, match="cannot split"):
        normalize_row({"chosen": [u("a"), a("b")], "rejected": [u("c"), a("d")]}, "f.jsonl:3")


def test_unknown_role_is_error():
    with pytest.raises(DataError, match=r"f.jsonl:7: unknown role 'bot'"):
        normalize_row({"prompt": [u("hi")], "chosen": [{"role": "bot", "content": "x"}], "rejected": [a("y")]},
                      "f.jsonl:7")


def test_missing_and_bad_fields_name_field_and_line():
    with pytest.raises(DataError, match=r"f.jsonl:2: missing field 'rejected'"):
        normalize_row({"prompt": "p", "chosen": "c"}, "f.jsonl:2")
    with pytest.raises(DataError, match=r"f.jsonl:2: field 'chosen' must be a string"):
        normalize_row({"prompt": "p", "chosen": 3, "rejected": "r"}, "f.jsonl:2")
    with pytest.raises(DataError, match=r"field 'score_chosen' must be a number"):
        normalize_row({"prompt": "p", "chosen": "c", "rejected": "r", "score_chosen": "high"}, "f.jsonl:2")


def test_empty_and_identical_are_skips():
    with pytest.raises(SkipPair) as e:
        normalize_row({"prompt": "p", "chosen": "  ", "rejected": "r"})
    assert e.value.reason == "empty_chosen"
    with pytest.raises(SkipPair) as e:
        normalize_row({"prompt": "p", "chosen": "c", "rejected": ""})
    assert e.value.reason == "empty_rejected"
    with pytest.raises(SkipPair) as e:
        normalize_row({"prompt": "p", "chosen": "same", "rejected": "same"})
    assert e.value.reason == "identical"


def test_field_map():
    fm = parse_field_map("question=prompt, response_j=chosen,response_k=rejected")
    assert fm == {"question": "prompt", "response_j": "chosen", "response_k": "rejected"}
    row = apply_field_map({"question": "q", "response_j": "c", "response_k": "r", "x": 1}, fm)
    assert row == {"prompt": "q", "chosen": "c", "rejected": "r", "x": 1}
    with pytest.raises(DataError, match="old=new"):
        parse_field_map("question:prompt")


def test_jsonl_line_errors():
    with pytest.raises(DataError, match=r"^f:3: malformed JSON"):
        parse_jsonl_line(b'{"a": 1,,}', "f:3")
    with pytest.raises(DataError, match=r"^f:4: invalid UTF-8"):
        parse_jsonl_line(b'{"a": "\xff"}', "f:4")
    with pytest.raises(DataError, match=r"^f:5: expected a JSON object"):
        parse_jsonl_line(b"[1, 2]", "f:5")


def test_iter_rows_jsonl_and_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"q": f"p{i}", "chosen": f"c{i}", "rejected": f"r{i}"} for i in range(5)]
    j = write_jsonl(str(tmp_path / "d.jsonl"), rows[:2] + [""] + rows[2:])  # a blank line is allowed
    got = list(iter_rows([j], "q=prompt"))
    assert [w for w, _ in got] == [f"{j}:{n}" for n in (1, 2, 4, 5, 6)]
    assert got[0][1] == {"prompt": "p0", "chosen": "c0", "rejected": "r0"}
    pq.write_table(pa.Table.from_pylist(rows), str(tmp_path / "d.parquet"))
    got = list(iter_rows([str(tmp_path / "d.parquet")], {"q": "prompt"}))
    assert got[4] == (f"{tmp_path / 'd.parquet'}:row 5", {"prompt": "p4", "chosen": "c4", "rejected": "r4"})
