"""GRPODataset: the three JSONL formats, list input, chat template on/off, truncation, errors with line numbers."""

import json

import pytest

from grpo_kernels.trainer.demo import build_tokenizer
from grpo_kernels.trainer import DatasetFormatError, GRPODataset


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def chat_tok():
    return build_tokenizer(chat_template=True)


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def test_online_rows(tmp_path, tok):
    p = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "12=", "answer": "12"}, {"prompt": "345=", "answer": 345}])
    ds = GRPODataset(p, tok, num_samples=4)
    assert len(ds) == 2 and ds.kind == "online" and not ds.offline
    r = ds[1]
    bos = tok.bos_token_id
    assert r["prompt_ids"] == [bos] + [tok.convert_tokens_to_ids(c) for c in "345="]
    assert r["answer"] == 345 and r["prompt"] == "345="
    assert "response_ids" not in r and "rewards" not in r


def test_offline_rows_with_and_without_rewards(tmp_path, tok):
    rows = [{"prompt": "1=", "responses": ["1", "22"], "rewards": [1, 0.5]}]
    ds = GRPODataset(write_jsonl(tmp_path / "a.jsonl", rows), tok, num_samples=2)
    assert ds.kind == "offline_rewards" and ds.offline
    eos, one, two = tok.eos_token_id, tok.convert_tokens_to_ids("1"), tok.convert_tokens_to_ids("2")
    assert ds[0]["response_ids"] == [[one, eos], [two, two, eos]]
    assert ds[0]["rewards"] == [1.0, 0.5] and ds[0]["responses"] == ["1", "22"]
    ds2 = GRPODataset([{"prompt": "1=", "responses": ["1", "22"]}], tok, num_samples=2, append_eos=False)
    assert ds2.kind == "offline" and ds2[0]["response_ids"] == [[one], [two, two]] and "rewards" not in ds2[0]


def test_chat_template_on_and_off(chat_tok):
    rows = [{"prompt": "12="}]
    on = GRPODataset(rows, chat_tok, num_samples=2)
    off = GRPODataset(rows, chat_tok, num_samples=2, use_chat_template=False)
    assert on[0]["prompt"] == "<bos>user: 12=\nassistant: "
    ids = on[0]["prompt_ids"]
    assert ids[0] == chat_tok.bos_token_id and ids.count(chat_tok.bos_token_id) == 1  # template wrote the only <bos>
    assert chat_tok.decode(ids) == on[0]["prompt"]
    assert off[0]["prompt"] == "12=" and off[0]["prompt_ids"] == chat_tok("12=")["input_ids"]
    msgs = GRPODataset([{"prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "1"}]}],
                       chat_tok, num_samples=2)
    assert msgs[0]["prompt"] == "<bos>system: be brief\nuser: 1\nassistant: "


def test_no_template_tokenizer_ignores_flag(tok):
    ds = GRPODataset([{"prompt": "12="}], tok, num_samples=2, use_chat_template=True)
    assert ds[0]["prompt"] == "12=" and not ds.use_chat_template
    with pytest.raises(DatasetFormatError, match="line 1: 'prompt' is a list of messages"):
        GRPODataset([{"prompt": [{"role": "user", "content": "1"}]}], tok, num_samples=2)


def test_truncation(tok):
    ds = GRPODataset([{"prompt": "1234567890="}], tok, num_samples=1, max_length=6)
    assert ds[0]["prompt_ids"] == tok("1234567890=")["input_ids"][-5:] and ds.num_truncated == 1
    off = GRPODataset([{"prompt": "12345678=", "responses": ["123456789"]}], tok, num_samples=1, max_length=10)
    r = off[0]
    assert len(r["prompt_ids"]) == 5 and len(r["response_ids"][0]) == 5
    assert r["response_ids"][0] == tok("12345", add_special_tokens=False)["input_ids"]  # cut from the right, no eos
    assert off.num_truncated == 1


@pytest.mark.parametrize("line, match", [
    ('{"prompt": "1=", "answer": 1', "line 2: invalid JSON"),
    ('[1, 2]', "line 2: expected a JSON object"),
    ('{"answer": 3}', "line 2: missing 'prompt'"),
    ('{"prompt": ""}', "line 2: 'prompt' must be a non-empty string"),
    ('{"prompt": "1=", "responses": ["1"]}', "line 2: 'responses' has 1 entries, expected num_samples=2"),
    ('{"prompt": "1=", "responses": ["1", 2]}', "line 2: 'responses' must be a list of strings"),
    ('{"prompt": "1=", "responses": ["1", "2"], "rewards": [1]}', "line 2: 'rewards' must be a list of 2"),
    ('{"prompt": "1=", "responses": ["1", "2"], "rewards": [1, NaN]}', "line 2: 'rewards' must be a list of 2"),
    ('{"prompt": "1=", "rewards": [1, 0]}', "line 2: 'rewards' given without 'responses'"),
])
def test_malformed_line_names_file_and_line(tmp_path, tok, line, match):
    good = '{"prompt": "1=", "responses": ["1", "2"], "rewards": [1, 0]}' if "responses" in line or "rewards" in line \
        else '{"prompt": "1=", "answer": 1}'
    p = write_jsonl(tmp_path / "bad.jsonl", [good, line, good])
    with pytest.raises(DatasetFormatError, match=match) as e:
        GRPODataset(p, tok, num_samples=2)
    assert str(e.value).startswith(p)


def test_skip_invalid_reports_count(tmp_path, tok):
    p = write_jsonl(tmp_path / "mixed.jsonl", ['{"prompt": "1="}', "not json", "", '{"x": 1}', '{"prompt": "2="}'])
    ds = GRPODataset(p, tok, num_samples=2, skip_invalid=True)
    assert len(ds) == 2 and ds.num_skipped == 2
    assert [line for line, _ in ds.skipped] == [2, 4]
    assert "skipped=2" in repr(ds)


def test_mixed_formats_and_empty_are_errors(tmp_path, tok):
    with pytest.raises(DatasetFormatError, match="mix formats"):
        GRPODataset([{"prompt": "1="}, {"prompt": "2=", "responses": ["a", "b"]}], tok, num_samples=2)
    with pytest.raises(DatasetFormatError, match="no usable rows"):
        GRPODataset(write_jsonl(tmp_path / "e.jsonl", ["", "  "]), tok)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        GRPODataset(str(tmp_path / "missing.jsonl"), tok)
    with pytest.raises(ValueError, match="num_samples"):
        GRPODataset([{"prompt": "1="}], tok, num_samples=0)
    with pytest.raises(TypeError, match="data_path"):
        GRPODataset(3, tok)
