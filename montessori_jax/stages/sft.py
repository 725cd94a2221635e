"""Supervised fine-tuning of the student: the warm-up (step 2 of the method) and the training
on the synthesized set (step 5). Loss on response tokens only, token mean over the global
batch with exact gradient accumulation, AdamW with warmup-stable-decay, one jitted step that
donates the train state, orbax checkpoints with resume, HF export at the end.

The final train state (params + AdamW state + step) is what the influence stage continues
from; ``warm_state.json`` beside it records the hyperparameters, the last lr and the lr one
more step continues at (``optim.continue_lr``).
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

from montessori_jax.config import Config, SFTConfig, diff
from montessori_jax.core import batching, optim, sharding, text, weights
from montessori_jax.core import model as model_lib
from montessori_jax.core.checkpoint import Checkpoints
from montessori_jax.errors import UserError
from montessori_jax.files import write_json_atomic
from montessori_jax.kernels import train_step
from montessori_jax.kernels.scorer import Scorer
from montessori_jax.stages import metrics as metrics_lib
from montessori_jax.stages import pairs as pairs_lib
from montessori_jax.stages import train_loop

# ---------------------------------------------------------------------------------------------
# The stage


def _settings(cfg: SFTConfig, section: str, model_path: str) -> dict:
    """What a resumed run must share with the one that wrote the checkpoints, besides its rows
    (kept in the checkpoints, so a refusal can name what changed)."""
    keep = dataclasses.asdict(cfg)
    for k in ("log_every", "save_every", "eval_every", "logger", "export"):
        keep.pop(k)
    return {section: keep, "student": {"path": model_path}}


def _fingerprint(rows: Sequence[batching.Row], settings: dict) -> str:
    h = hashlib.sha256()
    for r in rows:
        h.update(r.tokens.tobytes())
        h.update(r.loss_mask.tobytes())
        h.update(r.segment_ids.tobytes())
    h.update(json.dumps(settings, sort_keys=True).encode())
    return h.hexdigest()[:16]


def changed_settings(saved: dict | None, settings: dict) -> str:
    """``" (changed: dpo.max_steps 3 -> 5, ...)"``: the dotted keys whose values differ from the
    settings a checkpoint recorded; empty when it recorded none or none differ."""

    if not saved:
        return ""

    def get(d, key):
        for part in key.split("."):
            d = d.get(part) if isinstance(d, dict) else None
        return d

    keys = diff(saved, settings)
    if not keys:
        return ""
    return " (changed: " + ", ".join(f"{k} {get(saved, k)!r} -> {get(settings, k)!r}" for k in keys) + ")"


def encode_pairs(tok, pairs, cfg: SFTConfig) -> list[text.Example]:
    return [text.encode_example(tok, list(p.prompt) if isinstance(p.prompt, tuple) else p.prompt,
                                p.response, system=cfg.system, max_len=cfg.max_len) for p in pairs]


def split_eval(examples: list, fraction: float, seed: int) -> tuple[list, list]:
    if fraction <= 0:
        return examples, []
    n_eval = max(1, int(round(fraction * len(examples))))
    perm = np.random.default_rng([seed, 1]).permutation(len(examples))
    held = set(perm[:n_eval].tolist())
    return [e for i, e in enumerate(examples) if i not in held], [examples[i] for i in sorted(held)]


def run_sft(cfg: Config, out_dir: str, progress: bool = True, section: str = "sft") -> dict:
    """Train ``cfg.student`` on ``cfg.<section>``'s data; resume from ``out_dir`` if a run was
    interrupted there. Returns a summary dict (also written to ``out_dir/summary.json``)."""

    scfg: SFTConfig = getattr(cfg, section)
    model_cfg = cfg.student
    os.makedirs(out_dir, exist_ok=True)
    tok = text.load_tokenizer(model_cfg.path, model_cfg.chat_template, key="student.chat_template")
    pad_id = text.pad_id(tok)

    examples = encode_pairs(tok, pairs_lib.load_pairs(scfg.data, scfg.split, scfg.prompt_field, scfg.response_field), scfg)
    train_ex, eval_ex = split_eval(examples, scfg.eval_fraction, cfg.seed)
    if scfg.eval_data:
        eval_ex = encode_pairs(tok, pairs_lib.load_pairs(scfg.eval_data, scfg.split, scfg.prompt_field,
                                                         scfg.response_field), scfg)
    n_truncated = sum(e.truncated for e in examples)
    rows = batching.pack_examples(train_ex, scfg.max_len) if scfg.pack else batching.rows_from_examples(train_ex)

    G = scfg.batch_size
    M = scfg.micro_batch_size or G
    steps_per_epoch, total = batching.step_plan(len(rows), G, scfg.epochs, scfg.max_steps)
    settings = _settings(scfg, section, model_cfg.path)
    fingerprint = _fingerprint(rows, settings)

    mesh, rules = sharding.mesh_and_rules(cfg.mesh)
    model = weights.load_model(model_cfg.path, model_cfg.param_dtype, model_cfg.dtype, mesh, rules, model_cfg.remat)
    graphdef, params = model_lib.split_params(model)
    del model
    tx = optim.adamw(scfg.optim, total)
    with jax.set_mesh(mesh):
        state = train_step.init_state(params, tx)

    ckpts = Checkpoints(os.path.join(out_dir, "checkpoints"))
    try:
        start = 0
        if ckpts.latest_step() is not None:
            meta = ckpts.restore_meta()
            if meta.get("fingerprint") != fingerprint:
                raise UserError(f"{out_dir}: holds a run with other data or settings"
                                f"{changed_settings(meta.get('settings'), settings)}; use a new --out or remove it")
            state, meta = ckpts.restore(state)
            start = int(meta["step"])
        layout = batching.global_batch(rows, [0], G, M, batching.DEFAULT_BUCKETS, pad_id) if rows else None
        step_fn = train_step.make_train_step(
            graphdef, tx, train_step.step_shardings(state, mesh, rules, layout) if layout else None)
        log = metrics_lib.MetricsLog(os.path.join(out_dir, "metrics.jsonl"), scfg.logger, resume_from=start)
        scorer = Scorer(graphdef, state["params"]) if eval_ex else None

        def eval_loss(step, params):
            s, c = scorer.nll_sums(eval_ex, M, pad_id, params=params)
            value = float(s.sum() / max(c.sum(), 1))
            log.write({"step": step, "eval_loss": value})
            return value

        bar = tqdm(total=total, initial=start, desc=f"sft ({section})", unit="step", disable=not progress)
        state, step = _train(state, step_fn, start, total, steps_per_epoch, rows, scfg, cfg.seed, pad_id, mesh, rules,
                             log, ckpts, {"fingerprint": fingerprint, "settings": settings}, bar,
                             eval_loss if scorer else None)
        bar.close()
    finally:
        ckpts.close()  # an interrupted run still finishes the checkpoint it was writing

    final_eval = eval_loss(step, state["params"]) if scorer else None
    last_lr = float(sharding.to_host(optim.current_lr(state["opt_state"]))) if step > 0 else float(optim.wsd_schedule(scfg.optim, total)(0))
    o = scfg.optim
    # lr: what one more step (the influence step) continues at; see optim.continue_lr
    warm = {"checkpoint": os.path.abspath(os.path.join(out_dir, "checkpoints")), "step": step,
            "total_steps": total, "lr": optim.continue_lr(o, total, step), "last_lr": last_lr,
            "peak_lr": o.lr, "b1": o.b1, "b2": o.b2, "eps": o.eps,
            "weight_decay": o.weight_decay, "decay_norms": o.decay_norms, "grad_clip": o.grad_clip,
            "model": model_cfg.path, "param_dtype": model_cfg.param_dtype, "dtype": model_cfg.dtype,
            "chat_template": model_cfg.chat_template, "schedule": dataclasses.asdict(o)}
    write_json_atomic(os.path.join(out_dir, "warm_state.json"), warm)

    export_dir = None
    if scfg.export:
        export_dir = os.path.join(out_dir, "model")
        weights.save_hf(model_lib.merge_params(graphdef, state["params"]), export_dir, tokenizer=tok)
    log.close()
    metrics_lib.plot_losses(os.path.join(out_dir, "metrics.jsonl"), os.path.join(out_dir, "loss.png"))
    summary = {"steps": step, "examples": len(train_ex), "rows": len(rows), "truncated": n_truncated,
               "eval_examples": len(eval_ex), "eval_loss": final_eval, "last_lr": last_lr,
               "model": export_dir, "warm_state": os.path.join(out_dir, "warm_state.json")}
    write_json_atomic(os.path.join(out_dir, "summary.json"), summary)
    return summary


def _train(state, step_fn, start, total, steps_per_epoch, rows, scfg: SFTConfig, seed, pad_id, mesh, rules,
           log, ckpts, meta, bar, eval_loss):
    """Steps start..total (``train_loop.run_steps``), the eval loss every ``eval_every``.
    Returns (state, the last step)."""
    G = scfg.batch_size
    M = scfg.micro_batch_size or G
    t_last = time.perf_counter()

    def make_batch(idx):
        batch = batching.global_batch(rows, idx, G, M, batching.DEFAULT_BUCKETS, pad_id)
        return sharding.put(batch, train_step.batch_shardings(mesh, rules, batch))

    def write(entries):
        nonlocal t_last
        now = time.perf_counter()
        n_tok = sum(float(h["tokens"]) for _, _, h in entries)
        for s_, _, h in entries:
            log.write({"step": s_, "loss": float(h["loss"]), "lr": float(h["lr"]),
                       "grad_norm": float(h["grad_norm"]), "tokens": int(h["tokens"]),
                       "tokens_per_s": n_tok / max(now - t_last, 1e-9)})
        bar.set_postfix(loss=f"{float(entries[-1][2]['loss']):.4f}", tok_s=f"{n_tok / max(now - t_last, 1e-9):.0f}")
        t_last = now

    def after_step(step, state):
        if scfg.eval_every and eval_loss and step % scfg.eval_every == 0:
            eval_loss(step, state["params"])

    def save(step, state):
        log.flush()
        ckpts.save(step, state, {"step": step, **meta}, wait=step == total)

    with jax.set_mesh(mesh):
        return train_loop.run_steps(state, step_fn, start=start, total=total, steps_per_epoch=steps_per_epoch,
                                    rows=rows, batch_size=G, seed=seed, make_batch=make_batch, write=write,
                                    log_every=scfg.log_every, save_every=scfg.save_every, save=save,
                                    fault="sft.checkpoint", bar=bar, after_step=after_step)
