"""`montessori run`: every stage of a config, iterations, both arms, one run directory.

    run_dir/
      manifest.json                 resolved config, package versions, per stage: status,
                                    config, inputs and outputs (with sha256), timings
      base/eval/                    the initial student (iteration 0), when run.eval_base
      iter1/montessori/synthesize/  warm-up and probing sets from the teacher
                      /warmup/      the student's warm-up (train state for influence)
                      /influence/   scores.jsonl
                      /preferences/ pairs.jsonl
                      /dpo/         the optimized teacher (dpo/model)
                      /synthesize_train/  the training set, from the optimized teacher
                      /teacher_shift/     influence of the initial vs the optimized teacher's
                                    instructions on the warm student (run.teacher_shift)
                      /train/       the student trained on it (train/model)
                      /eval/
      iter1/self_instruct/synthesize_train, train, eval   (the baseline arm: same budget,
                                    the unoptimized teacher)
      summary.json, summary.png     the eval table across arms and iterations

Iteration k+1 starts from iteration k's student (``train/model``) and, in the Montessori arm,
its optimized teacher (``dpo/model``). Each stage is the same code path as its own command
(``montessori synthesize``, ``sft``, ...); this module only wires outputs to inputs, records
them, and decides what is left to do.

Resume: a rerun skips finished stages and calls an unfinished one again (every stage resumes
itself from its last record, chunk or checkpoint). A finished stage whose config section
differs from the one it ran with is an error naming the changed keys, unless
``restart_from`` names it (or an earlier stage of its arm): that stage and the later ones of
its arm then run again from scratch.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

from montessori_jax.config import Config, ModelConfig, to_dict
from montessori_jax.core import distributed, weights
from montessori_jax.errors import ConfigError, UserError
from montessori_jax.files import PACKAGED_REFERENCE, is_writer, read_json, sha256_path, write_json_atomic
from montessori_jax.stages import data as data_lib
from montessori_jax.stages import dpo, judge, preferences, sft, teacher_shift
from montessori_jax.stages import eval as eval_lib
from montessori_jax.stages import influence as influence_stage
from montessori_jax.stages import pairs as pairs_lib
from montessori_jax.stages.synthesis import load_seed_pool, synthesize

MANIFEST = "manifest.json"
MONTESSORI_STAGES = ("synthesize", "warmup", "influence", "preferences", "dpo", "synthesize_train",
                     "teacher_shift", "train", "eval")
BASELINE_STAGES = ("synthesize_train", "train", "eval")
# the training sets are drawn from their own random stream, not the probing set's
TRAIN_SEED_OFFSET = 7919


# ---------------------------------------------------------------------------------------------
# Hashes of inputs and outputs


def _model_file(path: str) -> str:
    """The file or folder that holds a model's weights ("smollm2" resolves to its GGUF)."""
    return weights.resolve_path(path)


# ---------------------------------------------------------------------------------------------
# The plan: stages in order, each with the config it runs with and a function that runs it


@dataclasses.dataclass
class Stage:
    key: str  # "iter1/montessori/influence", "base/eval"
    name: str  # "influence"
    arm: str  # "montessori", "self_instruct" or "base"
    iteration: int
    dir: str
    config: dict  # the config sections this stage runs with (compared on resume)
    run: Callable[[], tuple[dict, dict, dict]]  # -> (summary, inputs, outputs), name -> path


def _arms(cfg: Config) -> list[str]:
    return ["montessori", "self_instruct"] if cfg.run.arm == "both" else [cfg.run.arm]


def _plain(obj) -> Any:
    return json.loads(json.dumps(to_dict(obj)))


class _Wiring:
    """Paths of each iteration's models, decided by what earlier stages wrote."""

    def __init__(self, cfg: Config, run_dir: str):
        self.cfg, self.run_dir = cfg, run_dir

    def dir(self, iteration: int, arm: str, name: str) -> str:
        return os.path.join(self.run_dir, f"iter{iteration}", arm, name)

    def student(self, iteration: int, arm: str) -> ModelConfig:
        """The student iteration ``iteration`` starts from."""
        if iteration == 1:
            return self.cfg.student
        return dataclasses.replace(self.cfg.student, path=os.path.join(self.dir(iteration - 1, arm, "train"), "model"))

    def teacher(self, iteration: int, arm: str) -> ModelConfig:
        """The teacher iteration ``iteration`` starts from: the Montessori arm's optimized
        teacher of the iteration before (the same teacher when DPO had no pairs); the
        baseline arm's is always the unoptimized one."""
        if iteration == 1 or arm != "montessori":
            return self.cfg.teacher
        return self.optimized_teacher(iteration - 1)

    def optimized_teacher(self, iteration: int) -> ModelConfig:
        dpo_dir = self.dir(iteration, "montessori", "dpo")
        summary = read_json(os.path.join(dpo_dir, "summary.json"))
        if summary is not None and summary.get("skipped"):
            return self.teacher(iteration, "montessori")
        return dataclasses.replace(self.cfg.teacher, path=os.path.join(dpo_dir, "model"))


def plan(cfg: Config, run_dir: str, *, progress: bool = True, generator_factory=None) -> list[Stage]:
    """The stages of ``cfg`` in the order they run. ``generator_factory(teacher: ModelConfig)``
    replaces the teacher's sampler in synthesis (tests, other engines)."""
    w = _Wiring(cfg, run_dir)
    stages: list[Stage] = []

    def gen(teacher: ModelConfig):
        return generator_factory(teacher) if generator_factory else None

    def model_input(m: ModelConfig) -> str:
        return _model_file(m.path)

    if cfg.run.eval_base:
        d = os.path.join(run_dir, "base", "eval")

        def run_base_eval(d=d):
            s = eval_lib.run_eval(cfg, d, models={"student": cfg.student.path}, progress=progress)
            return s, {"student": model_input(cfg.student)}, _eval_outputs(s, d)

        stages.append(Stage("base/eval", "eval", "base", 0, d,
                            {"eval": _plain(cfg.eval), "student": _plain(cfg.student)}, run_base_eval))

    for k in range(1, cfg.run.iterations + 1):
        for arm, name in _iteration_order(cfg):
            d = w.dir(k, arm, name)
            stages.append(Stage(f"iter{k}/{arm}/{name}", name, arm, k, d,
                                _stage_config(cfg, name, k), _runner(cfg, w, name, k, arm, d, progress, gen)))
    return stages


def _iteration_order(cfg: Config) -> list[tuple[str, str]]:
    """(arm, stage) of one iteration in the order they run. With both arms, the baseline's
    training set is synthesized before the teacher shift, which scores it against the
    optimized teacher's; then each arm trains and is evaluated."""
    arms = _arms(cfg)
    names = {"montessori": [n for n in MONTESSORI_STAGES if n != "teacher_shift" or cfg.run.teacher_shift],
             "self_instruct": list(BASELINE_STAGES)}
    if len(arms) == 1:
        return [(arms[0], n) for n in names[arms[0]]]
    cut = names["montessori"].index("synthesize_train") + 1
    return ([("montessori", n) for n in names["montessori"][:cut]] + [("self_instruct", "synthesize_train")]
            + [("montessori", n) for n in names["montessori"][cut:]]
            + [("self_instruct", n) for n in names["self_instruct"][1:]])


def _eval_outputs(summary: dict, d: str) -> dict:
    out = {"summary": os.path.join(d, "summary.json")}
    answers = summary["models"]["student"].get("answers")
    if answers:
        out["answers"] = answers
    return out


def _train_synthesis(cfg: Config, k: int):
    return dataclasses.replace(cfg.synthesis, num_instructions=cfg.run.train_instructions,
                               max_prompts=cfg.run.train_max_prompts, splits=None, iteration=k)


def _stage_config(cfg: Config, name: str, k: int) -> dict:
    """What a stage's result depends on besides its inputs (recorded; compared on resume).
    Models appear by dtype and options; their paths are inputs (with hashes)."""
    def model(m: ModelConfig) -> dict:
        return {k_: v for k_, v in _plain(m).items() if k_ != "path"}

    if name == "synthesize":
        return {"seed": cfg.seed, "teacher": model(cfg.teacher), "synthesis": _plain(cfg.synthesis)}
    if name == "warmup":
        return {"seed": cfg.seed, "student": model(cfg.student), "warmup": _plain(cfg.warmup)}
    if name == "influence":
        return {"influence": _plain(cfg.influence)}
    if name == "preferences":
        return {"preferences": _plain(cfg.preferences)}
    if name == "dpo":
        return {"seed": cfg.seed, "teacher": model(cfg.teacher), "dpo": _plain(cfg.dpo)}
    if name == "synthesize_train":
        return {"seed": cfg.seed, "teacher": model(cfg.teacher), "synthesis": _plain(_train_synthesis(cfg, k))}
    if name == "train":
        return {"seed": cfg.seed, "student": model(cfg.student), "sft": _plain(cfg.sft)}
    if name == "eval":
        return {"eval": _plain(cfg.eval), "student": model(cfg.student)}
    if name == "teacher_shift":
        return {"seed": cfg.seed, "influence": _plain(cfg.influence), "shift_instructions": cfg.run.shift_instructions,
                "arm": cfg.run.arm}
    raise ValueError(name)


def _runner(cfg: Config, w: _Wiring, name: str, k: int, arm: str, d: str, progress: bool, gen):
    synth_dir, warm_dir = w.dir(k, arm, "synthesize"), w.dir(k, arm, "warmup")
    infl_dir, pref_dir = w.dir(k, arm, "influence"), w.dir(k, arm, "preferences")
    train_synth_dir, train_dir = w.dir(k, arm, "synthesize_train"), w.dir(k, arm, "train")

    def j(*parts):
        return os.path.join(*parts)

    if name == "synthesize":
        def run():
            teacher = w.teacher(k, arm)
            scfg = dataclasses.replace(cfg.synthesis, iteration=k)
            s = synthesize(scfg, d, teacher=teacher, seed=cfg.seed, generator=gen(teacher), progress=progress,
                           mesh=cfg.mesh)
            return s, {"teacher": _model_file(teacher.path)}, {
                "records": j(d, "records.jsonl"), "warmup": j(d, "warmup.jsonl"), "probe": j(d, "probe.jsonl")}
    elif name == "warmup":
        def run():
            student = w.student(k, arm)
            c = dataclasses.replace(cfg, student=student,
                                    warmup=dataclasses.replace(cfg.warmup, data=j(synth_dir, "warmup.jsonl")))
            s = sft.run_sft(c, d, progress=progress, section="warmup")
            return s, {"student": _model_file(student.path), "data": j(synth_dir, "warmup.jsonl")}, {
                "warm_state": j(d, "warm_state.json"), "metrics": j(d, "metrics.jsonl")}
    elif name == "influence":
        def run():
            icfg = dataclasses.replace(cfg.influence, warm_state=j(warm_dir, "warm_state.json"),
                                       probe=j(synth_dir, "probe.jsonl"))
            s = influence_stage.run_influence(dataclasses.replace(cfg, influence=icfg), d, progress=progress,
                                              keep_reference=cfg.run.teacher_shift)
            return s, {"warm_state": icfg.warm_state, "probe": icfg.probe,
                       "reference": cfg.influence.reference or PACKAGED_REFERENCE}, {
                "scores": j(d, "scores.jsonl")}
    elif name == "preferences":
        def run():
            pcfg = dataclasses.replace(cfg.preferences, scores=j(infl_dir, "scores.jsonl"),
                                       probe=j(synth_dir, "probe.jsonl"))
            s = preferences.run_preferences(dataclasses.replace(cfg, preferences=pcfg), d)
            return s, {"scores": pcfg.scores, "probe": pcfg.probe}, {"pairs": j(d, "pairs.jsonl")}
    elif name == "dpo":
        def run():
            teacher = w.teacher(k, arm)
            pairs = j(pref_dir, "pairs.jsonl")
            inputs = {"teacher": _model_file(teacher.path), "pairs": pairs}
            with open(pairs, encoding="utf-8") as f:
                n_pairs = sum(1 for line in f if line.strip())
            if n_pairs == 0:
                # nothing to prefer: the teacher goes on unchanged (the summary says so)
                os.makedirs(d, exist_ok=True)
                s = {"skipped": "no preference pairs", "pairs": 0, "model": None}
                write_json_atomic(j(d, "summary.json"), s)
                return s, inputs, {"summary": j(d, "summary.json")}
            c = dataclasses.replace(cfg, teacher=teacher, dpo=dataclasses.replace(cfg.dpo, pairs=pairs))
            s = dpo.run_dpo(c, d, progress=progress)
            return s, inputs, {"model": j(d, "model"), "metrics": j(d, "metrics.jsonl")}
    elif name == "synthesize_train":
        def run():
            teacher = w.optimized_teacher(k) if arm == "montessori" else w.teacher(k, arm)
            s = synthesize(_train_synthesis(cfg, k), d, teacher=teacher, seed=cfg.seed + TRAIN_SEED_OFFSET,
                           generator=gen(teacher), progress=progress, mesh=cfg.mesh)
            return s, {"teacher": _model_file(teacher.path)}, {"records": j(d, "records.jsonl")}
    elif name == "teacher_shift":
        def run():
            optimized = j(train_synth_dir, "records.jsonl")
            if "self_instruct" in _arms(cfg):
                initial, source = j(w.dir(k, "self_instruct", "synthesize_train"), "records.jsonl"), \
                    "the Self-Instruct arm's training set (the unoptimized teacher)"
            else:
                initial, source = j(synth_dir, "probe.jsonl"), "this iteration's probing set (the teacher before DPO)"
            s = teacher_shift.run_teacher_shift(cfg, d, warm_state=j(warm_dir, "warm_state.json"), initial=initial,
                                                optimized=optimized, n=cfg.run.shift_instructions,
                                                initial_source=source, progress=progress)
            return s, {"warm_state": j(warm_dir, "warm_state.json"), "initial": initial, "optimized": optimized}, {
                "summary": j(d, "summary.json"), "scores": j(d, "influence", "scores.jsonl")}
    elif name == "train":
        def run():
            student = w.student(k, arm)
            data = j(train_synth_dir, "records.jsonl")
            c = dataclasses.replace(cfg, student=student, sft=dataclasses.replace(cfg.sft, data=data, export=True))
            s = sft.run_sft(c, d, progress=progress, section="sft")
            return s, {"student": _model_file(student.path), "data": data}, {
                "model": j(d, "model"), "metrics": j(d, "metrics.jsonl")}
    elif name == "eval":
        def run():
            model = j(train_dir, "model")
            s = eval_lib.run_eval(cfg, d, models={"student": model}, progress=progress)
            return s, {"student": model}, _eval_outputs(s, d)
    else:
        raise ValueError(name)
    return run


# ---------------------------------------------------------------------------------------------
# The manifest


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def package_versions() -> dict:
    from importlib import metadata

    out = {"python": sys.version.split()[0]}
    for name in ("montessori-jax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "transformers", "numpy"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def read_manifest(run_dir: str) -> dict:
    path = os.path.join(run_dir, MANIFEST)
    m = read_json(path)
    if m is None:
        raise UserError(f"{run_dir}: no {MANIFEST} (not a run directory of `montessori run`)")
    return m


def _changed_keys(old: Any, new: Any, path: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new)):
            sub = f"{path}.{key}" if path else str(key)
            if key not in old or key not in new:
                out.append(sub)
            else:
                out.extend(_changed_keys(old[key], new[key], sub))
        return out
    return [] if old == new else [path]


def _files(paths: Mapping[str, str], run_dir: str) -> dict:
    """name -> {path (relative to the run directory when inside it), sha256}."""
    out = {}
    for name, p in paths.items():
        ap = os.path.abspath(p)
        rel = os.path.relpath(ap, os.path.abspath(run_dir))
        out[name] = {"path": ap if rel.startswith("..") else rel, "sha256": sha256_path(ap)}
    return out


# ---------------------------------------------------------------------------------------------
# Running


def _select_restart(stages: list[Stage], restart_from: str | None) -> set[str]:
    """Keys of the stages to run again: the named one and the later ones of its arm."""
    if not restart_from:
        return set()
    idx = next((i for i, s in enumerate(stages) if restart_from in (s.key, s.name)), None)
    if idx is None:
        names = sorted({s.name for s in stages}) + [s.key for s in stages]
        raise UserError(f"--restart-from {restart_from}: no such stage in this run; stages: {', '.join(names)}")
    first = stages[idx]
    return {s.key for s in stages[idx:] if s.arm == first.arm}


def preflight(cfg: Config) -> None:
    """Checks that need no model run: paths, the seed pool, splits, the eval set's overlap.
    Raises UserError before anything is written."""
    for role in ("teacher", "student"):
        path = getattr(cfg, role).path
        try:
            _model_file(path)
        except UserError as e:
            raise UserError(f"{role}.path: {e}") from None
    pool = load_seed_pool(cfg.synthesis.seed_pool, cfg.synthesis.seed_fields, cfg.synthesis.seed_split)
    if len(pool) < cfg.synthesis.shots:
        raise UserError(f"{cfg.synthesis.seed_pool}: the seed pool has {len(pool)} tasks; "
                        f"prompts need synthesis.shots={cfg.synthesis.shots}")
    if "montessori" in _arms(cfg):
        splits = cfg.synthesis.splits or {}
        if not {"warmup", "probe"} <= set(splits):
            raise UserError("synthesis.splits must name `warmup` and `probe` for the montessori arm, "
                            "e.g. synthesis.splits={warmup: 0.25, probe: 0.75}")
    # an eval set that repeats D_ref measures what influence optimized the teacher for, not
    # what the student learned: in a run that is an error (`montessori eval` alone only warns)

    ecfg = cfg.eval
    data_path = data_lib.resolve_data(ecfg.data)
    items = [(p.where, data_lib.prompt_text(p.prompt))
             for p in pairs_lib.load_pairs(data_path, ecfg.split, ecfg.prompt_field, ecfg.response_field)]
    what, ref_path, ref_items = data_lib.overlap_sets(cfg, ecfg)["reference"]
    rows = data_lib.find_overlaps(items, ref_items)
    if rows:
        raise UserError(data_lib.overlap_message(data_path, what, ref_path, rows)
                        + "; give eval.data a held-out set")


def run(cfg: Config, run_dir: str, *, restart_from: str | None = None, progress: bool = True,
        generator_factory=None, argv: list[str] | None = None) -> dict:
    """Run (or resume) every stage of ``cfg`` in ``run_dir``; returns the final summary.

    In a cluster every process runs this alike: process 0 writes the manifest and prints,
    and every stage ends with a barrier, so no process starts a stage before the files of the
    ones before it are complete."""
    if cfg.generation.backend != "jax":
        # the run samples from teachers it makes (the DPO-optimized one), which no server holds
        raise ConfigError(f"generation.backend={cfg.generation.backend}: `montessori run` samples with the jax "
                          "backend only; use the openai backend with `montessori synthesize` and `montessori eval`")
    preflight(cfg)
    progress = progress and is_writer()
    stages = plan(cfg, run_dir, progress=progress, generator_factory=generator_factory)
    path = os.path.join(run_dir, MANIFEST)
    manifest = read_json(path) if os.path.isdir(run_dir) else None
    if manifest is None and os.path.isdir(run_dir) and os.listdir(run_dir):
        raise UserError(f"{run_dir}: exists, is not empty and has no {MANIFEST}; choose a new --run-dir")

    redo = _select_restart(stages, restart_from)
    records = (manifest or {}).get("stages", {})
    changed = []
    for s in stages:
        rec = records.get(s.key)
        if rec is None or s.key in redo:
            continue
        keys = _changed_keys(rec.get("config"), s.config)
        if keys:
            changed.append((s, keys))
    if changed:
        s, keys = changed[0]
        more = f" (and {len(changed) - 1} later stages)" if len(changed) > 1 else ""
        raise UserError(
            f"{run_dir}: stage {s.key} ran with other settings{more}; changed: {', '.join(keys[:8])}"
            f"{' ...' if len(keys) > 8 else ''}. Rerun with --restart-from {s.key} to redo it and what follows, "
            "or use a new --run-dir")

    os.makedirs(run_dir, exist_ok=True)
    if manifest is None:
        manifest = {"created": _now(), "stages": {}}
    manifest.update(config=_plain(cfg), packages=package_versions(), updated=_now())
    manifest.setdefault("invocations", []).append({"at": _now(), "argv": argv, "restart_from": restart_from})
    for s in stages:
        if s.key in redo and s.key in manifest["stages"]:
            if is_writer():
                shutil.rmtree(s.dir, ignore_errors=True)
            del manifest["stages"][s.key]
    manifest["order"] = [s.key for s in stages]
    write_json_atomic(path, manifest)
    distributed.barrier("run/start")  # a stage restarted is gone in every process's view

    t_run = time.perf_counter()
    for s in stages:
        rec = manifest["stages"].get(s.key)
        if rec is not None and rec.get("status") == "done":
            if progress:
                print(f"[{s.key}] done ({rec.get('seconds', 0):.0f} s), skipped", file=sys.stderr)
            continue
        if progress:
            print(f"[{s.key}] {'resuming' if rec else 'running'}", file=sys.stderr)
        rec = manifest["stages"].setdefault(s.key, {"name": s.name, "arm": s.arm, "iteration": s.iteration,
                                                    "dir": os.path.relpath(s.dir, run_dir), "seconds": 0.0})
        rec.update(status="running", config=s.config, started=rec.get("started") or _now(), attempts=rec.get("attempts", 0) + 1)
        write_json_atomic(path, manifest)
        t0 = time.perf_counter()
        try:
            summary, inputs, outputs = s.run()
        except BaseException as e:
            rec.update(status="failed", error=f"{type(e).__name__}: {e}"[:500],
                       seconds=rec["seconds"] + time.perf_counter() - t0)
            write_json_atomic(path, manifest)
            raise
        rec.update(status="done", finished=_now(), seconds=round(rec["seconds"] + time.perf_counter() - t0, 3),
                   summary=_brief(summary))
        if is_writer():  # the manifest's hashes: only the writer's manifest is kept
            rec.update(inputs=_files(inputs, run_dir), outputs=_files(outputs, run_dir))
        rec.pop("error", None)
        write_json_atomic(path, manifest)
        distributed.barrier(f"run/{s.key}")  # the stage's files are complete before the next reads them

    result = _final_summary(cfg, run_dir, stages)
    manifest["seconds_this_invocation"] = round(time.perf_counter() - t_run, 3)
    manifest["summary"] = os.path.join(run_dir, "summary.json")
    write_json_atomic(path, manifest)
    distributed.barrier("run/end")
    return result


def _brief(summary: dict) -> dict:
    """The scalar fields of a stage's summary, for the manifest (the whole one is in its dir)."""
    return {k: v for k, v in (summary or {}).items() if isinstance(v, (int, float, str, bool)) or v is None}


def _format_heldout(h: dict, iteration: int | None) -> str:
    b, a = h["before"], h["after"]
    return (f"DPO held-out pairs{f' iter{iteration}' if iteration else ''} ({h['pairs']}): reward accuracy "
            f"{b['reward_accuracy']:.2f} -> {a['reward_accuracy']:.2f}, margin {b['margin']:+.4f} -> {a['margin']:+.4f}, "
            f"loss {b['loss']:.4f} -> {a['loss']:.4f}")


def _arm_differences(rows: list[dict]) -> dict[int, float]:
    """iteration -> the Montessori student's reference NLL minus the Self-Instruct student's."""
    by = {(r.get("arm"), r.get("iteration")): r.get("ref_nll") for r in rows}
    return {k: by[("montessori", k)] - by[("self_instruct", k)] for (arm, k) in by
            if arm == "montessori" and by.get(("self_instruct", k)) is not None and by[(arm, k)] is not None}


def _final_summary(cfg: Config, run_dir: str, stages: list[Stage]) -> dict:
    rows = []
    for s in stages:
        if s.name != "eval":
            continue
        summary = read_json(os.path.join(s.dir, "summary.json"))
        if summary is not None:
            rows.extend(eval_lib.summary_rows(summary, arm=s.arm, iteration=s.iteration))
    out = {"run_dir": run_dir, "rows": rows, "table": eval_lib.format_table(rows)}
    report = [out["table"]]
    shifts, heldout = [], []
    for s in stages:
        if s.name == "teacher_shift":
            summary = teacher_shift.read_summary(os.path.join(s.dir, "summary.json"))
            if summary is not None:
                shifts.append({"iteration": s.iteration, **summary})
                report.append(teacher_shift.format_lines(summary, f"iter{s.iteration}" if cfg.run.iterations > 1 else ""))
        elif s.name == "dpo":
            summary = read_json(os.path.join(s.dir, "summary.json")) or {}
            if summary.get("heldout"):
                heldout.append({"iteration": s.iteration, **summary["heldout"]})
                report.append(_format_heldout(summary["heldout"], s.iteration if cfg.run.iterations > 1 else None))
    if len(rows) and "self_instruct" in _arms(cfg) and "montessori" in _arms(cfg):
        out["nll_difference"] = _arm_differences(rows)
        report.extend(f"Montessori - Self-Instruct student, iter{k}: reference-answer NLL {d:+.4f} (< 0: Montessori better)"
                      for k, d in sorted(out["nll_difference"].items()))
    judged = _judge_arms(cfg, run_dir, stages)
    if judged is not None:
        out["judge"] = judged
        report.append(judged["table"])
    out.update(teacher_shift=shifts, dpo_heldout=heldout, report="\n\n".join(report))
    write_json_atomic(os.path.join(run_dir, "summary.json"), out)
    eval_lib.plot_summary(rows, os.path.join(run_dir, "summary.png"))
    return out


def _judge_arms(cfg: Config, run_dir: str, stages: list[Stage]) -> dict | None:
    """With ``judge.base_url`` and ``eval.mt_bench`` set: the Montessori student against the
    Self-Instruct student on MT-Bench, per iteration (``judge.compare_arms``)."""
    dirs = {(s.arm, s.iteration): s.dir for s in stages if s.name == "eval" and s.arm in ("montessori", "self_instruct")}
    return judge.compare_arms(cfg, run_dir, dirs)


# ---------------------------------------------------------------------------------------------
# `montessori status`


def format_status(manifest: dict) -> str:
    order = manifest.get("order") or list(manifest.get("stages", {}))
    stages = manifest.get("stages", {})
    lines = [f"{'stage':36} {'status':8} {'seconds':>8}  outputs"]
    total = 0.0
    for key in order:
        rec = stages.get(key)
        if rec is None:
            lines.append(f"{key:36} {'pending':8} {'':>8}")
            continue
        secs = float(rec.get("seconds") or 0.0)
        total += secs
        outs = ", ".join(f"{n} {o['sha256'][:8] if o.get('sha256') else '(missing)'}"
                         for n, o in (rec.get("outputs") or {}).items())
        lines.append(f"{key:36} {rec.get('status', '?'):8} {secs:8.1f}  {outs}")
        if rec.get("error"):
            lines.append(f"{'':36} error: {rec['error']}")
    lines.append(f"{'total':36} {'':8} {total:8.1f}")
    return "\n".join(lines)
