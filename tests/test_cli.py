"""`montessori score` against transformers, --help/--version, and bad input handling."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from montessori_jax import __version__
from montessori_jax.cli import main

ROWS = [
    {"id": "t1", "text": "The quick brown fox jumps over the lazy dog."},
    {"id": "t2", "text": "JAX transforms numerical functions: grad, jit, vmap and pmap."},
    {"id": "p1", "prompt": "What is the capital of France?", "response": "The capital of France is Paris."},
    {"id": "p2", "prompt": "Name three primary colors.", "response": "Red, yellow and blue."},
]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _transformers_nll(tm, hf_tok, row):
    """Mean NLL computed with transformers alone (its own tokenizer and chat template)."""
    if "text" in row:
        ids = hf_tok(row["text"]).input_ids
        labels = list(ids)
    else:
        msgs = [{"role": "user", "content": row["prompt"]}]
        prompt = hf_tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        full = hf_tok.apply_chat_template(msgs + [{"role": "assistant", "content": row["response"]}],
                                          tokenize=False)
        p_ids = hf_tok(prompt, add_special_tokens=False).input_ids
        c_ids = hf_tok(full[len(prompt):], add_special_tokens=False).input_ids
        eot = c_ids.index(hf_tok.convert_tokens_to_ids("<|im_end|>"))
        ids = p_ids + c_ids
        labels = [-100] * len(p_ids) + c_ids[: eot + 1] + [-100] * (len(c_ids) - eot - 1)
    with torch.no_grad():
        out = tm(torch.tensor([ids]), labels=torch.tensor([labels]))
    return float(out.loss), sum(1 for x in labels[1:] if x != -100)


def test_score_equals_transformers(smollm2_path, smollm2_torch, tmp_path, capsys):
    import os

    from transformers import AutoTokenizer

    inp = _write(tmp_path / "in.jsonl", ROWS)
    out = tmp_path / "out.jsonl"
    assert main(["score", "--model", smollm2_path, "--input", inp, "--out", str(out), "--batch-size", "3"]) == 0
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert [g["id"] for g in got] == [r["id"] for r in ROWS]
    folder, name = os.path.split(smollm2_path)
    hf_tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    for row, g in zip(ROWS, got):
        nll, count = _transformers_nll(smollm2_torch, hf_tok, row)
        assert g["tokens"] == count
        assert abs(g["nll"] - nll) <= 1e-4, (row["id"], g["nll"], nll)
    assert "mean NLL" in capsys.readouterr().out


def test_score_tiny_checkpoint_batch_independent(tiny_checkpoint, tmp_path):
    folder, _ = tiny_checkpoint
    rows = [{"text": "the cat sat on the mat " * k} for k in range(1, 6)]
    inp = _write(tmp_path / "in.jsonl", rows)
    outs = []
    for bs in (1, 4):
        out = tmp_path / f"out{bs}.jsonl"
        assert main(["score", "--model", folder, "--input", inp, "--out", str(out), "--batch-size", str(bs)]) == 0
        outs.append([json.loads(line) for line in out.read_text().splitlines()])
    assert [r["id"] for r in outs[0]] == [0, 1, 2, 3, 4]
    np.testing.assert_allclose([r["nll"] for r in outs[0]], [r["nll"] for r in outs[1]], atol=1e-5)


def test_score_chat_template_file(tiny_checkpoint, tmp_path, capsys):
    """--chat-template replaces the model's template: the response tokens are the same, the
    context they are scored in is not; a missing file is a one-line error naming the flag."""
    folder, _ = tiny_checkpoint
    inp = _write(tmp_path / "in.jsonl", [{"prompt": "the dog sat", "response": "the cat ran in the park"}])
    tpl = tmp_path / "t.jinja"
    tpl.write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{{ eos_token }}{% endfor %}"
                   "{% if add_generation_prompt %}assistant: {% endif %}")
    rows = []
    for extra in ([], ["--chat-template", str(tpl)]):
        out = tmp_path / f"o{len(extra)}.jsonl"
        assert main(["score", "--model", folder, "--input", inp, "--out", str(out), *extra]) == 0
        rows.append(json.loads(out.read_text()))
    assert rows[0]["tokens"] == rows[1]["tokens"] and rows[0]["nll"] != rows[1]["nll"]
    capsys.readouterr()
    missing = tmp_path / "nope.jinja"
    assert main(["score", "--model", folder, "--input", inp, "--out", str(tmp_path / "x.jsonl"),
                 "--chat-template", str(missing)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith(f"--chat-template: {missing}: no such template file") and len(err.splitlines()) == 1
    assert not (tmp_path / "x.jsonl").exists()


def test_version_and_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and __version__ in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "score" in capsys.readouterr().out


def test_bench_influence_without_the_shared_data_names_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MONTESSORI_SHARED_DATA", str(tmp_path / "nowhere"))
    assert main(["bench", "influence"]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'nowhere'}" in err and "MONTESSORI_SHARED_DATA" in err
    assert len(err.strip().splitlines()) == 1


def test_bad_jsonl_line_names_file_and_line_and_keeps_old_output(tiny_checkpoint, tmp_path, capsys):
    folder, _ = tiny_checkpoint
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"text": "the cat"}\n{"text": oops}\n')
    out = tmp_path / "out.jsonl"
    out.write_text("previous results\n")
    assert main(["score", "--model", folder, "--input", str(inp), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{inp}, line 2: not valid JSON" in err and len(err.strip().splitlines()) == 1
    assert out.read_text() == "previous results\n"


def test_row_without_fields_is_named(tiny_checkpoint, tmp_path, capsys):
    folder, _ = tiny_checkpoint
    inp = _write(tmp_path / "in.jsonl", [{"text": "the cat sat"}, {"prompt": "no response"}])
    assert main(["score", "--model", folder, "--input", inp, "--out", str(tmp_path / "o.jsonl")]) == 2
    assert "line 2: expected a string `text`, or `prompt` and `response`" in capsys.readouterr().err


def test_missing_model_exits_2_without_traceback(tmp_path):
    inp = _write(tmp_path / "in.jsonl", ROWS[:1])
    proc = subprocess.run(
        [sys.executable, "-m", "montessori_jax.cli", "score", "--model", str(tmp_path / "nope"),
         "--input", inp, "--out", str(tmp_path / "o.jsonl")],
        capture_output=True, text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"montessori: error: {tmp_path / 'nope'}: no such file or folder"
