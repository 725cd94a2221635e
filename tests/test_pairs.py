"""Instruction/response pairs from JSONL (plain, Alpaca, chat messages) and HF datasets."""

import json

import pytest

from montessori_jax.errors import UserError
from montessori_jax.stages.pairs import load_pairs


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_formats(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [
        {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
        {"instruction": "Say hi.", "response": "Hi!", "id": "x"},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello."}]},
    ])
    a, b, c = load_pairs(path)
    assert a.prompt == "Add the numbers.\n\n2 and 3" and a.response == "5"
    assert b.id == "x" and b.where == f"{path}, line 2"
    assert c.prompt == ({"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"})
    assert c.response == "Hello."


def test_field_mapping_and_errors(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [{"q": "Why?", "a": "Because."}, {"q": "How?"}])
    with pytest.raises(UserError, match=r"d\.jsonl, line 2: no `a` \(or `output`\) text"):
        load_pairs(path, prompt_field="q", response_field="a")
    ok = _jsonl(tmp_path / "ok.jsonl", [{"q": "Why?", "a": "Because."}])
    assert load_pairs(ok, prompt_field="q", response_field="a")[0].prompt == "Why?"
    with pytest.raises(UserError, match="line 1: the last message must be the assistant's answer"):
        load_pairs(_jsonl(tmp_path / "m.jsonl", [{"messages": [{"role": "user", "content": "x"}]}]))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(UserError, match="empty.jsonl: no rows"):
        load_pairs(str(tmp_path / "empty.jsonl"))


def test_saved_hf_dataset(tmp_path):
    import datasets
    ds = datasets.Dataset.from_list([{"instruction": "Name a color.", "response": "Blue."}] * 3)
    ds.save_to_disk(str(tmp_path / "ds"))
    pairs = load_pairs(str(tmp_path / "ds"))
    assert len(pairs) == 3 and pairs[0].response == "Blue." and pairs[2].where.endswith("row 2")
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "dd"))
    assert len(load_pairs(str(tmp_path / "dd"), split="test")) == 1
