"""``montessori plan``: the bytes per device each stage of a config needs, the mesh it runs on,
and a verdict per stage (fits, or what to change), before anything is loaded or compiled.

Per stage: params (in the model's param dtype), AdamW's mu and nu (optax keeps them in the
param dtype), gradients (the accumulator and one micro-batch's), activations of the backward
pass with and without remat, and what only that stage holds: the sampler's KV cache, the
influence working set (per example, and the batch B the stage would choose), DPO's reference
pass. Params, optimizer state and gradients divide over the mesh by ``core.sharding``'s rules
(fsdp x tensor, where an axis divides its dimension); a micro-batch's rows divide by data x
fsdp when they divide, as the train steps place them. The sampler (synthesis, eval's answers)
holds its params as the rules place them and splits its rows over data, as it runs. The byte counts of activations are
``kernels.influence_memory``'s heuristics: fp32 upper estimates, checked against measured peaks
on CPU in docs/plan.md.
"""

from __future__ import annotations

import dataclasses
import os
import re

from montessori_jax.config import Config, ModelConfig
from montessori_jax.core import batching, sharding
from montessori_jax.core import model as model_lib
from montessori_jax.errors import UserError
from montessori_jax.kernels import influence_memory as mem
from montessori_jax.kernels.influence import ref_rows_per_chunk

HEADROOM = 0.9  # a stage fits when its total is at most this fraction of the device
DEFAULT_PROMPT_LEN = 1024  # the sampler's prompt bucket when planning (8-shot prompts run to ~700 tokens)
GiB = 2**30

# a checkpoint folder's name -> the shape it has (for presets whose paths are not here)
KNOWN_NAMES = (("llama38b", "llama3-8b"), ("llama3.18b", "llama3-8b"), ("tinyllama", "tinyllama"),
               ("smollm2135m", "smollm2-135m"), ("smollm2", "smollm2-135m"))


def parse_bytes(text: str) -> int:
    """``80GB``, ``95GiB``, ``512MB``, ``1.5TB`` or a plain number of bytes. GB and GiB both
    mean 2**30 (a GPU sold as "80 GB" has about 80 GiB)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]i?B?)?\s*", text, re.I)
    if not m:
        raise UserError(f"--device-memory {text!r}: expected a size such as 80GB or 95GiB")
    unit = (m.group(2) or "").upper().replace("I", "").rstrip("B")
    return int(float(m.group(1)) * {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[unit])


def _dtype_bytes(name: str) -> int:
    return 2 if name == "bfloat16" else 4


def model_shape(mcfg: ModelConfig, role: str, shape: str | None = None) -> tuple[model_lib.LlamaConfig, str]:
    """(architecture, where it came from) of the teacher or student: ``shape`` (a
    ``model.SHAPES`` name) when given, else the checkpoint's own config, else the shape table
    by the folder's name (``models/Meta-Llama-3-8B-Instruct`` -> llama3-8b)."""
    kw = dict(param_dtype=mcfg.param_dtype, dtype=mcfg.dtype, remat=mcfg.remat)
    if shape is not None:
        if shape not in model_lib.SHAPES:
            raise UserError(f"--model-shape {role}={shape}: expected one of {', '.join(model_lib.SHAPES)}")
        return model_lib.LlamaConfig(**model_lib.SHAPES[shape], **kw), f"--model-shape {shape}"
    from montessori_jax.core import weights

    if mcfg.path == weights.EMBEDDED or os.path.exists(mcfg.path):
        cfg = weights.read_config(mcfg.path, mcfg.param_dtype, mcfg.dtype)
        return cfg.replace(remat=mcfg.remat), mcfg.path
    key = re.sub(r"[-_ ]", "", os.path.basename(os.path.normpath(mcfg.path)).lower())
    for needle, name in KNOWN_NAMES:
        if needle in key:
            return model_lib.LlamaConfig(**model_lib.SHAPES[name], **kw), f"{name} (by the name {mcfg.path})"
    raise UserError(f"{role}.path={mcfg.path}: no such checkpoint here and not a model whose shape is known; "
                    f"pass --model-shape {role}=NAME (one of {', '.join(model_lib.SHAPES)})")


def params_per_device(cfg: model_lib.LlamaConfig, mesh_shape: dict, rules=None) -> int:
    """Parameters one device holds on this mesh, by the sharding rules."""
    from flax import nnx

    from montessori_jax.core.compat import logical_axes_of

    rules = rules or sharding.DEFAULT_RULES
    state = nnx.state(model_lib.abstract(cfg), nnx.Param)
    return sum(sharding.per_device_elements(logical_axes_of(v), tuple(v.shape), mesh_shape, rules)
               for _, v in state.items())


def kv_cache_bytes(cfg: model_lib.LlamaConfig, rows: int, slots: int) -> int:
    """The sampler's cache: k and v [L, rows, slots, K, E] in the compute dtype (+ a bool per slot)."""
    return 2 * cfg.n_layers * rows * slots * cfg.n_kv_heads * cfg.hd * _dtype_bytes(cfg.dtype) + rows * slots


@dataclasses.dataclass
class StagePlan:
    stage: str
    model: str  # teacher | student
    rows: int  # rows per device of one pass (micro-batch, sampler batch, probing examples)
    seq_len: int
    params: int
    opt_state: int = 0
    grads: int = 0
    act_remat: int = 0
    act_no_remat: int = 0
    remat: bool = False
    other: dict = dataclasses.field(default_factory=dict)  # named extra terms, bytes (or counts)
    total: int = 0
    verdict: str = ""
    fits: bool = True


def _rows_per_device(rows: int, dp: int) -> int:
    """A batch's rows split over the data-parallel axes when they divide (train_step.batch_shardings)."""
    return rows // dp if dp > 1 and rows % dp == 0 else rows


def _train(stage, role, cfg, section_cfg, key, rows_total, seq_len, mesh_shape, device_bytes, params_dev,
           extra=None) -> StagePlan:
    """SFT or DPO: params + mu + nu + 2 gradients + the backward activations of one micro-batch."""
    dp = mesh_shape["data"] * mesh_shape["fsdp"]
    rows = _rows_per_device(rows_total, dp)
    pb = params_dev * _dtype_bytes(cfg.param_dtype)
    p = StagePlan(stage, role, rows, seq_len, params=pb, opt_state=2 * pb, grads=2 * pb, remat=cfg.remat,
                  act_remat=mem.activation_bytes(cfg, rows, seq_len, True),
                  act_no_remat=mem.activation_bytes(cfg, rows, seq_len, False), other=dict(extra or {}))
    state = 5 * pb
    act = p.act_remat if cfg.remat else p.act_no_remat
    p.total = max(state + act, max(p.other.values(), default=0))
    budget = HEADROOM * device_bytes
    p.fits = p.total <= budget
    if p.fits:
        p.verdict = f"fits ({p.total / device_bytes:.0%})"
    elif state > budget:
        shards = mesh_shape["fsdp"] * mesh_shape["tensor"]
        need = shards * -(-state // int(budget))
        p.verdict = (f"raise fsdp: params + optimizer + gradients alone take {state / GiB:.1f} GiB per device; "
                     f"shard them over >= {need} devices (fsdp x tensor)")
    elif not cfg.remat and state + p.act_remat <= budget:
        p.verdict = f"turn on remat ({role}.remat=true)"
    else:
        fit = [r for r in range(rows - 1, 0, -1) if state + mem.activation_bytes(cfg, r, seq_len, True) <= budget]
        remat = "" if cfg.remat else f" with {role}.remat=true"
        if fit:
            unit = 2 if key == "dpo" else 1  # a DPO pair is two rows
            mb = max(1, fit[0] * (dp if rows != rows_total else 1) // unit)
            p.verdict = f"lower {key}.micro_batch_size to {mb}{remat}"
        else:
            p.verdict = f"lower {key}.max_len, or raise fsdp / data (one row does not fit{remat})"
    return p


def _sampler(stage, role, cfg, rows, n, prompt_len, new_tokens, device_bytes, key, params_dev, data) -> StagePlan:
    """The sampler: its params as the rules place them, the KV cache (one copy of each prompt's P
    slots, shared by its n rows, and M slots per row), the prefill's attention over the prompt,
    and vocabulary-sized per-row temporaries; the rows (prompt slots) split over ``data``, as
    the sampler places them."""
    P = batching.bucket_length(prompt_len)
    M = batching.bucket_length(new_tokens)
    S = P + M
    pb = params_dev * _dtype_bytes(cfg.param_dtype)

    def parts(B):
        B = -(-B // data)  # rows per device
        Bp = max(1, B // n)
        kv = kv_cache_bytes(cfg, Bp, P) + kv_cache_bytes(cfg, B, M)
        # the prompt's forward into the cache: a few activations per token and fp32 scores
        # against all P slots (the cache path attends to every slot, not by causal blocks)
        prefill = Bp * P * (8 * (cfg.d_model + cfg.ffn_dim) + 5 * cfg.n_heads * P)
        per_row = B * cfg.vocab_size * (4 * 4 + 1)  # fp32 logits and their processed copies, `seen`
        return kv, prefill + per_row

    kv, work = parts(rows)
    p = StagePlan(stage, role, rows, S, params=pb, other={"kv_cache": kv, "sampler_work": work})
    p.total = pb + kv + work
    budget = HEADROOM * device_bytes
    p.fits = p.total <= budget
    if p.fits:
        p.verdict = f"fits ({p.total / device_bytes:.0%})"
    elif pb > budget:
        p.verdict = (f"the sampler's params alone take {pb / GiB:.1f} GiB per device: raise mesh.fsdp or "
                     f"mesh.tensor, or {role}.param_dtype=bfloat16")
    else:
        fit = [b for b in range(rows - 1, 0, -1) if pb + sum(parts(b)) <= budget]
        p.verdict = f"lower {key} to {fit[0]}" if fit else "lower the prompt or new-token lengths"
    return p


def _influence(cfg: Config, scfg, mesh_shape, device_bytes, params_dev) -> StagePlan:
    icfg = cfg.influence
    probe_len = batching.round_up(icfg.max_len)  # the longest length the stage can plan
    ref_len = batching.round_up(icfg.ref_max_len)
    splits = cfg.synthesis.splits or {}
    n_probe = splits.get("probe") if isinstance(splits.get("probe"), int) else 256
    exact = icfg.estimator in ("exact", "both")
    fo = icfg.estimator in ("first_order", "both")
    fused = icfg.grad_clip is None  # the first-order program consumes each layer's gradient in place
    ref_rows = ref_rows_per_chunk(icfg.ref_batch_size, mesh_shape["data"])
    B, choice = mem.choose_batch(scfg, n_probe, probe_len, ref_rows if exact else 0, ref_len,
                                 icfg.memory_fraction, params_dev, device_bytes, fused)
    if icfg.batch_size:
        B = icfg.batch_size
    p4 = params_dev * 4
    pb = params_dev * _dtype_bytes(scfg.param_dtype)
    p = StagePlan("influence", "student", B, probe_len, params=pb, opt_state=2 * pb)
    p.other = {"per_example": choice["per_example_bytes"], "batch_B": B}
    total = 0
    if exact:
        total = choice["shared_bytes"] + B * choice["per_example_bytes"]
        p.other["exact"] = total
    if fo:
        plan = mem.plan_ref_grad(scfg, ref_len, ref_rows, icfg.memory_fraction, params_dev, device_bytes)
        ref_phase = 3 * p4 + plan["estimated_bytes"]
        score_phase = 4 * p4 + B * mem.per_example_bytes(scfg, probe_len, 0, ref_len, params_dev, fused)
        p.other.update(ref_grad=ref_phase, first_order=score_phase, ref_grad_remat=int(plan["remat"]),
                       ref_grad_rows=plan["rows_per_chunk"])
        total = max(total, ref_phase, score_phase)
    p.total = total
    budget = HEADROOM * device_bytes
    p.fits = total <= budget
    if p.fits:
        p.verdict = f"fits ({total / device_bytes:.0%}), B={B}"
    elif icfg.batch_size and icfg.batch_size > 1:
        p.verdict = "lower influence.batch_size (or null: chosen from the estimate)"
    else:
        p.verdict = "raise fsdp (params-sized terms divide by fsdp x tensor), or lower influence.max_len"
    return p


def _forward(stage, role, cfg, rows_total, seq_len, mesh_shape, device_bytes, params_dev, key) -> StagePlan:
    """Scoring: params + one forward's temporaries."""
    rows = _rows_per_device(rows_total, mesh_shape["data"] * mesh_shape["fsdp"])
    pb = params_dev * _dtype_bytes(cfg.param_dtype)
    work = mem.forward_bytes(cfg, rows, seq_len)
    p = StagePlan(stage, role, rows, seq_len, params=pb, other={"forward": work})
    p.total = pb + work
    p.fits = p.total <= HEADROOM * device_bytes
    p.verdict = f"fits ({p.total / device_bytes:.0%})" if p.fits else f"lower {key}"
    return p


def plan(cfg: Config, devices: int, device_bytes: int, shapes: dict | None = None,
         prompt_len: int = DEFAULT_PROMPT_LEN) -> dict:
    """The plan of every stage of ``cfg`` on ``devices`` devices of ``device_bytes`` each.
    ``shapes``: {"teacher" | "student": a model.SHAPES name} in place of the checkpoints'."""
    shapes = shapes or {}
    mesh_shape = sharding.mesh_sizes(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, devices)
    rules = sharding.merge_rules(cfg.mesh.rules)
    models, stages = {}, []
    for role in ("teacher", "student"):
        mcfg, where = model_shape(getattr(cfg, role), role, shapes.get(role))
        models[role] = {"config": mcfg, "source": where, "params": mcfg.num_params(),
                        "params_per_device": params_per_device(mcfg, mesh_shape, rules)}
    t, s = models["teacher"], models["student"]
    syn = cfg.synthesis
    new = max(syn.instruction_sampling.max_new_tokens, syn.response_sampling.max_new_tokens)
    stages.append(_sampler("synthesis", "teacher", t["config"], syn.batch_size, syn.samples_per_prompt,
                           prompt_len, new, device_bytes, "synthesis.batch_size", t["params_per_device"],
                           mesh_shape["data"]))
    for name, sec in (("warmup", cfg.warmup), ("sft", cfg.sft)):
        stages.append(_train(name, "student", s["config"], sec, name, sec.micro_batch_size or sec.batch_size,
                             sec.max_len, mesh_shape, device_bytes, s["params_per_device"]))
        if name == "warmup":
            stages.append(_influence(cfg, s["config"], mesh_shape, device_bytes, s["params_per_device"]))
            d = cfg.dpo
            tc, tp = t["config"], t["params_per_device"]
            dp = mesh_shape["data"] * mesh_shape["fsdp"]
            ref_rows = _rows_per_device(2 * d.ref_batch_size, dp)
            ref_pass = tp * _dtype_bytes(tc.param_dtype) + mem.forward_bytes(tc, ref_rows, d.max_len)
            stages.append(_train("dpo", "teacher", tc, d, "dpo", 2 * (d.micro_batch_size or d.batch_size),
                                 d.max_len, mesh_shape, device_bytes, tp,
                                 extra={"ref_pass": ref_pass, "ref_cache_per_pair": 8}))
    e = cfg.eval
    stages.append(_forward("eval: score", "student", s["config"], e.batch_size, e.max_len, mesh_shape,
                           device_bytes, s["params_per_device"], "eval.batch_size"))
    if e.answers:
        stages.append(_sampler("eval: answers", "student", s["config"], e.answer_batch_size, 1, prompt_len,
                               e.max_new_tokens, device_bytes, "eval.answer_batch_size", s["params_per_device"],
                               mesh_shape["data"]))
    return {"devices": devices, "device_bytes": device_bytes, "mesh": mesh_shape, "prompt_len": prompt_len,
            "models": {r: {k: (dataclasses.asdict(v) if k == "config" else v) for k, v in m.items()}
                       for r, m in models.items()},
            "stages": [dataclasses.asdict(p) for p in stages]}


def _gib(n: int) -> str:
    return f"{n / GiB:.2f}" if n else "-"


def format_plan(result: dict) -> str:
    """The plan as a plain-text table (GiB per device) with the models, mesh and verdicts."""
    m = result["mesh"]
    lines = [f"{result['devices']} device(s) of {result['device_bytes'] / GiB:.1f} GiB; mesh data={m['data']} "
             f"fsdp={m['fsdp']} tensor={m['tensor']}; sampler prompts planned at {result['prompt_len']} tokens"]
    for role, info in result["models"].items():
        c = info["config"]
        lines.append(f"{role}: {info['source']}: {info['params'] / 1e9:.2f}B params, {c['n_layers']} layers, "
                     f"d_model {c['d_model']}, ffn {c['ffn_dim']}, heads {c['n_heads']}/{c['n_kv_heads']}, vocab "
                     f"{c['vocab_size']}; {c['param_dtype']} params, {c['dtype']} compute, remat {c['remat']}")
    head = (f"{'stage':14} {'model':7} {'rows x T':>10} {'params':>7} {'opt':>7} {'grads':>7} "
            f"{'act remat':>9} {'act full':>9} {'other (GiB)':30} {'total':>7}  verdict")
    lines += ["", "GiB per device", head]
    for p in result["stages"]:
        other = ", ".join(f"{k} {v}" if k in ("batch_B", "ref_grad_remat", "ref_grad_rows", "ref_cache_per_pair")
                          else f"{k} {v / GiB:.2f}" for k, v in p["other"].items()
                          if k not in ("exact", "first_order", "ref_grad_remat", "ref_grad_rows", "ref_cache_per_pair"))
        lines.append(f"{p['stage']:14} {p['model']:7} {str(p['rows']) + ' x ' + str(p['seq_len']):>10} "
                     f"{_gib(p['params']):>7} {_gib(p['opt_state']):>7} {_gib(p['grads']):>7} "
                     f"{_gib(p['act_remat']):>9} {_gib(p['act_no_remat']):>9} {other:30} {_gib(p['total']):>7}  "
                     f"{p['verdict']}")
    return "\n".join(lines)
