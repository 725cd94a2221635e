"""The ``montessori`` command: parse, call a library function, print. No logic lives here."""

from __future__ import annotations

import argparse
import os
import sys

from montessori_jax import __version__
from montessori_jax.errors import UserError

MODEL_HELP = 'an HF Llama folder, a .gguf file, or "smollm2" (the embedded SmolLM2-135M-Instruct)'


# ---------------------------------------------------------------------------------------------
# commands


def cmd_score(args) -> int:
    from montessori_jax.scoring import score_file

    summary = score_file(args.model, args.input, args.out, batch_size=args.batch_size,
                         max_len=args.max_len, dtype=args.dtype)
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
        "tokens (`tokens`): of `text` (every token after the first), or of `response` given "
        "`prompt` under the model's chat template (response tokens only).",
    )
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--input", required=True, help="JSONL rows with `text`, or `prompt` and `response`")
    p.add_argument("--out", required=True, help="output JSONL: id, nll, tokens")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-len", type=int, default=None, help="truncate rows to this many tokens")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="compute dtype")
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
    p.set_defaults(func=cmd_config)


def _stage_args(p) -> None:
    """The arguments every stage takes: a preset, an output folder, dotted overrides."""
    p.add_argument("-c", "--config", default=None, help="a YAML preset, e.g. configs/default.yaml")
    p.add_argument("--out", required=True, help="output folder; rerunning on it resumes")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. sft.optim.lr=1e-5")


def cmd_sft(args) -> int:
    from montessori_jax.config import Config, load_config
    from montessori_jax.sft import run_sft

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


# Each entry adds one subcommand; later stages append theirs.
COMMANDS = [_add_score, _add_config, _add_sft]


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
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"montessori: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("montessori: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
