"""The eval stage: reference-answer NLL against transformers, answers and resume, the overlap
check against D_ref and the seed pool, the packaged eval set, the table and plot, the CLI."""

import fnmatch
import json
import math
import os
import warnings

import numpy as np
import pytest
import tomllib
import torch

from montessori_jax.cli import main
from montessori_jax.config import Config, load_config
from montessori_jax.core import text
from montessori_jax.errors import UserError
from montessori_jax.files import PACKAGED_REFERENCE, PACKAGED_SEED_POOL
from montessori_jax.stages import data as data_lib
from montessori_jax.stages import eval as ev
from montessori_jax.stages.pairs import load_pairs
from montessori_jax.stages.synthesis.seeds import load_seed_pool

ROOT = os.path.join(os.path.dirname(__file__), "..")

# answers of different lengths, so the token mean and the mean of row means differ
ROWS = [
    {"instruction": "the cat sat", "response": "on the mat"},
    {"instruction": "where did a dog run", "response": "a dog ran in the park and the sun is warm today, the cat sat on the mat"},
    {"instruction": "is the sun warm", "response": "the sun is warm"},
    {"id": "last", "instruction": "what did the cat do", "input": "the cat sat on the mat",
     "response": "it sat on the mat"},
]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _cfg(folder, data, *extra):
    return load_config(Config, None, [f"student.path={folder}", f"eval.data={data}", *extra])


def _torch_nll(tm, hf_tok, prompt, response):
    """(sum, count) of the NLL of the answer tokens, by transformers alone: the template applied
    by the tokenizer itself, the completion (answer + end of turn) scored token by token."""
    msgs = [{"role": "user", "content": prompt}]
    p = hf_tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    full = hf_tok.apply_chat_template(msgs + [{"role": "assistant", "content": response}], tokenize=False)
    p_ids = hf_tok(p, add_special_tokens=False).input_ids
    c_ids = hf_tok(full[len(p):], add_special_tokens=False).input_ids
    assert c_ids[-1] == hf_tok.eos_token_id  # this template ends a turn with eos
    ids = torch.tensor([p_ids + c_ids])
    with torch.no_grad():
        logp = torch.log_softmax(tm(ids).logits[0, :-1].double(), dim=-1)
    targets = ids[0, 1:]
    nll = -logp[torch.arange(len(targets)), targets][len(p_ids) - 1:]
    assert len(nll) == len(c_ids)
    return float(nll.sum()), len(c_ids)


def test_reference_nll_equals_transformers(tiny_checkpoint, tmp_path):
    from transformers import AutoTokenizer

    folder, tm = tiny_checkpoint
    data = _write(tmp_path / "eval.jsonl", ROWS)
    s = ev.run_eval(_cfg(folder, data, "eval.answers=false", "eval.batch_size=3"), str(tmp_path / "out"),
                    progress=False)

    hf_tok = AutoTokenizer.from_pretrained(folder)
    hf_tok.chat_template = text.LLAMA3_DEFAULT_TEMPLATE  # the tiny tokenizer ships none
    sums, counts = [], []
    for r in ROWS:
        prompt = r["instruction"] + (f"\n\n{r['input']}" if "input" in r else "")
        total, n = _torch_nll(tm, hf_tok, prompt, r["response"])
        sums.append(total)
        counts.append(n)
    sums, counts = np.array(sums), np.array(counts)
    want_token_mean = sums.sum() / counts.sum()
    want_row_mean = np.mean(sums / counts)
    assert abs(want_token_mean - want_row_mean) > 1e-3  # the two means are really different here

    got = s["models"]["student"]
    assert got["tokens"] == counts.sum() and got["rows"] == len(ROWS) and got["truncated"] == 0
    assert abs(got["ref_nll"] - want_token_mean) <= 2e-5
    assert abs(got["example_nll"] - want_row_mean) <= 2e-5
    assert got["ppl"] == pytest.approx(math.exp(want_token_mean), rel=5e-5)

    nll_file = json.load(open(tmp_path / "out" / "nll_student.json"))
    assert [r["id"] for r in nll_file["per_row"]] == [0, 1, 2, "last"]
    assert [r["tokens"] for r in nll_file["per_row"]] == counts.tolist()
    np.testing.assert_allclose([r["nll"] for r in nll_file["per_row"]], sums / counts, atol=2e-5)
    assert not os.path.exists(tmp_path / "out" / "answers_student.jsonl")
    assert json.load(open(tmp_path / "out" / "summary.json"))["models"]["student"]["ref_nll"] == got["ref_nll"]


def _answers(path):
    return [json.loads(line) for line in open(path)]


def test_answers_structure_resume_and_cache(tiny_checkpoint, tmp_path, monkeypatch):
    folder, _ = tiny_checkpoint
    data = _write(tmp_path / "eval.jsonl", ROWS)
    cfg = _cfg(folder, data, "eval.max_new_tokens=6", "eval.answer_batch_size=4")
    out = tmp_path / "out"
    s = ev.run_eval(cfg, str(out), progress=False)

    prompts = [json.loads(line) for line in open(out / "prompts.jsonl")]
    assert prompts == [{"id": 0, "prompt": "the cat sat"}, {"id": 1, "prompt": "where did a dog run"},
                       {"id": 2, "prompt": "is the sun warm"},
                       {"id": "last", "prompt": "what did the cat do\n\nthe cat sat on the mat"}]
    full = _answers(out / "answers_student.jsonl")
    assert sorted(json.dumps(r["id"]) for r in full) == sorted(json.dumps(p["id"]) for p in prompts)
    for r in full:
        assert set(r) == {"id", "sample", "text", "num_tokens", "finish_reason"}
        assert r["sample"] == 0 and isinstance(r["text"], str)
        assert 1 <= r["num_tokens"] <= 6 and r["finish_reason"] in ("stop", "length")
    m = s["models"]["student"]
    assert m["answer_rows"] == 4 and sum(m["finish"].values()) == 4
    assert m["mean_answer_tokens"] == pytest.approx(np.mean([r["num_tokens"] for r in full]))
    assert m["seconds"]["nll"] > 0 and m["seconds"]["answers"] > 0

    # a kill in the middle of the second row: the rerun completes without duplicates, and the
    # NLL (same fingerprint) is not computed again
    raw = (out / "answers_student.jsonl").read_bytes()
    first_end = raw.index(b"\n") + 1
    (out / "answers_student.jsonl").write_bytes(raw[: first_end + 10])

    def no_rescore(*a, **k):
        raise AssertionError("the cached NLL was computed again")

    monkeypatch.setattr(ev, "reference_nll", no_rescore)
    ev.run_eval(cfg, str(out), progress=False)
    resumed = _answers(out / "answers_student.jsonl")
    assert len(resumed) == 4
    assert sorted(resumed, key=lambda r: json.dumps(r["id"])) == sorted(full, key=lambda r: json.dumps(r["id"]))

    # everything done: the model is not even loaded
    from montessori_jax.core import weights

    monkeypatch.setattr(weights, "load_model", no_rescore)
    again = ev.run_eval(cfg, str(out), progress=False)
    assert again["models"]["student"]["ref_nll"] == s["models"]["student"]["ref_nll"]
    assert again["models"]["student"]["seconds"] == {"nll": 0.0, "answers": 0.0}
    assert len(_answers(out / "answers_student.jsonl")) == 4

    # other sampling settings on the same folder: an error naming the answers file, which stays
    with pytest.raises(UserError, match="answers_student.jsonl: written with another model"):
        ev.run_eval(_cfg(folder, data, "eval.max_new_tokens=3"), str(out), progress=False)
    assert len(_answers(out / "answers_student.jsonl")) == 4


def test_model_fingerprint_follows_file_contents(tiny_checkpoint, tmp_path):
    import shutil

    folder, _ = tiny_checkpoint
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    assert ev.model_fingerprint(str(copy)) == ev.model_fingerprint(folder)
    cfg_file = copy / "tokenizer_config.json"
    cfg_file.write_text(cfg_file.read_text() + "\n")
    assert ev.model_fingerprint(str(copy)) != ev.model_fingerprint(folder)


def _line_of(path, instruction):
    for n, line in enumerate(open(path, encoding="utf-8"), 1):
        if line.strip() and json.loads(line)["instruction"] == instruction:
            return n
    raise AssertionError(instruction)


REF = PACKAGED_REFERENCE
POOL = PACKAGED_SEED_POOL
OVERLAPPING = [
    {"instruction": "the cat sat", "response": "on the mat"},
    {"instruction": "  what is THE capital of\n australia? ", "response": "Canberra."},  # D_ref, other case/spaces
    {"instruction": "Translate the following sentence into Spanish.",  # a seed task with its input
     "input": "Where is the nearest train station?", "response": "¿Dónde está la estación de tren más cercana?"},
]


def test_overlap_warns_and_records_rows(tiny_checkpoint, tmp_path):
    folder, _ = tiny_checkpoint
    data = _write(tmp_path / "eval.jsonl", OVERLAPPING)
    ref_line = _line_of(REF, "What is the capital of Australia?")
    pool_line = _line_of(POOL, "Translate the following sentence into Spanish.")
    with pytest.warns(data_lib.EvalOverlapWarning) as record:
        s = ev.run_eval(_cfg(folder, data, "eval.answers=false"), str(tmp_path / "out"), progress=False)
    messages = [str(w.message) for w in record if issubclass(w.category, data_lib.EvalOverlapWarning)]
    assert len(messages) == 2
    assert messages[0].startswith(f"{data}: 1 row repeats an instruction of the reference set D_ref {REF}")
    assert messages[0].endswith(f"line 2 (= line {ref_line})")
    assert messages[1].startswith(f"{data}: 1 row repeats an instruction of the seed pool {POOL}")
    assert messages[1].endswith(f"line 3 (= line {pool_line})")
    o = s["overlap"]
    assert o["count"] == 2 and o["messages"] == messages
    assert [r["where"] for r in o["data"]["reference"]] == [f"{data}, line 2"]
    assert o["data"]["reference"][0]["matches"] == [f"{REF}, line {ref_line}"]
    assert [r["where"] for r in o["data"]["seed_pool"]] == [f"{data}, line 3"]
    assert s["models"]["student"]["rows"] == 3  # a warning only: all rows are evaluated


def test_overlap_error_names_files_and_lines_and_writes_nothing(tiny_checkpoint, tmp_path):
    folder, _ = tiny_checkpoint
    data = _write(tmp_path / "eval.jsonl", OVERLAPPING)
    prompts = _write(tmp_path / "prompts.jsonl", [{"prompt": "a new question"}, {"prompt": "Why do cats purr?"}])
    out = tmp_path / "out"
    with pytest.raises(UserError) as e:
        ev.run_eval(_cfg(folder, data, "eval.on_overlap=error", f"eval.prompts={prompts}"), str(out), progress=False)
    msg = str(e.value)
    ref_line = _line_of(REF, "What is the capital of Australia?")
    assert f"{data}: 1 row repeats an instruction of the reference set D_ref {REF}" in msg
    assert f"line 2 (= line {ref_line})" in msg
    assert f"{data}: 1 row repeats an instruction of the seed pool {POOL}" in msg
    assert f"{prompts}: 1 row repeats an instruction of the reference set D_ref {REF}" in msg
    assert f"line 2 (= line {_line_of(REF, 'Why do cats purr?')})" in msg
    assert not out.exists()

    # a D_ref of the user's own, given to influence, is what the eval set is checked against
    own_ref = _write(tmp_path / "ref.jsonl", [{"instruction": "x", "response": "y"}, {"instruction": "The cat sat",
                                                                                      "response": "z"}])
    with pytest.raises(UserError, match=rf"{data}: 1 row repeats .* {own_ref} .*line 1 \(= line 2\)"):
        ev.run_eval(_cfg(folder, data, "eval.on_overlap=error", f"influence.reference={own_ref}",
                         f"eval.seed_pool={own_ref}"), str(out), progress=False)


def test_find_overlaps_normalizes_case_and_whitespace():
    got = data_lib.find_overlaps([("a, line 1", "Hello\tWorld "), ("a, line 2", "hello worlds")],
                           [("b, line 7", "hello world"), ("b, line 9", "HELLO  WORLD")])
    assert got == [{"where": "a, line 1", "instruction": "Hello\tWorld ", "matches": ["b, line 7", "b, line 9"]}]


def test_packaged_eval_set_is_held_out():
    pairs = load_pairs(data_lib.PACKAGED_EVAL)
    assert 40 <= len(pairs) <= 60
    assert all(p.prompt.strip() and p.response.strip() for p in pairs)
    ref_fields = {k for line in open(REF) for k in json.loads(line)}
    assert {k for p in pairs for k in p.row} == ref_fields == {"instruction", "response"}
    texts = [(p.where, p.prompt) for p in pairs]
    assert len({data_lib.normalize_instruction(t) for _, t in texts}) == len(pairs)  # no repeats within
    assert data_lib.find_overlaps(texts, [(p.where, data_lib.prompt_text(p.prompt)) for p in load_pairs(REF)]) == []
    assert data_lib.find_overlaps(texts, [(t.where, t.text) for t in load_seed_pool("default")]) == []
    # shipped in the wheel: package-data covers the file
    pyproject = tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))
    globs = pyproject["tool"]["setuptools"]["package-data"]["montessori_jax"]
    assert any(fnmatch.fnmatch("assets/eval.jsonl", g) for g in globs)
    assert data_lib.resolve_data("default") == data_lib.PACKAGED_EVAL


def test_table_and_plot_across_arms_and_iterations(tmp_path):
    rows = [{"arm": arm, "iteration": it, "name": "student", "model": f"runs/r/it{it}/{arm}/model",
             "ref_nll": nll, "ppl": math.exp(nll)}
            for arm, base in (("montessori", 1.9), ("self_instruct", 2.0)) for it, nll in
            ((0, 2.2), (1, base), (2, base - 0.1))]
    table = ev.format_table(rows).splitlines()
    assert table[0].split() == ["arm", "iteration", "model", "ref", "NLL", "example", "NLL", "ppl", "answer",
                                "tokens", "path"]
    assert len(table) == 2 + len(rows)
    assert table[4].split()[:6] == ["montessori", "2", "student", "1.8000", "-", f"{math.exp(1.8):.2f}"]
    png = ev.plot_summary(rows, str(tmp_path / "lines.png"))
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"

    one = ev.summary_rows({"table": [{"name": "student", "model": "m", "ref_nll": 1.5, "ppl": math.exp(1.5)}]},
                          arm="montessori", iteration=1)
    assert one == [{"arm": "montessori", "iteration": 1, "name": "student", "model": "m", "ref_nll": 1.5,
                    "ppl": math.exp(1.5)}]
    assert "arm" not in ev.format_table([{"name": "a", "ref_nll": 1.0}]).splitlines()[0].split()
    png = ev.plot_summary(one + [{**one[0], "arm": "self_instruct", "ref_nll": 1.6}], str(tmp_path / "bars.png"))
    assert os.path.getsize(png) > 1000
    assert ev.plot_summary([], str(tmp_path / "none.png")) is None


def test_cli_eval_prints_table_and_bad_input_exits_2(tiny_checkpoint, tmp_path, capsys):
    folder, _ = tiny_checkpoint
    data = _write(tmp_path / "eval.jsonl", ROWS[:2] + [OVERLAPPING[1]])
    out = str(tmp_path / "out")
    with warnings.catch_warnings():
        warnings.simplefilter("error", data_lib.EvalOverlapWarning)  # the CLI prints it instead of warning
        assert main(["eval", "--out", out, "--model", f"tiny={folder}", f"eval.data={data}",
                     "eval.max_new_tokens=4"]) == 0
    cap = capsys.readouterr()
    lines = cap.out.splitlines()
    assert lines[0] == f"eval: 3 reference answers from {data}; answers to 3 prompts"
    assert lines[1].split()[:3] == ["model", "ref", "NLL"]
    s = json.load(open(os.path.join(out, "summary.json")))
    assert lines[3].split()[:2] == ["tiny", f"{s['models']['tiny']['ref_nll']:.4f}"]
    assert "montessori: warning: " in cap.err and "the reference set D_ref" in cap.err
    assert os.path.exists(os.path.join(out, "answers_tiny.jsonl")) and os.path.exists(os.path.join(out, "summary.png"))

    before = open(os.path.join(out, "summary.json")).read()
    missing = str(tmp_path / "nope.jsonl")
    assert main(["eval", "--out", out, "--model", f"tiny={folder}", f"eval.data={missing}"]) == 2
    assert f"montessori: error: {missing}: no such file" in capsys.readouterr().err
    assert main(["eval", "--out", out, "--model", f"tiny={tmp_path / 'no_model'}", f"eval.data={data}"]) == 2
    assert "no_model: no such file or folder" in capsys.readouterr().err
    assert main(["eval", "--out", out, "--model", folder, f"eval.data={data}"]) == 2
    assert "expected NAME=PATH" in capsys.readouterr().err
    assert main(["eval", "--out", out, "--model", f"tiny={folder}", f"eval.data={data}", "eval.on_overlap=error"]) == 2
    assert "line 3 (= line" in capsys.readouterr().err
    assert open(os.path.join(out, "summary.json")).read() == before  # nothing written lost

    with pytest.raises(SystemExit) as e:
        main(["eval", "--help"])
    assert e.value.code == 0 and "--model NAME=PATH" in capsys.readouterr().out
