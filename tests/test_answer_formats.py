"""AlpacaEval and MT-Bench answer files from the eval stage: the tools' own formats (read back
with alpaca_eval's loader), turn 2 answered after turn 1 under the chat template, FastChat's
per-category temperatures, keys by (seed, question, turn), resume without duplicates."""

import json
import os

import pytest

from montessori_jax.config import Config, load_config
from montessori_jax.errors import UserError
from montessori_jax.stages import answer_formats as af
from montessori_jax.stages import eval as ev

DATA = os.path.join(os.path.dirname(__file__), "data")
ALPACA = os.path.join(DATA, "alpaca_sample.json")
MT = os.path.join(DATA, "mt_bench_sample.jsonl")


def _cfg(folder, tmp_path, *extra):
    data = tmp_path / "eval.jsonl"
    data.write_text(json.dumps({"instruction": "is the sun warm", "response": "the sun is warm"}) + "\n")
    return load_config(Config, None, [f"student.path={folder}", f"eval.data={data}", "eval.answers=false",
                                      f"eval.alpaca_eval={ALPACA}", f"eval.mt_bench={MT}",
                                      "eval.max_new_tokens=6", *extra])


def _lines(path):
    return [json.loads(line) for line in open(path)]


def test_temperatures_follow_fastchat_and_overrides():
    assert af.mt_temperature("writing") == 0.7 and af.mt_temperature("math") == 0.0
    assert af.mt_temperature("stem") == 0.1 and af.mt_temperature("generic") == 0.7
    assert af.mt_temperature("math", {"math": 0.3}) == 0.3


def test_bad_question_file_names_the_line(tmp_path):
    bad = tmp_path / "q.jsonl"
    bad.write_text(json.dumps({"question_id": 1, "turns": ["a"]}) + "\n" + json.dumps({"question_id": 2}) + "\n")
    with pytest.raises(UserError, match=r"q.jsonl, line 2: `turns` must be"):
        af.load_mt_questions(str(bad))
    with pytest.raises(UserError, match=r"item 1: no `instruction`"):
        bad_json = tmp_path / "a.json"
        bad_json.write_text(json.dumps([{"instruction": "x"}, {"output": "y"}]))
        af.load_alpaca_prompts(str(bad_json))


def test_answer_files_formats_turns_keys_and_resume(tiny_checkpoint, tmp_path):
    from alpaca_eval.utils import get_generator_name, load_or_convert_to_dataframe

    from montessori_jax.core import text
    from montessori_jax.kernels.sampler import SamplingParams
    from montessori_jax.stages.generate import generate_jsonl

    folder, _ = tiny_checkpoint
    out = tmp_path / "out"
    s = ev.run_eval(_cfg(folder, tmp_path), str(out), progress=False)["models"]["student"]

    # AlpacaEval: read with alpaca_eval's own loader
    outputs = out / "alpaca_eval" / "model_outputs.json"
    df = load_or_convert_to_dataframe(str(outputs))
    assert list(df["instruction"]) == [r["instruction"] for r in json.load(open(ALPACA))]
    assert set(df.columns) == {"instruction", "output", "generator", "dataset"}
    assert list(df["dataset"]) == ["montessori_sample", "montessori_sample", "helpful_base"]
    assert get_generator_name(None, df) == "student"
    assert s["alpaca_eval"]["rows"] == 3 and sum(s["alpaca_eval"]["finish"].values()) == 3

    # MT-Bench: FastChat's answer rows, both turns, temperatures by category
    answers = _lines(out / "mt_bench" / "model_answer" / "student.jsonl")
    assert [a["question_id"] for a in answers] == [9001, 9002, 9003]
    for a in answers:
        assert set(a) == {"question_id", "answer_id", "model_id", "choices", "tstamp"}
        assert a["model_id"] == "student" and len(a["choices"]) == 1 and a["choices"][0]["index"] == 0
        assert len(a["choices"][0]["turns"]) == 2 and all(isinstance(t, str) for t in a["choices"][0]["turns"])
    assert s["mt_bench"]["temperatures"] == {"writing": 0.7, "math": 0.0, "reasoning": 0.0}

    # turn 2 of a greedy (math) question is the answer to turn 1 + its answer + turn 2
    q = af.load_mt_questions(MT)[1]
    turns = answers[1]["choices"][0]["turns"]
    conv = [{"role": "user", "content": q["turns"][0]}, {"role": "assistant", "content": turns[0]},
            {"role": "user", "content": q["turns"][1]}]
    inp = tmp_path / "turn2.jsonl"
    inp.write_text(json.dumps({"id": 0, "messages": conv}) + "\n")
    generate_jsonl(folder, str(tmp_path / "turn2_out.jsonl"), SamplingParams(temperature=0.0, max_new_tokens=6),
                   input_path=str(inp), tokenizer=text.load_tokenizer(folder), progress=False)
    assert _lines(tmp_path / "turn2_out.jsonl")[0]["text"].strip() == turns[1]

    # keys by (seed, question, turn): another batch size gives the same sampled answers
    other = ev.run_eval(_cfg(folder, tmp_path, "eval.answer_batch_size=1"), str(tmp_path / "other"), progress=False)
    again = _lines(tmp_path / "other" / "mt_bench" / "model_answer" / "student.jsonl")
    assert [a["choices"] for a in again] == [a["choices"] for a in answers]
    assert other["models"]["student"]["alpaca_eval"]["rows"] == 3
    assert json.load(open(tmp_path / "other" / "alpaca_eval" / "model_outputs.json")) == json.load(open(outputs))

    # a kill mid-file: the partial answers are cut in a line, the final files not yet written
    partial = out / "mt_bench" / "model_answer" / "student.partial.jsonl"
    raw = partial.read_bytes()
    cut = raw.index(b"\n", raw.index(b"\n") + 1) + 1  # two full rows, then half a row
    partial.write_bytes(raw[: cut + 15])
    os.remove(out / "mt_bench" / "model_answer" / "student.jsonl")
    resumed = ev.run_eval(_cfg(folder, tmp_path), str(out), progress=False)["models"]["student"]
    assert resumed["mt_bench"]["written"] == 4 and resumed["alpaca_eval"]["written"] == 0
    assert len(_lines(partial)) == 6
    after = _lines(out / "mt_bench" / "model_answer" / "student.jsonl")
    assert [a["choices"] for a in after] == [a["choices"] for a in answers]

    # other settings on the same folder: an error naming the file, which stays
    with pytest.raises(UserError, match="student.jsonl: written with another model"):
        ev.run_eval(_cfg(folder, tmp_path, "eval.mt_bench_temperatures={writing: 0.1}"), str(out), progress=False)
    assert len(_lines(out / "mt_bench" / "model_answer" / "student.jsonl")) == 3
