"""The ``montessori`` command: parse, call a library function, print. No logic lives here."""

from __future__ import annotations

import argparse
import os
import sys

from montessori_jax import __version__
from montessori_jax.errors import UserError

MODEL_HELP = 'an HF Llama folder, a .gguf file, or "smollm2" (the embedded SmolLM2-135M-Instruct)'
MESH_HELP = ("the device mesh (one size may be -1: the rest); rows split over DATA, the model over "
             "FSDP x TENSOR; default: every device (of every process) on DATA")


# ---------------------------------------------------------------------------------------------
# commands


def cmd_score(args) -> int:
    from montessori_jax.core.sharding import parse_mesh
    from montessori_jax.stages.score import score_file

    summary = score_file(args.model, args.input, args.out, batch_size=args.batch_size,
                         max_len=args.max_len, dtype=args.dtype, chat_template=args.chat_template,
                         mesh=parse_mesh(args.mesh))
    print(f"scored {summary['rows']} rows, {summary['tokens']} tokens: mean NLL "
          f"{summary['mean_nll']:.4f} per token -> {args.out}")
    if summary["truncated"]:
        print(f"note: {summary['truncated']} rows were truncated to --max-len {args.max_len}")
    return 0


def _add_score(sub) -> None:
    p = sub.add_parser(
        "score",
        help="mean token NLL of texts, or of responses given prompts",
        description="Per input row, write the mean token NLL (`nll`) and the number of scored "
        "tokens (`tokens`): of `text` (every token after the first), of `response` given "
        "`prompt` under the model's chat template (response tokens only), or of every assistant "
        "turn of a chat `messages` conversation (with its end-of-turn token).",
    )
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--input", required=True,
                   help="JSONL rows with `text`, `prompt` and `response`, or chat `messages`")
    p.add_argument("--out", required=True, help="output JSONL: id, nll, tokens")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-len", type=int, default=None, help="truncate rows to this many tokens")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="compute dtype")
    p.add_argument("--chat-template", metavar="FILE", default=None,
                   help="a Jinja chat template file in place of the model's own")
    p.add_argument("--mesh", default="-1,1,1", metavar="DATA,FSDP,TENSOR", help=MESH_HELP)
    p.set_defaults(func=cmd_score)


def cmd_config(args) -> int:
    from montessori_jax.config import Config, dump_yaml, load_config

    print(dump_yaml(load_config(Config, args.config, args.overrides)), end="")
    return 0


def _add_config(sub) -> None:
    p = sub.add_parser(
        "config",
        help="print a config resolved from a YAML preset and key=value overrides",
        description="Load a YAML preset (or the defaults), apply dotted key=value overrides, "
        "validate against the schema and print the result as YAML.",
    )
    p.add_argument("-c", "--config", default=None, help="a YAML preset, e.g. configs/default.yaml")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. student.dtype=bfloat16")
    p.set_defaults(func=cmd_config, compiles=False)


def _stage_args(p) -> None:
    """The arguments every stage takes: a preset, an output folder, dotted overrides."""
    p.add_argument("-c", "--config", default=None, help="a YAML preset, e.g. configs/default.yaml")
    p.add_argument("--out", required=True, help="output folder; rerunning on it resumes")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. sft.optim.lr=1e-5")


def cmd_sft(args) -> int:
    from montessori_jax.config import Config, load_config
    from montessori_jax.stages.sft import run_sft

    cfg = load_config(Config, args.config, args.overrides)
    s = run_sft(cfg, args.out)
    print(f"sft: {s['steps']} steps on {s['examples']} examples ({s['truncated']} truncated)"
          + (f", eval loss {s['eval_loss']:.4f}" if s["eval_loss"] is not None else ""))
    print(f"train state: {s['warm_state']}" + (f"; HF model: {s['model']}" if s["model"] else ""))
    return 0


def _add_sft(sub) -> None:
    p = sub.add_parser(
        "sft",
        help="fine-tune the student on instruction/response pairs (loss on responses only)",
        description="Supervised fine-tuning of `student` on `sft.data` (JSONL or an HF dataset): "
        "AdamW with warmup-stable-decay, exact gradient accumulation, orbax checkpoints every "
        "`sft.save_every` steps (rerun to resume), metrics.jsonl + loss.png, the final train "
        "state for `montessori influence`, and an HF export in OUT/model.",
    )
    _stage_args(p)
    p.set_defaults(func=cmd_sft)


def cmd_influence(args) -> int:
    from montessori_jax.config import Config, load_config
    from montessori_jax.stages.influence import run_influence

    overrides = list(args.overrides)
    if args.estimator:
        overrides.append(f"influence.estimator={args.estimator}")
    if args.param_dtype:
        overrides.append(f"influence.param_dtype={args.param_dtype}")
    cfg = load_config(Config, args.config, overrides)
    s = run_influence(cfg, args.out, profile_dir=args.profile)
    print(f"influence ({s['estimator']}, {s['param_dtype']}): {s['n']} probing examples, "
          f"{s['positive']} lower L_ref (help), {s['negative']} raise it; baseline L_ref {s['baseline_ref_loss']:.5f}")
    if "agreement" in s:
        a = s["agreement"]
        print(f"first-order vs exact: Spearman {a['spearman']:.3f}, sign agreement {a['sign_agreement']:.1%}")
    if "precision_probe" in s:
        p = s["precision_probe"]
        print(f"bf16 params: {p['unchanged_fraction_mean']:.2%} of weights unchanged by the step; "
              f"sign agreement with fp32 {p['sign_agreement_with_fp32']:.1%}")
    print(f"scores: {os.path.join(args.out, 'scores.jsonl')}; summary.json and influence_hist.png beside it")
    return 0


def _add_influence(sub) -> None:
    p = sub.add_parser(
        "influence",
        help="local data influence of each probing example on the student's reference loss",
        description="For each probing example z: one AdamW step on z alone from the warm state "
        "of `montessori sft` (influence.warm_state), influence = L_ref(before) - L_ref(after) on "
        "the reference set (influence.reference; the packaged one by default). Exact estimator: "
        "examples batched with vmap in one compiled program; first-order: -<grad L_ref, update>. "
        "Rerun on OUT to resume.",
    )
    _stage_args(p)
    p.add_argument("--estimator", choices=["exact", "first_order", "both"], default=None,
                   help="overrides influence.estimator; `both` adds an agreement report")
    p.add_argument("--param-dtype", choices=["float32", "bfloat16"], default=None,
                   help="bfloat16: the precision probe (params held in bf16, as the original code does)")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="profile the first chunk in steady state: a jax.profiler trace in DIR, XLA's FLOPs and "
                   "bytes per example, achieved FLOP/s, MFU where the device's peak is known, each phase's time "
                   "(DIR/profile.json; see docs/profiling.md)")
    p.set_defaults(func=cmd_influence)


def cmd_preferences(args) -> int:
    from montessori_jax.config import Config, load_config
    from montessori_jax.stages.preferences import run_preferences

    cfg = load_config(Config, args.config, args.overrides)
    s = run_preferences(cfg, args.out)
    print(f"preferences ({s['mode']}): {s['pairs']} pairs from {s['prompts_with_pairs']} of {s['prompts']} seed "
          f"prompts; {s['samples']} samples: {s['positive']} with influence > 0, {s['negative']} < 0, {s['zero']} = 0")
    if s["prompts_without_pair"]:
        why = ", ".join(f"{k} {v}" for k, v in sorted(s["without_pair"].items()))
        print(f"{s['prompts_without_pair']} prompts without a pair: {why}")
    print(f"pairs: {s['pairs_file']}; summary.json beside it")
    return 0


def _add_preferences(sub) -> None:
    p = sub.add_parser(
        "preferences",
        help="preference pairs within each seed prompt from the probing samples' influence",
        description="Join the influence scores (preferences.scores) to the synthesis records they "
        "score (preferences.probe) and pair the teacher's samples within each seed prompt: every "
        "influence > 0 (chosen) against every influence < 0 (rejected), or with preferences.mode=rank "
        "the top_k best against the top_k worst. Optional min_margin and max_pairs_per_prompt. "
        "OUT/pairs.jsonl (prompt, chosen, rejected, ids, influences) and summary.json.",
    )
    _stage_args(p)
    p.set_defaults(func=cmd_preferences)


def cmd_dpo(args) -> int:
    from montessori_jax.config import Config, load_config
    from montessori_jax.stages.dpo import run_dpo

    cfg = load_config(Config, args.config, args.overrides)
    s = run_dpo(cfg, args.out)
    r = s["reference"]
    held = s["heldout"]
    print(f"dpo: {s['steps']} steps on {s['train_pairs']} pairs" + (f" ({held['pairs']} held out)" if held else "")
          + f"; reference log-probs {r['status']} ({r['cache']})")
    print(f"truncated: {s['prompts_truncated']} of {s['pairs']} pairs lost the start of their prompt "
          f"(dpo.max_prompt_len), {s['answers_truncated']} the end of an answer (dpo.max_len)")
    if s["last"]:
        last = s["last"]
        print(f"last step: loss {last['loss']:.4f}, reward accuracy {last['rewards/accuracy']:.2f}, "
              f"margin {last['rewards/margin']:.4f}")
    if held:
        for when in ("before", "after"):
            h = held[when]
            print(f"held out, {when} training: loss {h['loss']:.4f}, reward accuracy {h['reward_accuracy']:.2f}, "
                  f"margin {h['margin']:.4f}")
    print(f"metrics.jsonl and dpo.png in {args.out}" + (f"; HF model: {s['model']}" if s["model"] else ""))
    return 0


def _add_dpo(sub) -> None:
    p = sub.add_parser(
        "dpo",
        help="DPO on the teacher from preference pairs, with cached reference log-probs",
        description="Direct preference optimization of `teacher` on dpo.pairs: the seed prompt "
        "under the teacher's chat template, the chosen and rejected raw outputs as answers "
        "(as TRL's keep_end: only when prompt + the longer answer exceed dpo.max_len, the prompt "
        "keeps its last dpo.max_prompt_len tokens, then the answers their first dpo.max_len - "
        "dpo.max_prompt_len), sigmoid loss with dpo.beta. dpo.eval_fraction holds out pairs, "
        "measured before and after training. The reference log-probs are computed once and "
        "cached beside the pairs under a fingerprint. Orbax checkpoints (rerun to resume), "
        "metrics.jsonl + dpo.png, summary.json, and the teacher as an HF checkpoint in OUT/model.",
    )
    _stage_args(p)
    p.set_defaults(func=cmd_dpo)


def cmd_synthesize(args) -> int:
    from montessori_jax.config import Config, load_config
    from montessori_jax.stages.synthesis import format_summary, run_synthesize

    cfg = load_config(Config, args.config, args.overrides)
    print(format_summary(run_synthesize(cfg, args.out)))
    return 0


def _add_synthesize(sub) -> None:
    p = sub.add_parser(
        "synthesize",
        help="the teacher writes instructions from 8-shot prompts and answers the kept ones",
        description="Step 1 of the method: 8-shot instruction prompts from the seed pool "
        "(synthesis.seed_pool; 6 seeds + 2 earlier instructions once 2 exist), n samples each, "
        "parsing and filters (tag, length, blacklist, first character, ROUGE-L > 0.7), the "
        "teacher's responses; OUT/records.jsonl, dropped.jsonl, summary.json and one file per "
        "synthesis.splits entry. Rerun on OUT to resume.",
    )
    _stage_args(p)
    p.set_defaults(func=cmd_synthesize)


def cmd_eval(args) -> int:
    import warnings

    from montessori_jax.config import Config, load_config
    from montessori_jax.stages.data import EvalOverlapWarning
    from montessori_jax.stages.eval import format_table, parse_models, run_eval

    cfg = load_config(Config, args.config, args.overrides)
    models = parse_models(args.model) if args.model else None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", EvalOverlapWarning)
        s = run_eval(cfg, args.out, models)
    for w in caught:
        if issubclass(w.category, EvalOverlapWarning):
            print(f"montessori: warning: {w.message}", file=sys.stderr)
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    print(f"eval: {s['rows']} reference answers from {s['data']}"
          + (f"; answers to {s['answer_prompts']} prompts" if s["answer_prompts"] else ""))
    print(format_table(s["table"]))
    print(f"results: {os.path.join(args.out, 'summary.json')} (summary.png, nll_*.json, answers_*.jsonl beside it)")
    return 0


def _add_eval(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="reference-answer NLL of the student(s) on held-out prompts, and their answers",
        description="For each model (--model NAME=PATH, repeatable; default: student.path): the "
        "token-mean NLL (and perplexity) of the reference answers of eval.data (the packaged "
        "held-out set by default) under the model's chat template, and its answers to "
        "eval.prompts (default: the eval set's instructions; greedy unless eval.temperature > 0) "
        "as JSONL. The eval set is checked against D_ref and the seed pool: a repeated "
        "instruction is a warning, or an error with eval.on_overlap=error. Prints a table; "
        "rerun on OUT to resume.",
    )
    _stage_args(p)
    p.add_argument("--model", action="append", default=None, metavar="NAME=PATH",
                   help="a model to evaluate (repeatable); PATH: " + MODEL_HELP)
    p.set_defaults(func=cmd_eval)


def cmd_generate(args) -> int:
    from montessori_jax.core.sharding import parse_mesh
    from montessori_jax.kernels.sampler import SamplingParams
    from montessori_jax.stages.generate import generate_jsonl

    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            presence_penalty=args.presence_penalty, max_new_tokens=args.max_new_tokens,
                            n=args.n, seed=args.seed)
    s = generate_jsonl(args.model, args.out, params, prompt=args.prompt, input_path=args.input,
                       batch_size=args.batch_size, chat_template=not args.no_chat_template,
                       template_file=args.chat_template, mesh=parse_mesh(args.mesh))
    print(f"generate: {s['written']} samples written ({s['skipped']} already there), {s['tokens']} tokens "
          f"in {s['seconds']:.1f} s ({s['tokens_per_s']:.1f} tok/s), {s['compiled_programs']} compiled "
          f"programs ({s['compile_seconds']:.1f} s of the time) -> {args.out}")
    return 0


def _add_generate(sub) -> None:
    p = sub.add_parser(
        "generate",
        help="sample completions of prompts (jitted prefill + while-loop decode with a KV cache)",
        description="Sample --n completions per prompt. Input rows have `prompt` (text) or chat "
        "`messages`, and an optional `id`; output rows: id, sample, text, num_tokens, "
        "finish_reason (stop or length), written per batch. Rerunning on a partial --out "
        "continues without duplicating rows.",
    )
    p.add_argument("--model", required=True, help=MODEL_HELP)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one prompt (its id is 0)")
    src.add_argument("--input", help="JSONL rows with `prompt` or `messages`")
    p.add_argument("--out", required=True, help="output JSONL (appended to; rerun to continue)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling; 1 = off")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--presence-penalty", type=float, default=0.0,
                   help="subtracted from the logits of tokens already generated (as vLLM)")
    p.add_argument("--n", type=int, default=1, help="samples per prompt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16, help="rows decoded together (prompts x samples)")
    tpl = p.add_mutually_exclusive_group()
    tpl.add_argument("--no-chat-template", action="store_true", help="encode `prompt` as plain text")
    tpl.add_argument("--chat-template", metavar="FILE", default=None,
                     help="a Jinja chat template file in place of the model's own")
    p.add_argument("--mesh", default="-1,1,1", metavar="DATA,FSDP,TENSOR", help=MESH_HELP)
    p.set_defaults(func=cmd_generate)


def cmd_judge(args) -> int:
    import dataclasses

    from montessori_jax.config import JudgeConfig
    from montessori_jax.stages import judge

    fields = {f.name for f in dataclasses.fields(JudgeConfig)}
    try:
        cfg = JudgeConfig(**{k: v for k, v in vars(args).items() if k in fields and v is not None})
    except ValueError as e:
        raise UserError(f"judge: {e}") from None
    s = judge.run_judge(cfg, args.mode, args.questions, args.answers, args.out, progress=True)
    print(judge.format_table(s))
    print(f"judge: {s['written']} judgments requested ({s['requests'] - s['written']} already there) -> {args.out}")
    return 0


def _add_judge(sub) -> None:
    from montessori_jax.config import JudgeConfig

    d = JudgeConfig()
    p = sub.add_parser(
        "judge",
        help="MT-Bench-style judgments by an OpenAI-compatible endpoint (single grading or pairwise)",
        description="Judge FastChat answer files (model_answer/MODEL.jsonl) on a FastChat question file. "
        "single: a 1-10 rating of every turn's answer ([[n]] in the judge's reply; none: -1, a failure), "
        "with the reference answer for math, reasoning and coding when one is given. pairwise: both orders "
        "of two answer files; a win only when both orders agree, else a tie; the first file's win rate "
        "(wins + ties/2)/n with a bootstrap 95%% interval. Writes OUT/judgments.jsonl (a rerun continues), "
        "OUT/summary.json and OUT/summary.png, and prints the per-category table.",
    )
    p.add_argument("--base-url", required=True, help="the endpoint, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--model", required=True, help="the judge model's name at the endpoint")
    p.add_argument("--api-key-env", default=d.api_key_env, help="environment variable holding the API key")
    p.add_argument("--mode", choices=["single", "pairwise"], default="single")
    p.add_argument("--questions", required=True, help="FastChat question.jsonl")
    p.add_argument("--answers", required=True, action="append",
                   help="a FastChat answer file (pairwise: give two; the win rate is the first's)")
    p.add_argument("--references", default=None, help="FastChat reference answers (math, reasoning, coding)")
    p.add_argument("--prompts", default=None, help="a JSON/YAML file of judge prompts over the built-in ones")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--concurrency", type=int, default=d.concurrency, help="requests in flight")
    p.add_argument("--max-retries", type=int, default=d.max_retries, help="on connection errors, 429, 5xx")
    p.add_argument("--max-tokens", type=int, default=d.max_tokens, help="of a judge's reply")
    p.add_argument("--bootstrap", type=int, default=d.bootstrap, help="resamples for the win rate interval")
    p.add_argument("--seed", type=int, default=d.seed, help="of the bootstrap")
    p.set_defaults(func=cmd_judge, compiles=False)


def _bench_sft(args):
    from montessori_jax.bench import sft as bench_sft

    return bench_sft, bench_sft.bench_sft(model=args.model, batch=args.batch_size or 4, length=args.length,
                                          steps=args.steps, random=args.random, dtype=args.dtype,
                                          param_dtype=args.param_dtype or "float32", remat=args.remat,
                                          compare_torch=not args.no_transformers)


def _bench_influence(args):
    from montessori_jax.bench import influence as bench_influence

    return bench_influence, bench_influence.bench_influence(
        model=args.model, n_ref=args.ref_rows, n_probe=args.probes, n_original=args.original,
        batch_size=args.batch_size, fo_batch_size=args.fo_batch_size, random=args.random, dtype=args.dtype,
        original_modes=tuple(m for m in args.original_modes.split(",") if m))


def _bench_generate(args):
    from montessori_jax.bench import generate as bench_generate

    sizes = tuple(int(b) for b in args.batch_sizes.split(","))
    return bench_generate, bench_generate.bench_generate(
        args.model, batch_sizes=sizes, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
        top_p=args.top_p, top_k=args.top_k, repeats=args.repeats, transformers=not args.no_transformers,
        random=args.random, dtype=args.dtype, prompt_len=args.length)


def _bench_dedup(args):
    from montessori_jax.bench import dedup as bench_dedup

    return bench_dedup, bench_dedup.bench_dedup(args.candidates, rouge_pairs=args.rouge_pairs)


def _bench_dpo(args):
    from montessori_jax.bench import dpo as bench_dpo

    return bench_dpo, bench_dpo.bench_dpo(model=args.model, random=args.random, batch=args.batch_size or 2,
                                          length=args.length, steps=args.steps, dtype=args.dtype,
                                          param_dtype=args.param_dtype or "float32", remat=args.remat,
                                          compare_torch=not args.no_transformers)


def _bench_serve(args):
    from montessori_jax.bench import serve as bench_serve

    return bench_serve, bench_serve.bench_serve(model=args.model, requests=args.batch_size or 64,
                                                max_new_tokens=args.max_new_tokens)


# what -> a function (args) -> (module with format_table, result dict)
BENCHES = {"generate": _bench_generate, "sft": _bench_sft, "influence": _bench_influence, "dedup": _bench_dedup,
           "dpo": _bench_dpo, "serve": _bench_serve}


def cmd_bench(args) -> int:
    module, result = BENCHES[args.what](args)
    print(module.format_table(result))
    if args.json:
        from montessori_jax.files import write_json_atomic

        write_json_atomic(args.json, result)
        print(f"results: {args.json}")
    return 0


def _add_bench(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="side-by-side timings against the reference implementations",
        description="Benchmarks that run ours and the reference side by side in one process and "
        "print a table (and write JSON with the machine's description with --json). influence: "
        "(a) the original procedure in PyTorch (see --original-modes), (b) our exact estimator, (c) "
        "first-order, on the same weights, warm AdamW state, probes and D_ref, with the targets "
        "(exact >= 1.5x (a) bf16 and >= 3x (a) fp32; first-order >= 10x (a) bf16 at 64 probes).",
    )
    p.add_argument("what", choices=sorted(BENCHES), help="which stage to time")
    p.add_argument("--model", default="smollm2", help=MODEL_HELP)
    p.add_argument("--json", default=None, metavar="FILE", help="write the results here")
    p.add_argument("--batch-size", type=int, default=None,
                   help="sft: examples per step; influence: B; dpo: pairs per step; serve: concurrent requests")
    p.add_argument("--length", type=int, default=256, help="sft, dpo: tokens per row; generate --random: prompt tokens")
    p.add_argument("--steps", type=int, default=5, help="sft, dpo: timed steps")
    p.add_argument("--fo-batch-size", type=int, default=None,
                   help="influence: B of (c), first-order (default: as the stage chooses it for first-order "
                   "alone, at most 4)")
    p.add_argument("--ref-rows", type=int, default=16, help="influence: D_ref rows")
    p.add_argument("--probes", type=int, default=32,
                   help="influence: probing examples ((c) pays grad L_ref once, so c/b grows with this)")
    p.add_argument("--original", type=int, default=3,
                   help="influence: examples for (a), the original procedure (0: skip it)")
    p.add_argument("--original-modes", default="bf16,fp32", metavar="MODES",
                   help="influence: comma-separated modes of (a): bf16 and fp32 run the original code's "
                   "loop in PyTorch (transformers' Llama loaded in that dtype, torch AdamW with the warm "
                   "state reloaded from disk per probe, one step on the probe and a pass over D_ref, "
                   "every row padded to 1024 tokens); jax runs the earlier JAX replica of that loop")
    p.add_argument("--batch-sizes", default="1,16", help="generate: comma-separated batch sizes")
    p.add_argument("--max-new-tokens", type=int, default=64,
                   help="generate: tokens per row (no early stop); serve: max_tokens per request")
    p.add_argument("--temperature", type=float, default=0.0, help="generate: 0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="generate")
    p.add_argument("--top-k", type=int, default=0, help="generate")
    p.add_argument("--repeats", type=int, default=3, help="generate: timed runs per batch size (best kept)")
    p.add_argument("--no-transformers", action="store_true", help="generate, sft, dpo: time ours only")
    p.add_argument("--random", default=None, metavar="PRESET",
                   help="generate, sft, influence, dpo: a random-init model of a real shape instead, no download "
                   "(tinyllama, llama3-8b, tiny)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="compute dtype of the matmuls (generate: of the params too)")
    p.add_argument("--param-dtype", choices=["float32", "bfloat16"], default=None,
                   help="sft, dpo: params and AdamW moments (default float32)")
    p.add_argument("--remat", action="store_true", help="sft, dpo: recompute each layer's activations in the backward")
    p.add_argument("--candidates", type=int, default=10_000, help="dedup: synthetic candidate instructions")
    p.add_argument("--rouge-pairs", type=int, default=20_000,
                   help="dedup: pairs rouge-score is timed on (extrapolated to all pairs)")
    p.set_defaults(func=cmd_bench)


def cmd_run(args) -> int:
    from montessori_jax import pipeline
    from montessori_jax.config import Config, load_config

    cfg = load_config(Config, args.config, args.overrides)
    run_dir = args.run_dir or os.path.join(
        "runs", os.path.splitext(os.path.basename(args.config))[0] if args.config else "default")
    result = pipeline.run(cfg, run_dir, restart_from=args.restart_from, argv=sys.argv[1:])
    print(result["report"])
    print(f"results: {run_dir} (summary.json, summary.png; `montessori status {run_dir}` lists every stage)")
    return 0


def _add_run(sub) -> None:
    p = sub.add_parser(
        "run",
        help="every stage of a config: synthesize, warm-up, influence, preferences, DPO, train, eval",
        description="One or more iterations of Montessori-Instruct (run.arm=montessori), the "
        "Self-Instruct baseline (run.arm=self_instruct) or both, into one run directory with a "
        "manifest.json of every stage's config, inputs and outputs (with hashes) and timings. "
        "Rerunning on the same --run-dir resumes where it stopped; a finished stage whose "
        "settings changed is an error unless --restart-from names it.",
    )
    p.add_argument("-c", "--config", default=None, help="a YAML preset, e.g. configs/default.yaml")
    p.add_argument("--run-dir", default=None, help="the run directory (default: runs/<config name>)")
    p.add_argument("--restart-from", default=None, metavar="STAGE",
                   help="redo this stage (a name such as dpo, or a key such as iter1/montessori/dpo) "
                   "and the later stages of its arm")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. run.arm=both")
    p.set_defaults(func=cmd_run)


def cmd_plan(args) -> int:
    from montessori_jax.config import Config, load_config
    from montessori_jax.files import write_json_atomic
    from montessori_jax.stages import plan

    shapes = {}
    for item in args.model_shape or []:
        role, sep, name = item.rpartition("=")
        roles = [role] if sep else ["teacher", "student"]
        if sep and role not in ("teacher", "student"):
            raise UserError(f"--model-shape {item}: expected NAME, teacher=NAME or student=NAME")
        shapes.update({r: name for r in roles})
    cfg = load_config(Config, args.config, args.overrides)
    if args.devices is not None and args.devices < 1:
        raise UserError(f"--devices {args.devices}: must be >= 1")
    if args.devices is None:
        import jax

        from montessori_jax.kernels.influence_memory import device_memory_bytes

        devices, device_bytes = jax.device_count(), device_memory_bytes()
    else:
        devices, device_bytes = args.devices, None
    if args.device_memory:
        device_bytes = plan.parse_bytes(args.device_memory)
    if device_bytes is None:
        raise UserError("--devices N needs --device-memory SIZE (e.g. 80GB) for devices other than these")
    result = plan.plan(cfg, devices, device_bytes, shapes, args.prompt_len)
    print(plan.format_plan(result))
    if args.json:
        write_json_atomic(args.json, result)
    return 0


def _add_plan(sub) -> None:
    from montessori_jax.core.model import SHAPES

    p = sub.add_parser(
        "plan",
        help="bytes per device of each stage of a config, the mesh, and whether it fits",
        description="For each stage of the config (synthesis, warm-up, influence, DPO, final SFT, eval) "
        "the GiB per device of params, AdamW state, gradients, activations with and without remat, the "
        "sampler's KV cache, the influence working set and the batch B it would choose, and DPO's "
        "reference pass; the mesh (mesh.data/fsdp/tensor, -1 takes the rest of N devices); and a "
        "verdict per stage. Model shapes come from the checkpoint at teacher.path / student.path "
        "(config.json or GGUF metadata); for a path not present here, from the folder's name when it "
        f"names a known model, or from --model-shape (known: {', '.join(SHAPES)}). Estimates are "
        "fp32 upper bounds; docs/plan.md compares them with measured peaks.",
    )
    p.add_argument("-c", "--config", default=None, help="a YAML preset, e.g. configs/paper_tinyllama.yaml")
    p.add_argument("--devices", type=int, default=None, metavar="N",
                   help="plan for N devices (default: the devices present, with their memory)")
    p.add_argument("--device-memory", default=None, metavar="SIZE",
                   help="memory per device, e.g. 80GB or 95GiB (GB = GiB = 2**30; default: the present "
                   "device's, or the host RAM on CPU)")
    p.add_argument("--model-shape", action="append", metavar="[ROLE=]NAME",
                   help=f"the model's shape instead of its checkpoint: NAME for both, or teacher=NAME / "
                   f"student=NAME; NAME one of {', '.join(SHAPES)}")
    p.add_argument("--prompt-len", type=int, default=1024, metavar="N",
                   help="prompt tokens the sampler is planned for (synthesis, eval answers)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the plan as JSON")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. mesh.tensor=2")
    p.set_defaults(func=cmd_plan, compiles=False)


def cmd_status(args) -> int:
    from montessori_jax import pipeline

    print(pipeline.format_status(pipeline.read_manifest(args.run_dir)))
    return 0


def _add_status(sub) -> None:
    p = sub.add_parser("status", help="the stages of a run directory as a table",
                       description="Prints RUN_DIR/manifest.json as a table: each stage's status, "
                       "seconds, and its outputs' sha256 prefixes.")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.set_defaults(func=cmd_status, compiles=False)


def cmd_compare(args) -> int:
    from montessori_jax.files import write_json_atomic
    from montessori_jax.stages import compare

    result = compare.compare(args.run_dirs)
    print(compare.format_comparison(result))
    if args.json:
        write_json_atomic(args.json, result)
    return 0


def _add_compare(sub) -> None:
    p = sub.add_parser("compare", help="several runs' summaries side by side, with mean and spread",
                       description="Reads RUN_DIR/summary.json of each `montessori run` directory (for "
                       "example the same config at several seeds) and prints each student's reference-answer "
                       "NLL per run with mean and sample std, and per iteration the Montessori - Self-Instruct "
                       "NLL difference, the teacher shift and the DPO held-out reward accuracy with their spread.")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the comparison as JSON")
    p.set_defaults(func=cmd_compare, compiles=False)


def cmd_serve(args) -> int:
    from montessori_jax.stages import serve

    engine = serve.load_engine(args.model, name=args.served_model_name, batch_window_ms=args.batch_window_ms,
                               max_batch=args.max_batch, param_dtype=args.dtype, dtype=args.dtype)
    print(f"serve: {engine.name} (context {engine.context}) on http://{args.host}:{args.port}/v1 "
          "(Ctrl-C stops after the requests in flight)", flush=True)
    serve.make_server(engine, args.host, args.port, log_level=args.log_level).run()
    return 0


def _add_serve(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="an OpenAI-compatible HTTP server on the sampler (/v1/chat/completions, /v1/completions)",
        description="Serve one model over OpenAI's API: /v1/chat/completions, /v1/completions, "
        "/v1/models. Requests arriving within --batch-window-ms are decoded in one sampler call "
        "(up to --max-batch rows). Streaming sends the finished answer token by token.",
    )
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--batch-window-ms", type=float, default=15.0,
                   help="how long to wait for more requests after one arrives")
    p.add_argument("--max-batch", type=int, default=64, help="rows (prompts x n) per sampler call")
    p.add_argument("--served-model-name", default=None, help="the model id clients send (default: the path's name)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="params and compute")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=cmd_serve)


# Each entry adds one subcommand; later stages append theirs.
COMMANDS = [_add_score, _add_generate, _add_config, _add_synthesize, _add_sft, _add_influence, _add_eval,
            _add_preferences, _add_dpo, _add_run, _add_plan, _add_status, _add_compare, _add_judge, _add_serve, _add_bench]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="montessori",
        description="Montessori-Instruct in JAX: a teacher LLM synthesizes instruction data "
        "tailored to a student LLM by the data's local influence on the student.",
    )
    parser.add_argument("--version", action="version", version=f"montessori-jax {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "profile", None):
        # XLA:CPU records an event per op in the profiler's trace only with this flag, read when
        # the backend starts (harmless on GPU and TPU)
        flag = "--xla_cpu_enable_xprof_traceme=true"
        if flag not in os.environ.get("XLA_FLAGS", ""):
            os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()
    from montessori_jax.core import distributed

    try:
        in_cluster = distributed.initialize()
    except UserError as e:
        print(f"montessori: error: {e}", file=sys.stderr)
        return 2
    if in_cluster and not distributed.is_writer():
        sys.stdout = open(os.devnull, "w")  # process 0 prints the reports; the others only errors
    if getattr(args, "compiles", True):
        from montessori_jax.core.xla_cache import use_compilation_cache

        use_compilation_cache()
    try:
        rc = int(args.func(args) or 0)
        if in_cluster:
            distributed.barrier("command/end")  # no process leaves before the writer's files are complete
            # flushed here, not left to the interpreter's exit: CI once lost process 0's last
            # printed line of a cluster script to a pipe while it exited with status 0
            sys.stdout.flush()
            sys.stderr.flush()
        return rc
    except UserError as e:
        print(f"montessori: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("montessori: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
