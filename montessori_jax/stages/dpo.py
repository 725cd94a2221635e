"""DPO on the teacher (step 4 of the method, second half): ``montessori dpo``.

Each pair of ``pairs.jsonl`` (see ``preferences``) is a seed prompt and two of the teacher's
raw outputs for it. The prompt is rendered under the teacher's chat template with the
generation prompt, exactly as the teacher saw it while synthesizing; each answer follows it as
the assistant turn, and only the answer's tokens (through the end-of-turn token) are scored.

Truncation, as TRL's DPO trainer (0.10.1, ``truncation_mode="keep_end"``) that the original
used: only when the prompt + the longer answer exceed ``max_len`` does the prompt keep its last
``max_prompt_len`` tokens (the end of the 8-shot prompt and the assistant header stay); if the
row is still too long, both answers keep their first ``max_len - max_prompt_len`` tokens. The
answers' end-of-turn token counts as an answer token. Pairs with a cut prompt and pairs with
cut answers are counted.

With ``eval_fraction`` a deterministic slice of the pairs (by ``seed``) is held out of
training; the loss, reward accuracy and margin on it are measured before and after training
(kept in ``OUT/heldout.json``, so that a rerun does not measure them again). Their reference
log-probs are taken by the program, and in the layout, that evaluates them after training, so
that "before" is exactly policy = reference (rewards 0, accuracy 0, loss log 2) rather than the
float noise between two batch layouts.

The loss is the sigmoid DPO loss on sequence log-probs (sums over answer tokens):
``-log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))``, summed over pairs and divided once
by the number of pairs in the global batch (exact under gradient accumulation).

The reference log-probs come from the initial teacher in one pass over the pairs before
training, and are stored as ``ref_logps-<fingerprint>.jsonl`` beside the pairs (or in
``dpo.ref_cache``). The fingerprint covers the pairs file, the reference weights files, their
dtypes, the chat template, the system prompt, the lengths and the encoded tokens; a cache with
that fingerprint is reused, an unfinished one is completed, and any change gives a new one. No
second model is held during training.

One jitted step donates the train state; chosen and rejected rows of a micro-batch go through
one forward (concatenated on the batch axis). Orbax checkpoints, resume, metrics.jsonl,
``dpo.png`` and an HF export of the teacher to ``OUT/model`` follow the SFT stage.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from typing import Sequence

import jax
import numpy as np
from tqdm.auto import tqdm

from montessori_jax.config import Config, DPOConfig
from montessori_jax.core import batching, distributed, optim, sharding, text, weights
from montessori_jax.core import model as model_lib
from montessori_jax.core.checkpoint import Checkpoints
from montessori_jax.errors import UserError
from montessori_jax.files import open_append, read_jsonl, read_resumable_jsonl, sha256_file, sha256_path, sync_file, write_json_atomic, write_lines_atomic
from montessori_jax.kernels import dpo as dpo_lib
from montessori_jax.kernels import train_step
from montessori_jax.stages import metrics as metrics_lib
from montessori_jax.stages import sft, train_loop
from montessori_jax.stages.metrics import read_rows
from montessori_jax.stages.preferences import PAIRS_FILE

# ---------------------------------------------------------------------------------------------
# The reference log-prob cache


def weights_digest(path: str) -> str:
    """sha256 over a checkpoint's weight files: the .gguf, or config.json + *.safetensors."""

    path = weights.resolve_path(path)
    if os.path.isdir(path) and not any(n.endswith(".safetensors") or n == "config.json" for n in os.listdir(path)):
        raise UserError(f"{path}: no config.json or *.safetensors to fingerprint")
    return sha256_path(path, keep=lambda name: name.endswith(".safetensors") or name == "config.json")


def reference_fingerprint(pairs_path: str, model_path: str, param_dtype: str, dtype: str, tok,
                          dcfg: DPOConfig, encoded: Sequence[dpo_lib.PairExample]) -> dict:
    """What the reference log-probs depend on, and its hash (``fingerprint``)."""
    tokens = hashlib.sha256()
    for p in encoded:
        for ex in (p.chosen, p.rejected):
            tokens.update(np.int64(len(ex)).tobytes() + ex.tokens.tobytes() + ex.loss_mask.tobytes())
    parts = {
        "pairs_sha256": sha256_file(pairs_path),
        "weights_sha256": weights_digest(model_path),
        "param_dtype": param_dtype,
        "dtype": dtype,
        "chat_template_sha256": hashlib.sha256((tok.chat_template or "").encode()).hexdigest(),
        "system": dcfg.system,
        "max_prompt_len": dcfg.max_prompt_len,
        "max_len": dcfg.max_len,
        "tokens_sha256": tokens.hexdigest(),
        "n_pairs": len(encoded),
    }
    parts["fingerprint"] = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
    return parts


def _read_cache(path: str, fingerprint: str) -> dict[int, tuple[float, float]] | None:
    """The rows of a cache with this fingerprint (a last line cut by a kill is cut off the
    file); None when there is no such cache."""
    rows = read_resumable_jsonl(path, what="reference log-prob row")
    if not rows or rows[0].get("fingerprint") != fingerprint:
        return None
    try:
        return {int(r["i"]): (float(r["chosen"]), float(r["rejected"])) for r in rows[1:]}
    except (KeyError, TypeError, ValueError):
        raise UserError(f"{path}: a row is not a reference log-prob row; remove the file to recompute it") from None


def reference_logps(path: str, header: dict, pairs: Sequence[dpo_lib.PairExample], logps_fn, params,
                    ref_batch: int, pad_id: int, put=lambda b: b, progress: bool = False):
    """Reference log-probs (chosen [N], rejected [N]) from the cache at ``path``, computing the
    pairs it lacks (all of them for a new cache) in one pass, ``ref_batch`` pairs per forward.

    Rows are appended and fsynced a forward at a time, so a kill loses at most one forward.
    Returns (chosen, rejected, status) with status ``reused``, ``completed`` or ``computed``.
    """
    n = len(pairs)
    rows = _read_cache(path, header["fingerprint"])
    status = "reused" if rows is not None else "computed"
    if rows is None:
        write_lines_atomic(path, [json.dumps(header) + "\n"])
        rows = {}
    distributed.barrier("dpo/reference-cache")  # every process has read it before the writer appends
    todo = sorted((i for i in range(n) if i not in rows), key=lambda i: (len(pairs[i]), i))
    if todo and status == "reused":
        status = "completed"
    ref_batch = max(1, min(ref_batch, len(todo)))  # no forward over empty pairs when few are left
    bar = tqdm(total=n, initial=n - len(todo), desc="reference log-probs", unit="pair", disable=not progress)
    with open_append(path) as out:
        for k in range(0, len(todo), ref_batch):
            idx = todo[k:k + ref_batch]
            batch = dpo_lib.make_batch(pairs, idx, ref_batch, ref_batch, pad_id)
            logps = np.asarray(sharding.to_host(logps_fn(params, put(batch))), np.float64)
            new = []
            for j, i in enumerate(idx):
                rows[i] = (float(np.float32(logps[j])), float(np.float32(logps[ref_batch + j])))
                new.append(json.dumps({"i": i, "chosen": rows[i][0], "rejected": rows[i][1]}) + "\n")
            out.writelines(new)
            sync_file(out)
            bar.update(len(idx))
    bar.close()
    chosen = np.array([rows[i][0] for i in range(n)], np.float32)
    rejected = np.array([rows[i][1] for i in range(n)], np.float32)
    return chosen, rejected, status


# ---------------------------------------------------------------------------------------------
# The stage

PAIR_FIELDS = ("prompt", "chosen", "rejected")


def read_pairs(path: str) -> tuple[str, list[dict]]:
    if not path:
        raise UserError("dpo.pairs is not set (the pairs.jsonl of `montessori preferences`)")
    if os.path.isdir(path):
        path = os.path.join(path, PAIRS_FILE)
    rows = read_jsonl(path)
    for r in rows:
        for key in PAIR_FIELDS:
            if not isinstance(r.get(key), str):
                raise UserError(f"{path}, line {r['_line']}: no `{key}` text")
    if not rows:
        raise UserError(f"{path}: no pairs (every seed prompt lacked a chosen or a rejected sample; "
                        "see the preferences summary, or try preferences.mode=rank)")
    return path, rows


def _train_settings(dcfg: DPOConfig, seed: int, teacher) -> dict:
    """The settings a resumed run must share with the one that wrote the checkpoints (kept in
    them, so that a refusal names what changed)."""
    keep = dataclasses.asdict(dcfg)
    for k in ("log_every", "save_every", "logger", "export", "ref_cache", "ref_batch_size", "pairs"):
        keep.pop(k)
    return {"dpo": keep, "seed": seed, "teacher": {"remat": teacher.remat}}


def _train_fingerprint(ref_fp: str, settings: dict) -> str:
    blob = json.dumps({"reference": ref_fp, "settings": settings}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


HELDOUT_FILE = "heldout.json"


def _heldout(path: str, fingerprint: str, indices: list[int]) -> dict:
    """The held-out record of this run (``heldout.json``: the held-out pairs' indices in the pairs
    file, their reference log-probs, their metrics before and after training), or a fresh one
    when there is none, it belongs to another run or it predates the stored reference."""
    n = len(indices)
    try:
        with open(path, encoding="utf-8") as f:
            rec = json.load(f)
    except (OSError, json.JSONDecodeError):
        rec = None
    if not isinstance(rec, dict) or rec.get("fingerprint") != fingerprint or rec.get("indices") != indices \
            or "reference" not in rec:
        rec = {"fingerprint": fingerprint, "pairs": n, "indices": indices, "reference": None, "before": None,
               "after": None, "after_step": None}
    return rec


def run_dpo(cfg: Config, out_dir: str, progress: bool = True) -> dict:
    """DPO of ``cfg.teacher`` on ``cfg.dpo.pairs``; resumes from ``out_dir`` when a run was
    interrupted there. Returns a summary dict (also written to ``out_dir/summary.json``)."""

    dcfg: DPOConfig = cfg.dpo
    teacher = cfg.teacher
    pairs_path, rows = read_pairs(dcfg.pairs)
    weights.resolve_path(teacher.path)
    os.makedirs(out_dir, exist_ok=True)
    tok = text.load_tokenizer(teacher.path, teacher.chat_template, key="teacher.chat_template")
    pad_id = text.pad_id(tok)
    encoded = [dpo_lib.encode_pair(tok, r["prompt"], r["chosen"], r["rejected"], dcfg.system, dcfg.max_prompt_len,
                           dcfg.max_len) for r in rows]
    train_idx, held_idx = dpo_lib.split_pairs(len(encoded), dcfg.eval_fraction, cfg.seed)
    train = [encoded[i] for i in train_idx]
    held = [encoded[i] for i in held_idx]

    header = reference_fingerprint(pairs_path, teacher.path, teacher.param_dtype, teacher.dtype, tok, dcfg, encoded)
    cache_dir = dcfg.ref_cache or os.path.dirname(os.path.abspath(pairs_path))
    cache_path = os.path.join(cache_dir, f"ref_logps-{header['fingerprint'][:16]}.jsonl")

    G = dcfg.batch_size
    M = dcfg.micro_batch_size or G
    steps_per_epoch, total = batching.step_plan(len(train), G, dcfg.epochs, dcfg.max_steps)
    settings = _train_settings(dcfg, cfg.seed, teacher)
    fingerprint = _train_fingerprint(header["fingerprint"], settings)

    mesh, rules = sharding.mesh_and_rules(cfg.mesh)
    model = weights.load_model(teacher.path, teacher.param_dtype, teacher.dtype, mesh, rules, teacher.remat)
    graphdef, params = model_lib.split_params(model)
    del model

    def put(batch):
        return sharding.put(batch, train_step.batch_shardings(mesh, rules, batch))

    heldout_path = os.path.join(out_dir, HELDOUT_FILE)
    with jax.set_mesh(mesh):
        ckpts = Checkpoints(os.path.join(out_dir, "checkpoints"))
        try:
            if ckpts.latest_step() is not None:
                meta = ckpts.restore_meta()
                if meta.get("fingerprint") != fingerprint:
                    raise UserError(f"{out_dir}: holds a DPO run with other pairs, teacher or settings"
                                    f"{sft.changed_settings(meta.get('settings'), settings)}; "
                                    "use a new --out or remove it")
            t0 = time.perf_counter()
            ref_c, ref_r, ref_status = reference_logps(cache_path, header, encoded, dpo_lib.make_logps_fn(graphdef),
                                                       params, dcfg.ref_batch_size, pad_id, put, progress)
            ref_seconds = time.perf_counter() - t0
            heldout = _heldout(heldout_path, fingerprint, held_idx) if held else None
            eval_fn = dpo_lib.make_eval_fn(graphdef) if held else None
            if heldout is not None and heldout["reference"] is None:  # params are still the reference's
                # the held-out pairs' reference log-probs come from the program and layout that
                # evaluates them after training, so "before" is exactly policy = reference
                c, r = dpo_lib.pair_logps(eval_fn, params, held, G, M, pad_id, put)
                heldout["reference"] = {"chosen": c.tolist(), "rejected": r.tolist()}
                heldout["before"] = dpo_lib.pair_metrics((c, r), (c, r), dcfg.beta)
                write_json_atomic(heldout_path, heldout)
            held_ref = (None if heldout is None else
                        tuple(np.asarray(heldout["reference"][k], np.float32) for k in ("chosen", "rejected")))

            tx = optim.adamw(dcfg.optim, total)
            state = train_step.init_state(params, tx)
            del params
            start = 0
            if ckpts.latest_step() is not None:
                state, meta = ckpts.restore(state)
                start = int(meta["step"])
            step_fn = dpo_lib.make_train_step(
                graphdef, tx, dcfg.beta,
                shardings=train_step.step_shardings(state, mesh, rules, dpo_lib.batch_layout(G, M)))
            log = metrics_lib.MetricsLog(os.path.join(out_dir, "metrics.jsonl"), dcfg.logger, resume_from=start)
            try:
                state, step = _train(state, step_fn, start, total, steps_per_epoch, train,
                                     (ref_c[train_idx], ref_r[train_idx]), dcfg, cfg.seed, pad_id, put, log,
                                     ckpts, {"fingerprint": fingerprint, "settings": settings}, progress)
            finally:
                log.close()
        finally:
            ckpts.close()  # an interrupted run still finishes the checkpoint it was writing
        if heldout is not None and (heldout["after"] is None or heldout["after_step"] != step):
            heldout["after"] = dpo_lib.evaluate_pairs(eval_fn, state["params"], held, held_ref, dcfg.beta, G, M,
                                                      pad_id, put)
            heldout["after_step"] = step
            write_json_atomic(heldout_path, heldout)

    export_dir = None
    if dcfg.export:
        export_dir = os.path.join(out_dir, "model")
        weights.save_hf(model_lib.merge_params(graphdef, state["params"]), export_dir, tokenizer=tok)
    metrics_path = os.path.join(out_dir, "metrics.jsonl")
    distributed.barrier("dpo/trained")  # the summary reads the writer's metrics
    plot_dpo(metrics_path, os.path.join(out_dir, "dpo.png"))
    rows_logged = [r for r in metrics_lib.read_rows(metrics_path) if "loss" in r]
    summary = {
        "steps": step, "pairs": len(encoded), "train_pairs": len(train),
        "prompts_truncated": sum(p.prompt_truncated for p in encoded),
        "answers_truncated": sum(p.answers_truncated for p in encoded),
        "epochs": dcfg.epochs, "beta": dcfg.beta, "batch_size": G,
        "reference": {"cache": cache_path, "status": ref_status, "seconds": ref_seconds,
                      "fingerprint": header["fingerprint"]},
        "heldout": ({k: heldout[k] for k in ("pairs", "before", "after")} if heldout is not None else None),
        "first": rows_logged[0] if rows_logged else None,
        "last": rows_logged[-1] if rows_logged else None,
        "last_lr": rows_logged[-1]["lr"] if rows_logged else None,
        "model": export_dir,
        "checkpoint": os.path.abspath(os.path.join(out_dir, "checkpoints")),
    }
    write_json_atomic(os.path.join(out_dir, "summary.json"), summary)
    return summary


def _train(state, step_fn, start, total, steps_per_epoch, encoded, ref, dcfg: DPOConfig, seed, pad_id, put,
           log, ckpts, meta, progress):
    """Steps start..total (``train_loop.run_steps``). Returns (state, the last step)."""
    G = dcfg.batch_size
    M = dcfg.micro_batch_size or G
    bar = tqdm(total=total, initial=start, desc="dpo", unit="step", disable=not progress)

    def write(entries):
        last = None
        for s_, e_, h in entries:
            last = {"step": s_, "epoch": e_, **{key: float(v) for key, v in h.items()}}
            log.write(last)
        bar.set_postfix(loss=f"{last['loss']:.4f}", acc=f"{last['rewards/accuracy']:.2f}",
                        margin=f"{last['rewards/margin']:.3f}")

    def save(step, state):
        log.flush()
        ckpts.save(step, state, {"step": step, **meta}, wait=step == total)

    state, step = train_loop.run_steps(
        state, step_fn, start=start, total=total, steps_per_epoch=steps_per_epoch, rows=encoded, batch_size=G,
        seed=seed, make_batch=lambda idx: put(dpo_lib.make_batch(encoded, idx, G, M, pad_id, ref)), write=write,
        log_every=dcfg.log_every, save_every=dcfg.save_every, save=save, fault="dpo.checkpoint", bar=bar)
    bar.close()
    return state, step


def plot_dpo(metrics_path: str, png_path: str) -> str | None:
    """Loss, rewards of both sides, margin and reward accuracy against step (None without matplotlib)."""
    plt = metrics_lib.pyplot()
    if plt is None:
        return None

    rows = [r for r in read_rows(metrics_path) if "loss" in r]
    if not rows:
        return None
    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(2, 2, figsize=(9, 6), dpi=110, sharex=True)
    panels = [("loss", ["loss"]), ("rewards", ["rewards/chosen", "rewards/rejected"]),
              ("margin (chosen - rejected reward)", ["rewards/margin"]), ("reward accuracy", ["rewards/accuracy"])]
    for ax, (title, keys) in zip(axes.flat, panels):
        for key in keys:
            ax.plot(steps, [r[key] for r in rows], lw=1, marker="." if len(rows) < 50 else None,
                    label=key.split("/")[-1])
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend(fontsize=8)
    for ax in axes[1]:
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)
    return png_path
