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
(kept in ``OUT/heldout.json``, so that a rerun does not measure them again).

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
import math
import os
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from montessori_jax import model as model_lib
from montessori_jax import faults, optim, text
from montessori_jax.config import Config, DPOConfig
from montessori_jax.errors import UserError
from montessori_jax.files import sha256_file, sha256_path, write_json_atomic, write_lines_atomic
from montessori_jax.losses import token_nll

# ---------------------------------------------------------------------------------------------
# The loss


def sequence_logps(logits_BTV: jax.Array, tokens_BT: jax.Array, loss_mask_BT: jax.Array):
    """(sum of log p over each row's target tokens [B], number of targets [B]), fp32."""
    nll_B, count_B = token_nll(logits_BTV, tokens_BT, loss_mask_BT)
    return -nll_B, count_B


def dpo_loss(policy_chosen_P, policy_rejected_P, ref_chosen_P, ref_rejected_P, beta: float, mask_P=None):
    """Sigmoid DPO loss of P pairs from sequence log-probs.

    Returns ``((loss_sum, count), (chosen_rewards_P, rejected_rewards_P))``: the loss summed
    over the pairs where ``mask_P`` is 1 (all when None) and that count, as every loss here;
    the implicit rewards ``beta * (policy - reference)`` of each side, per pair.
    """
    chosen_rewards = beta * (policy_chosen_P - ref_chosen_P)
    rejected_rewards = beta * (policy_rejected_P - ref_rejected_P)
    loss_P = -jax.nn.log_sigmoid(chosen_rewards - rejected_rewards)
    mask_P = jnp.ones_like(loss_P) if mask_P is None else mask_P.astype(loss_P.dtype)
    return ((loss_P * mask_P).sum(), mask_P.sum()), (chosen_rewards, rejected_rewards)


# ---------------------------------------------------------------------------------------------
# Data: pairs -> token rows -> batches [A, 2M, T] (chosen rows, then rejected rows)


@dataclasses.dataclass(frozen=True)
class PairExample:
    """One pair as two token rows sharing the (possibly truncated) prompt."""

    chosen: text.Example
    rejected: text.Example
    prompt_truncated: bool = False  # the prompt kept only its last max_prompt_len tokens
    answers_truncated: bool = False  # the longer answer (or both) lost its end

    @property
    def truncated(self) -> bool:
        return self.prompt_truncated or self.answers_truncated

    def __len__(self) -> int:
        return max(len(self.chosen), len(self.rejected))


def _answer_tokens(tok, prompt, answer: str, system, prompt_ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """The assistant turn's tokens after ``prompt_ids`` (through its last target) and their mask."""
    ex = text.encode_example(tok, prompt, answer, system=system)
    P = len(prompt_ids)
    if ex.tokens[:P].tolist() != prompt_ids:
        raise UserError(f"chat template of {tok.name_or_path}: the prompt does not tokenize the same "
                        "alone and followed by an answer")
    mask = ex.loss_mask[P:]
    n = int(np.nonzero(mask)[0][-1]) + 1 if mask.any() else len(mask)
    return ex.tokens[P:P + n], mask[:n]


def encode_pair(tok, prompt: str, chosen: str, rejected: str, system: str | None = None,
                max_prompt_len: int = 128, max_len: int = 1024) -> PairExample:
    """Both answers after the prompt under the chat template; targets are the answers' tokens.

    TRL's rule (keep_end): when prompt + the longer answer exceed ``max_len``, the prompt keeps
    its last ``max_prompt_len`` tokens; when that is still too long, each answer keeps its first
    ``max_len - max_prompt_len`` tokens. A pair that fits is kept whole.
    """
    prompt_ids = text.encode_prompt(tok, prompt, system)
    answers = [_answer_tokens(tok, prompt, a, system, prompt_ids) for a in (chosen, rejected)]
    longer = max(len(t) for t, _ in answers)
    kept = prompt_ids[-max_prompt_len:] if len(prompt_ids) + longer > max_len else prompt_ids
    cut_answers = len(kept) + longer > max_len  # then the longer answer is always cut
    room = max_len - max_prompt_len
    kept = np.asarray(kept, np.int32)
    rows = []
    for toks, mask in answers:
        if cut_answers:
            toks, mask = toks[:room], mask[:room]
        rows.append(text.Example(np.concatenate([kept, toks]).astype(np.int32),
                                 np.concatenate([np.zeros(len(kept), bool), mask]),
                                 truncated=len(kept) < len(prompt_ids) or cut_answers))
    return PairExample(rows[0], rows[1], len(kept) < len(prompt_ids), cut_answers)


def split_pairs(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(training, held-out) pair indices, each in order: ``round(fraction * n)`` held out, at
    least one when ``fraction > 0`` and ``n >= 2``, and always at least one left to train on."""
    n_eval = int(round(fraction * n)) if fraction > 0 else 0
    if fraction > 0 and n >= 2:
        n_eval = min(max(n_eval, 1), n - 1)
    else:
        n_eval = 0
    held = set(np.random.default_rng([seed, 2]).permutation(n)[:n_eval].tolist())
    return [i for i in range(n) if i not in held], sorted(held)


def make_batch(pairs: Sequence[PairExample], idx: Sequence[int], batch_pairs: int, micro_pairs: int,
               pad_id: int, ref: tuple[np.ndarray, np.ndarray] | None = None,
               buckets: Sequence[int] = text.DEFAULT_BUCKETS) -> dict[str, np.ndarray]:
    """[A, 2M, T] arrays for the pairs ``idx`` (at most ``batch_pairs``), A = batch_pairs / M.

    In each micro-batch, rows 0..M-1 are the chosen answers and rows M..2M-1 the rejected ones
    of the same pairs; a missing pair is two all-pad rows with ``pair_mask`` 0. ``ref_logps``
    [A, 2M] holds the cached reference log-probs in the same layout (zeros without ``ref``).
    """
    M = micro_pairs
    A = batch_pairs // M
    length = text.bucket_length(max(len(pairs[i]) for i in idx), buckets)
    empty_t, empty_m = np.zeros(0, np.int32), np.zeros(0, bool)
    parts, refs, masks = [], np.zeros((A, 2 * M), np.float32), np.zeros((A, 2 * M), np.float32)
    for a in range(A):
        group = list(idx[a * M:(a + 1) * M])
        fill = M - len(group)
        seqs = ([pairs[i].chosen.tokens for i in group] + [empty_t] * fill
                + [pairs[i].rejected.tokens for i in group] + [empty_t] * fill)
        msks = ([pairs[i].chosen.loss_mask for i in group] + [empty_m] * fill
                + [pairs[i].rejected.loss_mask for i in group] + [empty_m] * fill)
        parts.append(text.pad_batch(seqs, msks, length, pad_id))
        for j, i in enumerate(group):
            masks[a, j] = masks[a, M + j] = 1.0
            if ref is not None:
                refs[a, j], refs[a, M + j] = ref[0][i], ref[1][i]
    out = {k: np.stack([p[k] for p in parts]) for k in parts[0]}
    out["ref_logps"], out["pair_mask"] = refs, masks
    return out


# ---------------------------------------------------------------------------------------------
# The step

METRIC_SUMS = ("rewards/chosen", "rewards/rejected", "rewards/accuracy", "rewards/margin",
               "logps/chosen", "logps/rejected")


def policy_logps(graphdef, params, mb) -> jax.Array:
    """Sequence log-probs [2M] of a micro-batch's rows."""
    logits = model_lib.apply(graphdef, params, mb["tokens"], mb["positions"], mb["segment_ids"])
    return sequence_logps(logits, mb["tokens"], mb["loss_mask"])[0]


def pair_sums(logps_2M: jax.Array, ref_2M: jax.Array, pair_mask_2M: jax.Array, beta: float):
    """(loss sum, metric sums) of a micro-batch's pairs: the rows' log-probs [2M] (chosen, then
    rejected), their reference log-probs and pair mask in the same layout. Rewards and
    accuracy are TRL's: ``beta * (policy - reference)``, and chosen reward > rejected reward."""
    M = logps_2M.shape[0] // 2
    w = pair_mask_2M[:M]
    (s, c), (rc, rr) = dpo_loss(logps_2M[:M], logps_2M[M:], ref_2M[:M], ref_2M[M:], beta, w)
    sums = {"count": c, "rewards/chosen": (rc * w).sum(), "rewards/rejected": (rr * w).sum(),
            "rewards/accuracy": ((rc > rr) * w).sum(), "rewards/margin": ((rc - rr) * w).sum(),
            "logps/chosen": (logps_2M[:M] * w).sum(), "logps/rejected": (logps_2M[M:] * w).sum()}
    return s, sums


def make_logps_fn(graphdef):
    """jitted ``(params, batch [1, 2M, T]) -> log-probs [2M]``: the reference pass."""
    return jax.jit(lambda params, batch: policy_logps(graphdef, params, jax.tree.map(lambda x: x[0], batch)))


def make_train_step(graphdef, tx: optax.GradientTransformation, beta: float, live_reference: bool = False):
    """``step(state, batch) -> (state, metrics)``, jitted, donating ``state``.

    batch arrays are [A, 2M, T] (see ``make_batch``); the gradients of the summed loss of the
    A micro-batches are accumulated and divided once by the number of pairs. With
    ``live_reference`` the step is ``step(state, batch, ref_params)`` and computes the
    reference log-probs itself (benchmarks and tests; training uses the cache).
    """

    def loss_fn(params, mb, ref_params):
        logps = policy_logps(graphdef, params, mb)
        if ref_params is None:
            ref = mb["ref_logps"]
        else:
            ref = jax.lax.stop_gradient(policy_logps(graphdef, ref_params, mb))
        return pair_sums(logps, ref, mb["pair_mask"], beta)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state, batch, ref_params=None):
        params = state["params"]

        def micro(carry, mb):
            g_acc, s_acc, m_acc = carry
            (s, sums), g = grad_fn(params, mb, ref_params)
            return (jax.tree.map(jnp.add, g_acc, g), s_acc + s, jax.tree.map(jnp.add, m_acc, sums)), None

        if batch["tokens"].shape[0] == 1:  # no accumulation: no zero-filled gradient buffer
            (s, sums), g = grad_fn(params, jax.tree.map(lambda x: x[0], batch), ref_params)
        else:
            zeros = jax.tree.map(jnp.zeros_like, params)
            zero_sums = {k: jnp.zeros((), jnp.float32) for k in ("count",) + METRIC_SUMS}
            (g, s, sums), _ = jax.lax.scan(micro, (zeros, jnp.zeros((), jnp.float32), zero_sums), batch)
        denom = jnp.maximum(sums["count"], 1.0)
        g = jax.tree.map(lambda x: x / denom, g)
        updates, opt_state = tx.update(g, state["opt_state"], params)
        new = {"params": optax.apply_updates(params, updates), "opt_state": opt_state, "step": state["step"] + 1}
        metrics = {"loss": s / denom, **{k: sums[k] / denom for k in METRIC_SUMS}, "pairs": sums["count"],
                   "grad_norm": optax.global_norm(g), "lr": optim.current_lr(opt_state)}
        return new, metrics

    if live_reference:
        return jax.jit(step, donate_argnums=0)
    return jax.jit(lambda state, batch: step(state, batch), donate_argnums=0)


def make_eval_fn(graphdef, beta: float):
    """jitted ``(params, batch [A, 2M, T]) -> sums``: the summed loss (``loss``) and the metric
    sums of ``pair_sums`` over a batch laid out as for training, with no gradient."""

    def micro(params, mb):
        s, sums = pair_sums(policy_logps(graphdef, params, mb), mb["ref_logps"], mb["pair_mask"], beta)
        return {"loss": s, **sums}

    def fn(params, batch):
        per = jax.lax.map(lambda mb: micro(params, mb), batch)
        return jax.tree.map(lambda x: x.sum(0), per)

    return jax.jit(fn)


def evaluate_pairs(eval_fn, params, pairs: Sequence[PairExample], ref: tuple[np.ndarray, np.ndarray],
                   batch_pairs: int, micro_pairs: int, pad_id: int, put=lambda b: b) -> dict:
    """Mean DPO loss, reward accuracy and margin over ``pairs`` (batches of ``batch_pairs``
    in order of length, ``micro_pairs`` per forward)."""
    order = sorted(range(len(pairs)), key=lambda i: (len(pairs[i]), i))
    parts = [eval_fn(params, put(make_batch(pairs, order[k:k + batch_pairs], batch_pairs, micro_pairs, pad_id, ref)))
             for k in range(0, len(order), batch_pairs)]
    host = jax.device_get(parts)
    total = {k: sum(float(h[k]) for h in host) for k in host[0]}
    n = max(total["count"], 1.0)
    return {"loss": total["loss"] / n, "reward_accuracy": total["rewards/accuracy"] / n,
            "margin": total["rewards/margin"] / n}


# ---------------------------------------------------------------------------------------------
# The reference log-prob cache


def weights_digest(path: str) -> str:
    """sha256 over a checkpoint's weight files: the .gguf, or config.json + *.safetensors."""
    from montessori_jax import weights

    path = weights.resolve_path(path)
    if os.path.isdir(path) and not any(n.endswith(".safetensors") or n == "config.json" for n in os.listdir(path)):
        raise UserError(f"{path}: no config.json or *.safetensors to fingerprint")
    return sha256_path(path, keep=lambda name: name.endswith(".safetensors") or name == "config.json")


def reference_fingerprint(pairs_path: str, model_path: str, param_dtype: str, dtype: str, tok,
                          dcfg: DPOConfig, encoded: Sequence[PairExample]) -> dict:
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
    """The complete rows of a cache with this fingerprint (a line cut by a kill is dropped and
    the file repaired); None when there is no such cache."""
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    try:
        header = json.loads(lines[0]) if lines and lines[0].endswith("\n") else {}
    except json.JSONDecodeError:
        header = {}
    if header.get("fingerprint") != fingerprint:
        return None
    good, rows = [lines[0]], {}
    for line in lines[1:]:
        if not line.endswith("\n"):
            break
        try:
            r = json.loads(line)
            rows[int(r["i"])] = (float(r["chosen"]), float(r["rejected"]))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            break
        good.append(line)
    if len(good) != len(lines):
        write_lines_atomic(path, good)
    return rows


def reference_logps(path: str, header: dict, pairs: Sequence[PairExample], logps_fn, params,
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
    todo = sorted((i for i in range(n) if i not in rows), key=lambda i: (len(pairs[i]), i))
    if todo and status == "reused":
        status = "completed"
    bar = tqdm(total=n, initial=n - len(todo), desc="reference log-probs", unit="pair", disable=not progress)
    with open(path, "a", encoding="utf-8") as out:
        for k in range(0, len(todo), ref_batch):
            idx = todo[k:k + ref_batch]
            batch = make_batch(pairs, idx, ref_batch, ref_batch, pad_id)
            logps = np.asarray(jax.device_get(logps_fn(params, put(batch))), np.float64)
            new = []
            for j, i in enumerate(idx):
                rows[i] = (float(np.float32(logps[j])), float(np.float32(logps[ref_batch + j])))
                new.append(json.dumps({"i": i, "chosen": rows[i][0], "rejected": rows[i][1]}) + "\n")
            out.writelines(new)
            out.flush()
            os.fsync(out.fileno())
            bar.update(len(idx))
    bar.close()
    chosen = np.array([rows[i][0] for i in range(n)], np.float32)
    rejected = np.array([rows[i][1] for i in range(n)], np.float32)
    return chosen, rejected, status


# ---------------------------------------------------------------------------------------------
# The stage

PAIR_FIELDS = ("prompt", "chosen", "rejected")


def read_pairs(path: str) -> tuple[str, list[dict]]:
    from montessori_jax.preferences import PAIRS_FILE
    from montessori_jax.scoring import read_jsonl

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
    file, their metrics before and after training), or a fresh one when there is none or it
    belongs to another run."""
    n = len(indices)
    try:
        with open(path, encoding="utf-8") as f:
            rec = json.load(f)
    except (OSError, json.JSONDecodeError):
        rec = None
    if not isinstance(rec, dict) or rec.get("fingerprint") != fingerprint or rec.get("indices") != indices:
        rec = {"fingerprint": fingerprint, "pairs": n, "indices": indices, "before": None, "after": None,
               "after_step": None}
    return rec


def run_dpo(cfg: Config, out_dir: str, progress: bool = True) -> dict:
    """DPO of ``cfg.teacher`` on ``cfg.dpo.pairs``; resumes from ``out_dir`` when a run was
    interrupted there. Returns a summary dict (also written to ``out_dir/summary.json``)."""
    from montessori_jax import metrics as metrics_lib
    from montessori_jax import sharding, sft, weights
    from montessori_jax.checkpoint import Checkpoints

    dcfg: DPOConfig = cfg.dpo
    teacher = cfg.teacher
    pairs_path, rows = read_pairs(dcfg.pairs)
    weights.resolve_path(teacher.path)
    os.makedirs(out_dir, exist_ok=True)
    tok = text.load_tokenizer(teacher.path, teacher.chat_template, key="teacher.chat_template")
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    encoded = [encode_pair(tok, r["prompt"], r["chosen"], r["rejected"], dcfg.system, dcfg.max_prompt_len,
                           dcfg.max_len) for r in rows]
    train_idx, held_idx = split_pairs(len(encoded), dcfg.eval_fraction, cfg.seed)
    train = [encoded[i] for i in train_idx]
    held = [encoded[i] for i in held_idx]

    header = reference_fingerprint(pairs_path, teacher.path, teacher.param_dtype, teacher.dtype, tok, dcfg, encoded)
    cache_dir = dcfg.ref_cache or os.path.dirname(os.path.abspath(pairs_path))
    cache_path = os.path.join(cache_dir, f"ref_logps-{header['fingerprint'][:16]}.jsonl")

    G = dcfg.batch_size
    M = dcfg.micro_batch_size or G
    steps_per_epoch = math.ceil(len(train) / G)
    total = steps_per_epoch * dcfg.epochs
    if dcfg.max_steps is not None:
        total = min(total, dcfg.max_steps)
    settings = _train_settings(dcfg, cfg.seed, teacher)
    fingerprint = _train_fingerprint(header["fingerprint"], settings)

    mesh = sharding.mesh_from_config(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    rules = sharding.merge_rules(cfg.mesh.rules)
    model = weights.load_model(teacher.path, teacher.param_dtype, teacher.dtype, mesh, rules, teacher.remat)
    graphdef, params = model_lib.split_params(model)
    del model

    def put(batch):
        return jax.device_put(batch, sft.batch_shardings(mesh, rules, batch))

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
            ref_c, ref_r, ref_status = reference_logps(cache_path, header, encoded, make_logps_fn(graphdef), params,
                                                       dcfg.ref_batch_size, pad_id, put, progress)
            ref_seconds = time.perf_counter() - t0
            held_ref = (ref_c[held_idx], ref_r[held_idx])
            heldout = _heldout(heldout_path, fingerprint, held_idx) if held else None
            eval_fn = make_eval_fn(graphdef, dcfg.beta) if held else None
            if heldout is not None and heldout["before"] is None:  # params are still the reference's
                heldout["before"] = evaluate_pairs(eval_fn, params, held, held_ref, G, M, pad_id, put)
                write_json_atomic(heldout_path, heldout)

            tx = optim.adamw(dcfg.optim, total)
            state = sft.init_state(params, tx)
            del params
            step_fn = make_train_step(graphdef, tx, dcfg.beta)
            start = 0
            if ckpts.latest_step() is not None:
                state, meta = ckpts.restore(state)
                start = int(meta["step"])
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
            heldout["after"] = evaluate_pairs(eval_fn, state["params"], held, held_ref, G, M, pad_id, put)
            heldout["after_step"] = step
            write_json_atomic(heldout_path, heldout)

    export_dir = None
    if dcfg.export:
        export_dir = os.path.join(out_dir, "model")
        weights.save_hf(model_lib.merge_params(graphdef, state["params"]), export_dir, tokenizer=tok)
    metrics_path = os.path.join(out_dir, "metrics.jsonl")
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
    """Steps start..total: batches in each epoch's order, checkpoints every ``save_every``.

    Metrics come to the host every ``log_every`` steps, read after the next step has been
    dispatched so the device never waits for the host (all of them before each checkpoint,
    so a resumed run has a row for every step up to it).
    """
    from montessori_jax import sft

    G = dcfg.batch_size
    M = dcfg.micro_batch_size or G
    bar = tqdm(total=total, initial=start, desc="dpo", unit="step", disable=not progress)
    pending, ready = [], []

    def write(entries):
        last = None
        for (s_, e_, _), h in zip(entries, jax.device_get([m_ for _, _, m_ in entries])):
            last = {"step": s_, "epoch": e_, **{key: float(v) for key, v in h.items()}}
            log.write(last)
        if last:
            bar.set_postfix(loss=f"{last['loss']:.4f}", acc=f"{last['rewards/accuracy']:.2f}",
                            margin=f"{last['rewards/margin']:.3f}")

    step = start
    order, order_epoch = None, None
    while step < total:
        epoch, k = divmod(step, steps_per_epoch)
        if epoch != order_epoch:  # one sort and shuffle per epoch, not per step
            order, order_epoch = sft.epoch_order(encoded, G, seed, epoch), epoch
        idx = order[k]
        state, m = step_fn(state, put(make_batch(encoded, idx, G, M, pad_id, ref)))
        step += 1
        write(ready)
        ready = []
        pending.append((step, epoch, m))
        if step % dcfg.log_every == 0:
            ready, pending = pending, []
        if step % dcfg.save_every == 0 or step == total:
            write(ready + pending)
            ready, pending = [], []
            log.flush()
            ckpts.save(step, state, {"step": step, **meta}, wait=step == total)
            faults.point("dpo.checkpoint")
        bar.update(1)
    bar.close()
    return state, step


def plot_dpo(metrics_path: str, png_path: str) -> str | None:
    """Loss, rewards of both sides, margin and reward accuracy against step (None without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    from montessori_jax.metrics import read_rows

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
