"""Metrics: a JSONL file per run (always), TensorBoard or W&B when the user enables and
installs them, and a loss-curve PNG."""

from __future__ import annotations

import json
import os

from montessori_jax.errors import UserError
from montessori_jax.files import is_writer, open_append, read_resumable_jsonl, remove, write_lines_atomic


class MetricsLog:
    """Append rows to ``path``. On resume from step k, rows past k (written after the last
    checkpoint, and about to be redone) are dropped first, so no step appears twice."""

    def __init__(self, path: str, backend: str = "none", resume_from: int | None = None):
        self.path = path
        if resume_from is not None and os.path.exists(path):
            kept = [row for row in read_resumable_jsonl(path, what="metrics row") if row.get("step", 0) <= resume_from]
            write_lines_atomic(path, [json.dumps(row) + "\n" for row in kept])
        else:
            remove(path)
        self._f = open_append(path)  # in the writer of a cluster only
        # the cluster's writer logs; the others check the name alike (one error, in all of them)
        self._backend = _backend(backend, os.path.dirname(path)) if is_writer() else _backend_name(backend)

    def write(self, row: dict) -> None:
        self._f.write(json.dumps(row) + "\n")
        if self._backend is not None:
            self._backend(row)

    def flush(self) -> None:
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def _backend_name(name: str) -> None:
    if name not in ("none", "wandb", "tensorboard"):
        raise UserError(f"logger={name!r}; expected none, tensorboard or wandb")


def _backend(name: str, log_dir: str):
    _backend_name(name)
    if name == "none":
        return None
    if name == "wandb":
        try:
            import wandb
        except ImportError:
            raise UserError("logger=wandb needs `pip install wandb`") from None
        run = wandb.init(dir=log_dir, resume="allow")
        return lambda row: run.log({k: v for k, v in row.items() if k != "step"}, step=row.get("step"))
    if name == "tensorboard":
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UserError("logger=tensorboard needs `pip install tensorboardX`") from None
        writer = SummaryWriter(os.path.join(log_dir, "tensorboard"))

        def log(row):
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    writer.add_scalar(k, v, row.get("step", 0))
            writer.flush()

        return log
    raise UserError(f"logger={name!r}; expected none, tensorboard or wandb")


def read_rows(path: str) -> list[dict]:
    rows = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
    return rows


def pyplot():
    """matplotlib's pyplot on the Agg backend for the process that draws (the cluster's
    writer); None in the others, or when matplotlib is not installed."""
    if not is_writer():  # one process of a cluster draws the plots
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot_losses(metrics_path: str, png_path: str, title: str = "loss") -> str | None:
    """Training (and eval, when present) loss against step; None when matplotlib is absent or
    this process is not the cluster's writer."""
    plt = pyplot()
    if plt is None:
        return None
    rows = read_rows(metrics_path)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("token NLL")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)
    return png_path
