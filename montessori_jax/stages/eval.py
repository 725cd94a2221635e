"""The eval stage: how well each student answers held-out prompts.

    from montessori_jax.stages.eval import run_eval
    summary = run_eval(cfg, "runs/r/it1/montessori/eval", {"student": "runs/r/it1/montessori/train/model"})

For every model (name -> path):

- the reference-answer NLL: the token mean of the NLL of each reference answer's tokens (and
  its end-of-turn token) given its prompt under the model's chat template, over the whole eval
  set (``ref_nll``), the mean of the rows' own token means (``example_nll``), and the
  perplexity ``exp(ref_nll)``;
- its answers to a prompt file (the eval set's instructions by default), greedy unless
  ``eval.temperature`` > 0, as the JSONL rows of ``montessori generate``.

Before anything runs, the eval set (and a separate prompt file) is checked against D_ref (the
reference set influence measures against) and the seed pool: a row whose instruction equals
one of theirs after lowercasing and collapsing whitespace is not held out. ``on_overlap="warn"``
emits an ``EvalOverlapWarning`` and records the rows in the summary; ``"error"`` raises a
``UserError`` naming the files and lines, before anything is written.

Files in OUT: ``nll_<name>.json`` (the numbers, every row's NLL, and the fingerprint they were
computed under), ``prompts.jsonl`` (the prompts answered), ``answers_<name>.jsonl`` and
``answers_<name>.meta.json``, ``summary.json`` and ``summary.png``. A rerun resumes: a model
whose NLL file has the same fingerprint (the model files' SHA-256, the eval rows, the settings)
is not scored again, and answers continue where they stopped without duplicates. Answers written
under other settings are an error (use a new OUT or remove the file), as for ``montessori sft``.

With ``eval.alpaca_eval`` and ``eval.mt_bench``, each model's answers in the benchmarks' own
formats (``answer_formats``): ``alpaca_eval/model_outputs.json`` (``alpaca_eval/NAME/`` with
several models) and ``mt_bench/model_answer/NAME.jsonl``, resumable in the same way.

``format_table`` and ``plot_summary`` take rows across arms and iterations
(``{"arm", "iteration", "name", "model", "ref_nll", "ppl", ...}``; ``summary_rows`` makes them
from a summary).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import time
from collections.abc import Mapping, Sequence

import numpy as np

from montessori_jax.config import GenerationConfig
from montessori_jax.core import distributed, sharding, text, weights
from montessori_jax.errors import UserError
from montessori_jax.files import read_json, sha256_path, write_json_atomic, write_jsonl_atomic
from montessori_jax.kernels.sampler import SamplingParams
from montessori_jax.kernels.scorer import Scorer
from montessori_jax.stages import answer_formats as af
from montessori_jax.stages import data as data_lib
from montessori_jax.stages import pairs as pairs_lib
from montessori_jax.stages import metrics as metrics_lib
from montessori_jax.stages.generate import generate_jsonl, read_done, read_prompt_rows
from montessori_jax.stages.openai_backend import answer_jsonl
from montessori_jax.stages.pairs import conversation

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


# ---------------------------------------------------------------------------------------------
# Fingerprints: what a cached result was computed from


def model_fingerprint(path: str) -> str:
    """SHA-256 over the model's files (names and contents): an HF folder's files, or one .gguf
    (``"smollm2"``: the embedded one). Costs one read of the weights."""

    return sha256_path(weights.resolve_path(path))[:16]


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


def _pairs_digest(pairs) -> str:
    return _digest([[list(p.prompt) if not isinstance(p.prompt, str) else p.prompt, p.response] for p in pairs])


# ---------------------------------------------------------------------------------------------
# Reference-answer NLL


def reference_nll(scorer, tok, pairs, *, system: str | None = None, max_len: int | None = None,
                  batch_size: int = 8, progress: bool = False) -> dict:
    """Reference-answer NLL of the model behind ``scorer`` (a ``scoring.Scorer``) on ``pairs``.

    Each pair is encoded as prompt + answer under ``tok``'s chat template; the answer's tokens
    and its end-of-turn token are scored, and for a chat ``messages`` row every assistant turn's. Returns ``ref_nll`` (token mean over all rows),
    ``example_nll`` (mean of the rows' token means), ``ppl`` (exp of ref_nll), ``tokens``,
    ``rows``, ``truncated``, and ``per_row``: [{"id", "nll", "tokens"}] in input order.
    """

    examples = []
    for p in pairs:
        ex = text.encode_conversation(tok, conversation(p), system=system, max_len=max_len)
        if ex.loss_mask.sum() == 0:
            raise UserError(f"{p.where}: no answer tokens left to score (raise eval.max_len)")
        examples.append(ex)
    pad_id = text.pad_id(tok)
    sums, counts = scorer.nll_sums(examples, batch_size, pad_id, progress=progress)
    per_row_mean = sums / counts
    ref_nll = float(sums.sum() / counts.sum())
    return {
        "ref_nll": ref_nll,
        "example_nll": float(per_row_mean.mean()),
        "ppl": math.exp(ref_nll),
        "tokens": int(counts.sum()),
        "rows": len(pairs),
        "truncated": int(sum(e.truncated for e in examples)),
        "per_row": [{"id": p.id if p.id is not None else i, "nll": float(m), "tokens": int(c)}
                    for i, (p, m, c) in enumerate(zip(pairs, per_row_mean, counts))],
    }


# ---------------------------------------------------------------------------------------------
# The stage


def parse_models(specs: Sequence[str]) -> dict[str, str]:
    """``NAME=PATH`` strings (``--model``) as an ordered dict; a name may appear once."""
    models: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not path:
            raise UserError(f"--model {spec!r}: expected NAME=PATH, e.g. student=out/train/model")
        _check_name(name)
        if name in models:
            raise UserError(f"--model {spec!r}: the name {name!r} is given twice")
        models[name] = path
    return models


def _check_name(name: str) -> None:
    if not _NAME_RE.match(name):
        raise UserError(f"model name {name!r}: use letters, digits, '.', '_' or '-' (it names files)")


def _answers_stats(path: str) -> dict:
    rows = []
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
    finish: dict[str, int] = {}
    for r in rows:
        finish[r["finish_reason"]] = finish.get(r["finish_reason"], 0) + 1
    return {"answer_rows": len(rows), "finish": finish,
            "mean_answer_tokens": float(np.mean([r["num_tokens"] for r in rows])) if rows else None}


def _inputs(cfg, ecfg):
    """The eval pairs, the prompts to answer (None without ``eval.answers``), the sets they must
    not repeat and the overlap report, read and checked before anything is written: (data path,
    pairs, prompt rows, others, overlap)."""
    data_path = data_lib.resolve_data(ecfg.data)
    pairs = pairs_lib.load_pairs(data_path, ecfg.split, ecfg.prompt_field, ecfg.response_field)
    prompt_rows = None
    if ecfg.answers:
        prompt_rows = data_lib.load_prompt_rows(ecfg.prompts) if ecfg.prompts else data_lib.prompts_from_pairs(pairs)
    sets = {"data": (data_path, [(p.where, data_lib.prompt_text(p.prompt)) for p in pairs])}
    if ecfg.answers and ecfg.prompts:
        sets["prompts"] = (ecfg.prompts, [(r["_where"], data_lib.prompt_text(r.get("prompt") or r.get("messages")))
                                          for r in prompt_rows])
    others = data_lib.overlap_sets(cfg, ecfg)
    overlap = data_lib.check_overlap(sets, others, ecfg.on_overlap)
    return data_path, pairs, prompt_rows, others, overlap


def run_eval(cfg, out_dir: str, models: Mapping[str, str] | None = None, progress: bool = True) -> dict:
    """Evaluate each model of ``models`` (name -> path; default ``{"student": cfg.student.path}``)
    with ``cfg.eval``, writing into ``out_dir``; resumes a run there. Every model is loaded with
    ``cfg.student``'s dtypes and chat template and placed on ``cfg.mesh``. Returns the summary (also
    ``out_dir/summary.json``): ``models`` (name -> numbers and files), ``table`` (rows for
    ``format_table`` / ``summary_rows``), ``overlap``, and the inputs used.

    Raises:
      UserError: a missing file or model, a bad prompt row, answers in ``out_dir`` written
        under other settings, or (``eval.on_overlap="error"``) an eval set that repeats D_ref
        or seed pool instructions. Nothing is written before these checks pass.
    """
    import jax

    t0 = time.perf_counter()
    ecfg = cfg.eval
    models = dict(models) if models else {"student": cfg.student.path}
    for name, path in models.items():
        _check_name(name)
        weights.resolve_path(path)
    template = text.read_chat_template(cfg.student.chat_template, "student.chat_template")

    data_path, pairs, prompt_rows, others, overlap = _inputs(cfg, ecfg)
    alpaca_rows = af.load_alpaca_prompts(ecfg.alpaca_eval, ecfg.alpaca_eval_split) if ecfg.alpaca_eval else None
    mt_questions = af.load_mt_questions(ecfg.mt_bench) if ecfg.mt_bench else None

    os.makedirs(out_dir, exist_ok=True)
    mesh, rules = sharding.mesh_and_rules(cfg.mesh)
    sampling = SamplingParams(temperature=ecfg.temperature, top_p=ecfg.top_p,
                              max_new_tokens=ecfg.max_new_tokens, n=1, seed=cfg.seed)
    gcfg = cfg.generation
    engine = {}  # where answers are sampled, when not here: part of the answers' settings
    if gcfg.backend == "openai" and prompt_rows is not None:
        if len(models) > 1:
            raise UserError(f"generation.backend=openai answers with the server's one model; got {len(models)} "
                            "models (evaluate one at a time, or eval.answers=false)")
        engine = {"backend": "openai", "base_url": gcfg.base_url, "model": gcfg.model,
                  "seed": "per prompt: request_seed(seed, row index)"}
    prompts_path = os.path.join(out_dir, "prompts.jsonl")
    if prompt_rows is not None:
        clean = [{k: v for k, v in r.items() if k != "_where"} for r in prompt_rows]
        write_jsonl_atomic(prompts_path, clean)
        distributed.barrier("eval/prompts")  # every process reads the writer's prompts.jsonl
        prompts_digest = _digest(clean)

    results = {}
    for name, path in models.items():
        fp_model = model_fingerprint(path)
        dtypes = {"param_dtype": cfg.student.param_dtype, "dtype": cfg.student.dtype}
        if template is not None:  # only when set, so results cached before the key existed stay valid
            dtypes["chat_template_sha256"] = hashlib.sha256(template.encode()).hexdigest()
        nll_path = os.path.join(out_dir, f"nll_{name}.json")
        nll_fp = _digest({"model": fp_model, "data": _pairs_digest(pairs), "system": ecfg.system,
                          "max_len": ecfg.max_len, **dtypes})
        cached = read_json(nll_path, damaged_ok=True)
        nll = cached if cached and cached.get("fingerprint") == nll_fp else None

        answers_path = os.path.join(out_dir, f"answers_{name}.jsonl")
        answers_todo = False
        if prompt_rows is not None:
            meta_path = os.path.join(out_dir, f"answers_{name}.meta.json")
            meta = {"fingerprint": _digest({"model": fp_model, "prompts": prompts_digest, "system": ecfg.system,
                                            "sampling": {**dataclasses.asdict(sampling), **engine}, **dtypes}),
                    "model": path, "prompts": prompts_path, "sampling": {**dataclasses.asdict(sampling), **engine}}
            old = read_json(meta_path, damaged_ok=True)
            if os.path.exists(answers_path) and (old is None or old.get("fingerprint") != meta["fingerprint"]):
                raise UserError(f"{answers_path}: written with another model, other prompts or other sampling "
                                "settings; use a new --out or remove the file")
            write_json_atomic(meta_path, meta)
            done = read_done(answers_path)
            answers_todo = any((json.dumps(r["id"]), 0) not in done for r in prompt_rows)

        seconds = {"nll": 0.0, "answers": 0.0}  # this run's; 0 when cached or already done
        loaded: dict = {}

        def get_model(path=path, loaded=loaded):
            if "model" not in loaded:
                with jax.set_mesh(mesh):
                    loaded["model"] = weights.load_model(path, cfg.student.param_dtype, cfg.student.dtype, mesh, rules)
            return loaded["model"]

        if nll is None or answers_todo:
            tok = text.load_tokenizer(path, cfg.student.chat_template, key="student.chat_template")
            model = get_model()
            if nll is None:
                t_nll = time.perf_counter()
                with jax.set_mesh(mesh):
                    nll = reference_nll(Scorer.of(model), tok, pairs, system=ecfg.system, max_len=ecfg.max_len,
                                        batch_size=ecfg.batch_size, progress=progress)
                nll = {"fingerprint": nll_fp, "model": path, "data": data_path, **nll}
                write_json_atomic(nll_path, nll)
                seconds["nll"] = round(time.perf_counter() - t_nll, 3)
            if answers_todo:
                t_ans = time.perf_counter()
                if engine:
                    params = GenerationConfig(temperature=ecfg.temperature, top_p=ecfg.top_p, top_k=0,
                                              presence_penalty=0.0, max_new_tokens=ecfg.max_new_tokens)
                    answer_jsonl(gcfg, answers_path, read_prompt_rows(prompts_path), params, seed=cfg.seed,
                                 system=ecfg.system, done=read_done(answers_path))
                else:
                    with jax.set_mesh(mesh):
                        generate_jsonl(model, answers_path, sampling, input_path=prompts_path, tokenizer=tok,
                                       batch_size=ecfg.answer_batch_size, system=ecfg.system, progress=progress)
                seconds["answers"] = round(time.perf_counter() - t_ans, 3)
            del model
        formats = {}
        if alpaca_rows is not None or mt_questions is not None:
            tok = text.load_tokenizer(path, cfg.student.chat_template, key="student.chat_template")
            pinned = {"model": fp_model, **dtypes}
            t_fmt = time.perf_counter()
            with jax.set_mesh(mesh):
                if alpaca_rows is not None:
                    alpaca_dir = os.path.join(out_dir, "alpaca_eval", *([name] if len(models) > 1 else []))
                    formats["alpaca_eval"] = af.write_alpaca_eval(
                        get_model, tok, alpaca_rows, alpaca_dir, name, sampling, batch_size=ecfg.answer_batch_size,
                        system=ecfg.system, progress=progress, meta=pinned)
                if mt_questions is not None:
                    formats["mt_bench"] = af.write_mt_bench(
                        get_model, tok, mt_questions, os.path.join(out_dir, "mt_bench", "model_answer", f"{name}.jsonl"),
                        name, sampling, temperatures=ecfg.mt_bench_temperatures, batch_size=ecfg.answer_batch_size,
                        system=ecfg.system, progress=progress, meta=pinned)
            seconds["formats"] = round(time.perf_counter() - t_fmt, 3) if loaded else 0.0
        loaded.clear()
        entry = {k: nll[k] for k in ("ref_nll", "example_nll", "ppl", "tokens", "rows", "truncated")}
        entry.update(path=path, nll_file=nll_path, seconds=seconds)
        if prompt_rows is not None:
            entry.update(answers=answers_path, **_answers_stats(answers_path))
        entry.update(formats)
        results[name] = entry

    distributed.barrier("eval/done")
    rows = [{"name": name, "model": r["path"], "ref_nll": r["ref_nll"], "example_nll": r["example_nll"],
             "ppl": r["ppl"], "mean_answer_tokens": r.get("mean_answer_tokens")} for name, r in results.items()]
    summary = {
        "data": data_path,
        "rows": len(pairs),
        "prompts": (ecfg.prompts or data_path) if prompt_rows is not None else None,
        "answer_prompts": len(prompt_rows) if prompt_rows is not None else 0,
        "sampling": {**dataclasses.asdict(sampling), **engine} if prompt_rows is not None else None,
        "reference": others["reference"][1],
        "seed_pool": others["seed_pool"][1],
        "overlap": overlap,
        "models": results,
        "table": rows,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    write_json_atomic(os.path.join(out_dir, "summary.json"), summary)
    plot_summary(rows, os.path.join(out_dir, "summary.png"))
    return summary


# ---------------------------------------------------------------------------------------------
# Across arms and iterations: a table and a plot


def summary_rows(summary: dict, arm: str | None = None, iteration: int | None = None) -> list[dict]:
    """``run_eval``'s table rows, tagged with an arm and an iteration."""
    tags = {k: v for k, v in (("arm", arm), ("iteration", iteration)) if v is not None}
    return [{**tags, **row} for row in summary["table"]]


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(rows: Sequence[dict]) -> str:
    """A text table: arm and iteration (when any row has them), name, ref NLL (token mean),
    per-example NLL, perplexity, mean answer tokens, model path."""
    cols = []
    if any("arm" in r for r in rows):
        cols.append(("arm", lambda r: str(r.get("arm", "-")), "<"))
    if any("iteration" in r for r in rows):
        cols.append(("iteration", lambda r: _fmt(r.get("iteration"), "d"), ">"))
    cols += [
        ("model", lambda r: str(r.get("name", "-")), "<"),
        ("ref NLL", lambda r: _fmt(r.get("ref_nll"), ".4f"), ">"),
        ("example NLL", lambda r: _fmt(r.get("example_nll"), ".4f"), ">"),
        ("ppl", lambda r: _fmt(r.get("ppl"), ".2f"), ">"),
        ("answer tokens", lambda r: _fmt(r.get("mean_answer_tokens"), ".1f"), ">"),
        ("path", lambda r: str(r.get("model", "-")), "<"),
    ]
    cells = [[fn(r) for _, fn, _ in cols] for r in rows]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, (h, _, _) in enumerate(cols)]

    def line(values):
        return "  ".join(format(v, f"{a}{w}") for v, (_, _, a), w in zip(values, cols, widths)).rstrip()

    out = [line([h for h, _, _ in cols]), "  ".join("-" * w for w in widths)]
    out += [line(c) for c in cells]
    return "\n".join(out)


def _series_label(arm, name, many_names: bool) -> str:
    parts = [p for p in (arm, name if many_names or not arm else None) if p]
    return " / ".join(str(p) for p in parts) or "model"


def plot_summary(rows: Sequence[dict], png_path: str, title: str = "reference-answer NLL") -> str | None:
    """Reference-answer NLL (token mean) per arm: lines over iterations when rows span more
    than one iteration, otherwise bars (one per row). None when matplotlib is absent or
    there are no rows."""
    plt = metrics_lib.pyplot()
    if plt is None:
        return None
    rows = [r for r in rows if r.get("ref_nll") is not None]
    if not rows:
        return None
    many_names = len({r.get("name") for r in rows}) > 1
    iterations = {r["iteration"] for r in rows if r.get("iteration") is not None}
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    if len(iterations) > 1:
        series: dict[str, list[tuple[int, float]]] = {}
        for r in rows:
            if r.get("iteration") is None:
                continue
            label = _series_label(r.get("arm"), r.get("name"), many_names)
            series.setdefault(label, []).append((int(r["iteration"]), float(r["ref_nll"])))
        for label, points in series.items():
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], "o-", label=label)
        ax.set_xlabel("iteration")
        ax.set_xticks(sorted(iterations))
        ax.legend()
    else:
        labels = [_series_label(r.get("arm"), r.get("name"), many_names) for r in rows]
        values = [float(r["ref_nll"]) for r in rows]
        bars = ax.bar(range(len(rows)), values, color=[f"C{i % 10}" for i in range(len(rows))])
        for bar, r in zip(bars, rows):
            if r.get("ppl") is not None:
                ax.annotate(f"ppl {r['ppl']:.2f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                            ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(rows)), labels, rotation=20 if len(rows) > 3 else 0)
    ax.set_ylabel("token NLL of reference answers")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)
    return png_path
