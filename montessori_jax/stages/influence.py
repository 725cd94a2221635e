"""``montessori influence``: the warm state in, a scores JSONL + summary + histogram out.

Resumable by chunk: each chunk's rows are appended (and flushed) as soon as they are computed;
a rerun skips the ids already scored and repairs a line cut by a kill. ``settings.json`` holds
everything a score depends on (``score_settings``); a rerun into a folder that holds scores
made with other settings is an error naming the changed keys, never a mix of old and new rows.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from montessori_jax import faults
from montessori_jax.config import Config, InfluenceConfig, OptimConfig
from montessori_jax.core import batching, distributed, optim, sharding, text, weights
from montessori_jax.core import model as model_lib
from montessori_jax.core.checkpoint import Checkpoints
from montessori_jax.errors import UserError
from montessori_jax.files import PACKAGED_REFERENCE, open_append, sha256_file, read_resumable_jsonl, sha256_path, sync_file, write_json_atomic
from montessori_jax.kernels import influence as influence_lib
from montessori_jax.kernels import influence_memory, train_step
from montessori_jax.stages import pairs as pairs_lib
from montessori_jax.stages import metrics as metrics_lib
from montessori_jax.stages import stats
from montessori_jax.stages.eval import model_fingerprint
from montessori_jax.stages.sft import encode_pairs

# L_ref pieces of the last warm state kept for a later scoring on it in this process (the
# teacher shift): key -> {"baseline": ..., "g_ref": ...}, each (host copy, device shardings), so
# that grad L_ref holds no device memory while other stages run
_REF_CACHE: dict[tuple, dict] = {}


def _keep(cached: dict, name: str, value) -> None:
    cached[name] = (sharding.to_host(value), jax.tree.map(lambda x: x.sharding, value))


def _take(cached: dict, name: str):
    host, shardings = cached[name]
    return sharding.put(host, shardings)


def release_reference() -> None:
    """Forget the kept L_ref pieces (after the last scoring that needs them)."""
    _REF_CACHE.clear()


def _stamp(path: str) -> tuple[str, int]:
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "warm_state.json")):
        path = os.path.join(path, "warm_state.json")
    return os.path.abspath(path), os.stat(path).st_mtime_ns


def warm_state_file(path: str) -> str:
    """influence.warm_state: the warm_state.json itself, or the folder of `montessori sft` holding it."""
    return os.path.join(path, "warm_state.json") if os.path.isdir(path) else path


def read_warm_state(path: str) -> dict:
    path = warm_state_file(path)
    if not os.path.isfile(path):
        raise UserError(f"{path}: no warm state (run `montessori sft` first; it writes warm_state.json)")
    try:
        with open(path) as f:
            warm = json.load(f)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e.msg})") from None
    missing = [k for k in ("checkpoint", "step", "total_steps", "lr", "model", "schedule") if k not in warm]
    if missing:
        raise UserError(f"{path}: missing {', '.join(missing)}")
    return warm


@dataclasses.dataclass
class WarmStudent:
    """The student's warm state, read once: params and AdamW moments as pytrees."""

    graphdef: object
    params: dict
    mu: dict
    nu: dict
    count: jax.Array
    cfg: model_lib.LlamaConfig
    tok: object
    warm: dict


def load_warm_student(warm: dict, mesh=None, rules=None) -> WarmStudent:
    model = weights.load_model(warm["model"], warm.get("param_dtype", "float32"), warm.get("dtype", "float32"),
                               mesh, rules)
    cfg = model.cfg
    graphdef, params = model_lib.split_params(model)
    del model
    tx = optim.adamw(OptimConfig(**warm["schedule"]), warm["total_steps"])
    like = train_step.init_state(params, tx)
    ckpts = Checkpoints(warm["checkpoint"])
    try:
        state, _ = ckpts.restore(like, step=warm["step"])
    finally:
        ckpts.close()
    mu, nu, count = optim.adam_moments(state["opt_state"])
    # the template the warm-up encoded with (warm states written before the key existed: none)
    tok = text.load_tokenizer(warm["model"], warm.get("chat_template"), key="student.chat_template")
    return WarmStudent(graphdef, state["params"], mu, nu, count, cfg, tok, warm)


def _replicated(ref: influence_lib.RefSet, mesh) -> influence_lib.RefSet:
    """D_ref's chunks on every device of the mesh (each data group scans all of them)."""
    groups = sharding.put(ref.groups, jax.tree.map(lambda _: sharding.replicated(mesh), ref.groups))
    return dataclasses.replace(ref, groups=groups)


def _rows_on_data(ref: influence_lib.RefSet, mesh) -> influence_lib.RefSet:
    """D_ref's chunks with each chunk's rows split over data (grad L_ref: each data group sums
    its share), or on every device when the rows do not divide."""
    if ref.groups[0]["tokens"].shape[1] % sharding.data_size(mesh):
        return _replicated(ref, mesh)
    return dataclasses.replace(ref, groups=sharding.put_rows(ref.groups, mesh, axis=1))


def _examples(tok, pairs, icfg: InfluenceConfig, max_len: int) -> list[text.Example]:
    scfg = dataclasses.replace(Config().sft, system=icfg.system, max_len=max_len)
    return encode_pairs(tok, pairs, scfg)


def _done_ids(path: str) -> set:
    """Ids already scored; a last line cut by a kill is cut off the file."""
    return set(read_resumable_jsonl(path, lambda row: json.dumps(row["id"]), "score row"))


def score_settings(icfg: InfluenceConfig, warm: dict, hp: influence_lib.AdamHP, ref_path: str) -> dict:
    """What every score depends on: the estimator, the one step (lr, clipping), the dtype the
    params are held in, the lengths and fields the texts are encoded with, the warm state
    (warm_state.json's bytes and the step it points to), the probing and reference sets' bytes
    and the model files'. Batch sizes and memory settings are left out: they do not change
    the scores (beyond fp32 summation order, ~1e-8)."""

    def data(path):  # a file or saved dataset folder by content; a hub id by name
        return sha256_path(path) or f"name:{path}"

    return {"estimator": icfg.estimator, "lr": hp.lr, "grad_clip": hp.grad_clip, "param_dtype": icfg.param_dtype,
            "max_len": icfg.max_len, "ref_max_len": icfg.ref_max_len, "system": icfg.system,
            "prompt_field": icfg.prompt_field, "response_field": icfg.response_field,
            "warm_state": sha256_file(warm_state_file(icfg.warm_state)), "warm_step": warm["step"],
            "probe": data(icfg.probe), "reference": data(ref_path), "model": model_fingerprint(warm["model"])}


def check_settings(out_dir: str, settings: dict, n_done: int) -> None:
    """Scores in ``out_dir`` must come from these settings (else a one-line error naming the
    changed keys); then ``settings.json`` records them, before any new row is written."""
    path = os.path.join(out_dir, "settings.json")
    if n_done:
        if not os.path.exists(path):
            raise UserError(f"{out_dir}: holds {n_done} influence scores but no settings.json (an older "
                            "version wrote them), so they cannot be checked against these settings; use a new "
                            "--out or remove the folder")
        try:
            with open(path) as f:
                old = json.load(f)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: not valid JSON ({e.msg}); use a new --out or remove the folder") from None
        changed = [k for k in settings if old.get(k) != settings[k]] + [k for k in old if k not in settings]
        if changed:
            raise UserError(f"{out_dir}: holds {n_done} influence scores computed with other settings (changed: "
                            f"{', '.join(changed)}); use a new --out, or remove the folder to score again")
    write_json_atomic(path, settings)


def _score_row(pid, seed_prompt, cols: dict, j: int, baseline: float, icfg: InfluenceConfig) -> dict:
    """One scores.jsonl row from the j-th entries of a batch's columns (``drop``, ``unchanged``,
    ``drop32``, ``pred``: those the estimator computed)."""
    want_exact = icfg.estimator in ("exact", "both")
    row = {"id": pid, "seed_prompt": seed_prompt}
    if want_exact:
        drop = float(cols["drop"][j])
        row.update(influence=drop, ref_loss_after=baseline - drop, estimator="exact")
        if "drop32" in cols:
            row.update(param_dtype=icfg.param_dtype, unchanged_fraction=float(cols["unchanged"][j]),
                       influence_fp32=float(cols["drop32"][j]))
    if "pred" in cols:
        fo = float(cols["pred"][j])
        if want_exact:
            row.update(influence_first_order=fo, estimator="both")
        else:
            row.update(influence=fo, ref_loss_predicted=baseline - fo, estimator="first_order")
    return row


def run_influence(cfg: Config, out_dir: str, progress: bool = True, profile_dir: str | None = None,
                  keep_reference: bool = False) -> dict:
    """Scores every probing example of ``cfg.influence``. ``keep_reference``: keep L_ref's baseline
    and gradient (on the host) for a later scoring on the same warm student in this process."""
    icfg = cfg.influence
    if not icfg.warm_state:
        raise UserError("influence.warm_state is not set (the warm_state.json of `montessori sft`)")
    if not icfg.probe:
        raise UserError("influence.probe is not set (the probing set JSONL)")
    warm = read_warm_state(icfg.warm_state)
    probe_pairs = pairs_lib.load_pairs(icfg.probe, prompt_field=icfg.prompt_field, response_field=icfg.response_field)
    ref_path = icfg.reference or PACKAGED_REFERENCE
    ref_pairs = pairs_lib.load_pairs(ref_path)

    mesh, rules = sharding.mesh_and_rules(cfg.mesh)
    hp = influence_lib.AdamHP.from_warm_state(warm, icfg.lr, icfg.grad_clip)
    if not hp.lr > 0:
        raise UserError(f"{icfg.warm_state}: the warm-up leaves the lr at {hp.lr:g} (its schedule decayed to "
                        "min_lr_ratio), so one step on any example changes nothing; set influence.lr, or "
                        "warm up with a schedule that ends above zero (e.g. warmup.optim.min_lr_ratio=0.1)")
    os.makedirs(out_dir, exist_ok=True)
    scores_path = os.path.join(out_dir, "scores.jsonl")
    done = _done_ids(scores_path)
    check_settings(out_dir, score_settings(icfg, warm, hp, ref_path), len(done))
    distributed.barrier("influence/resume")  # every process has read the scores before the writer appends

    with jax.set_mesh(mesh):
        student = load_warm_student(warm, mesh, rules)
        tok = student.tok
        pad_id = text.pad_id(tok)
        probe = _examples(tok, probe_pairs, icfg, icfg.max_len)
        ref_examples = _examples(tok, ref_pairs, icfg, icfg.ref_max_len)
        ref_rows = influence_lib.ref_rows_per_chunk(icfg.ref_batch_size, sharding.data_size(mesh))
        ref = _replicated(influence_lib.make_ref_set(ref_examples, ref_rows, pad_id, icfg.ref_max_lengths), mesh)
        ids = [p.id if p.id is not None else i for i, p in enumerate(probe_pairs)]
        todo = [i for i, pid in enumerate(ids) if json.dumps(pid) not in done]

        p_dtype = jnp.bfloat16 if icfg.param_dtype == "bfloat16" else jnp.float32
        ref_len = max(g["tokens"].shape[-1] for g in ref.groups)
        probe_len = batching.round_up(max(len(e) for e in probe))  # the longest planned length
        want_exact = icfg.estimator in ("exact", "both")
        B, mem = (icfg.batch_size, None) if icfg.batch_size else influence_memory.choose_batch(
            student.cfg, len(probe), probe_len, ref_rows if want_exact else 0, ref_len,
            icfg.memory_fraction, fused_first_order=hp.grad_clip is None)
        B = sharding.round_rows(B, mesh)  # the probes of a program split over data (dead rows pad)
        if mem and progress:
            print(f"influence: {B} probing examples per program (estimated "
                  f"{mem['per_example_bytes'] / 2**30:.2f} GiB each, {mem['device_bytes'] / 2**30:.0f} GiB device)")

        want_fo = icfg.estimator in ("first_order", "both")
        params = student.params
        # L_ref and its gradient depend on the warm state and D_ref alone: a second scoring of
        # other probes on the same warm student (the teacher shift) reuses them in-process
        # (the files' mtimes: a warm-up or reference set written anew under the same path is another key)
        ref_key = (_stamp(icfg.warm_state), warm["step"], _stamp(ref_path), icfg.ref_max_len,
                   ref_rows, icfg.ref_max_lengths, icfg.system, icfg.param_dtype, icfg.memory_fraction)
        cached = _REF_CACHE.pop(ref_key, {})
        _REF_CACHE.clear()
        if keep_reference:
            _REF_CACHE[ref_key] = cached
        # the first-order estimator alone needs no per-token NLL: L_ref comes with its gradient
        # (one pass over D_ref instead of two)
        need_nll = want_exact or profile_dir is not None or icfg.param_dtype != "float32"
        baseline = base_nll = None
        if "baseline" in cached:
            baseline, base_nll = _take(cached, "baseline")
        if need_nll and base_nll is None:
            baseline, base_nll = influence_lib.make_baseline(student.graphdef, p_dtype)(params, ref.groups)
            if keep_reference:
                _keep(cached, "baseline", (baseline, base_nll))
        exact_fn = influence_lib.make_exact(student.graphdef, hp, p_dtype) if want_exact else None
        check_fp32 = want_exact and icfg.param_dtype != "float32"
        if check_fp32:  # the precision probe also runs the fp32 estimator, to compare signs
            exact32 = influence_lib.make_exact(student.graphdef, hp)
            _, base_nll32 = influence_lib.make_baseline(student.graphdef)(params, ref.groups)
        g_ref = None
        if want_fo:
            plan = influence_memory.plan_ref_grad(student.cfg, ref_len, ref_rows, icfg.memory_fraction)
            if progress:
                print(f"influence: grad L_ref over {plan['rows_per_chunk']} reference row(s) per chunk, "
                      f"{'with' if plan['remat'] else 'without'} remat (estimated "
                      f"{plan['estimated_bytes'] / 2**30:.1f} GiB)")
            if "g_ref" in cached:
                g_ref = _take(cached, "g_ref")
            else:
                grad_ref = _rows_on_data(influence_lib.make_ref_set(ref_examples, plan["rows_per_chunk"], pad_id,
                                                                    icfg.ref_max_lengths), mesh)
                loss_ref, g_ref = influence_lib.make_ref_grad(student.graphdef, plan["remat"])(params, grad_ref.groups)
                if baseline is None:
                    baseline = loss_ref
                    if keep_reference:
                        _keep(cached, "baseline", (baseline, None))
                # held like the params (fsdp x tensor), once for every batch of probes
                g_ref = sharding.put(g_ref, jax.tree.map(lambda p: p.sharding, params))
                if keep_reference:
                    _keep(cached, "g_ref", g_ref)
        baseline = float(sharding.to_host(baseline))
        fo_fn = influence_lib.make_first_order(student.graphdef, hp) if want_fo else None

        t_start, n_done = time.perf_counter(), 0
        bar = tqdm(total=len(probe), initial=len(probe) - len(todo), desc="influence", unit="ex", disable=not progress)
        sub = [probe[i] for i in todo]
        # at most max_lengths padded lengths, planned from the probes' own for the least padding
        lengths = batching.plan_lengths([len(e) for e in sub], B, icfg.max_lengths)
        host_batches = list(batching.batches(sub, B, lengths, pad_id=pad_id))
        if profile_dir and host_batches:
            first = sharding.put_rows(host_batches[0][1], mesh)
            _profile(profile_dir, student, hp, p_dtype, exact_fn, fo_fn, ref, base_nll, g_ref, first, B, progress)
        # every probe length bucket's programs are compiled before the first chunk, so the run
        # never stops mid-way to compile when the (length-sorted) probes reach a longer bucket
        state = (params, student.mu, student.nu, student.count)
        calls = {}
        if want_exact:
            calls["exact"] = (exact_fn, lambda b: (*state, b, ref.groups, base_nll, hp.lr))
        if check_fp32:
            calls["exact32"] = (exact32, lambda b: (*state, b, ref.groups, base_nll32, hp.lr))
        if want_fo:
            calls["first_order"] = (fo_fn, lambda b: (*state, b, g_ref, hp.lr))
        programs, t_compile = {}, time.perf_counter()
        for _, batch in host_batches:
            T = batch["tokens"].shape[1]
            if T not in programs:
                dev = sharding.put_rows(batch, mesh)
                programs[T] = {name: fn.lower(*args(dev)).compile() for name, (fn, args) in calls.items()}
        if progress and programs:
            print(f"influence: {len(programs) * len(calls)} program(s) for probe lengths {sorted(programs)} "
                  f"compiled in {time.perf_counter() - t_compile:.1f} s")
        with open_append(scores_path) as out:
            for idx, batch in host_batches:
                run = programs[batch["tokens"].shape[1]]
                batch = sharding.put_rows(batch, mesh)
                got = {name: sharding.to_host(run[name](*args(batch))) for name, (_, args) in calls.items()}
                cols = {}
                if "exact" in got:
                    cols["drop"], cols["unchanged"] = got["exact"]
                if "exact32" in got:
                    cols["drop32"] = got["exact32"][0]
                if "first_order" in got:
                    cols["pred"] = got["first_order"]
                for j, local in enumerate(idx):
                    i = todo[local]
                    row = _score_row(ids[i], probe_pairs[i].row.get("seed_prompt"), cols, j, baseline, icfg)
                    out.write(json.dumps(row) + "\n")
                sync_file(out)
                faults.point("influence.chunk")
                n_done += len(idx)
                bar.update(len(idx))
                bar.set_postfix(ex_s=f"{n_done / (time.perf_counter() - t_start):.2f}")
        bar.close()
        elapsed = time.perf_counter() - t_start

    distributed.barrier("influence/scores-written")  # the summary reads the writer's scores
    summary = summarize(scores_path, baseline, icfg, B, ref, warm, hp, elapsed, n_done)
    write_json_atomic(os.path.join(out_dir, "summary.json"), summary)
    plot_histogram(scores_path, os.path.join(out_dir, "influence_hist.png"))
    return summary


def _profile(profile_dir, student, hp, p_dtype, exact_fn, fo_fn, ref, base_nll, g_ref, batch, B, progress) -> dict:
    """--profile: the estimator's programs on the first chunk (see ``influence_profile``)."""
    from montessori_jax.stages.influence_profile import profile_influence

    common = (student.params, student.mu, student.nu, student.count, batch)
    programs = {}
    if exact_fn is not None:
        programs["exact"] = (exact_fn, (*common, ref.groups, base_nll, hp.lr))
    if fo_fn is not None:
        programs["first_order"] = (fo_fn, (*common, g_ref, hp.lr))
    ex = jax.tree.map(lambda x: x[0], batch)
    phase_args = dict(graphdef=student.graphdef, hp=hp, param_dtype=p_dtype, params=student.params, mu=student.mu,
                      nu=student.nu, count=student.count, ex=ex, lr=hp.lr,
                      groups=ref.groups if exact_fn is not None else None, base_nll=base_nll)
    return profile_influence(programs, B, phase_args, profile_dir, say=print if progress else (lambda *a: None))


def _score_rows(scores_path: str) -> list[dict]:
    with open(scores_path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def summarize(scores_path, baseline, icfg, B, ref, warm, hp, elapsed, n_new) -> dict:
    rows = _score_rows(scores_path)
    infl = np.array([r["influence"] for r in rows], np.float64)
    s = {
        "n": len(rows),
        "estimator": icfg.estimator,
        "param_dtype": icfg.param_dtype,
        "baseline_ref_loss": baseline,
        "reference": {"rows": ref.n_rows, "tokens": ref.n_tokens},
        "lr": hp.lr,
        "grad_clip": hp.grad_clip,
        "warm_step": warm["step"],
        "positive": int((infl > 0).sum()),
        "negative": int((infl < 0).sum()),
        "zero": int((infl == 0).sum()),
        "quantiles": {str(q): float(np.quantile(infl, q)) for q in (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)} if len(infl) else {},
        "batch_size": B,
        "seconds_this_run": elapsed,
        "examples_per_s_this_run": n_new / elapsed if elapsed > 0 and n_new else None,
    }
    if icfg.estimator == "both":
        s["agreement"] = stats.agreement(infl, np.array([r["influence_first_order"] for r in rows]))
    if icfg.param_dtype != "float32" and rows and "unchanged_fraction" in rows[0]:
        fp32 = np.array([r["influence_fp32"] for r in rows])
        s["precision_probe"] = {
            "unchanged_fraction_mean": float(np.mean([r["unchanged_fraction"] for r in rows])),
            "sign_agreement_with_fp32": float(np.mean(np.sign(infl) == np.sign(fp32))),
            "spearman_with_fp32": stats.spearman(infl, fp32),
        }
    return s


def plot_histogram(scores_path: str, png_path: str) -> str | None:
    plt = metrics_lib.pyplot()
    if plt is None:
        return None
    rows = _score_rows(scores_path)
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.hist([r["influence"] for r in rows], bins=min(40, max(5, len(rows) // 2)), alpha=0.8, label="influence")
    if "influence_first_order" in rows[0]:
        ax.hist([r["influence_first_order"] for r in rows], bins=min(40, max(5, len(rows) // 2)), alpha=0.5,
                label="first-order")
    ax.axvline(0, color="k", lw=0.8)
    ax.set_xlabel("L_ref(before) - L_ref(after)   (> 0: the example helps)")
    ax.set_ylabel("probing examples")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)
    return png_path
