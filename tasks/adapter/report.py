"""Dashboards people can open: training curves and the per-category evaluation, as PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: no display on servers or CI
import matplotlib.pyplot as plt  # noqa: E402

from tasks.core.textio import read_jsonl  # noqa: E402


def plot_training(metrics_path: Path, out: Path) -> Path:
    recs = read_jsonl(metrics_path)
    train = [r for r in recs if "loss" in r]
    evals = [r for r in recs if "eval_loss" in r]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    ax = axes[0]
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss", lw=1.5)
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="held-out loss", lw=1.5)
    ax.set(title="Loss", xlabel="optimizer step", ylabel="cross-entropy (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    axes[1].plot([r["step"] for r in train], [r["lr"] for r in train], color="tab:green")
    axes[1].set(title="Learning rate (warmup + schedule)", xlabel="optimizer step")
    axes[1].grid(alpha=0.3)
    axes[2].plot([r["step"] for r in train], [r["tokens_per_s"] for r in train], color="tab:purple")
    axes[2].set(title="Throughput", xlabel="optimizer step", ylabel="tokens/s")
    axes[2].grid(alpha=0.3)
    fig.suptitle(f"Training — {metrics_path.parent.name}")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_evaluation(report: dict[str, Any], out: Path) -> Path:
    cats = list(report["categories"])
    base = [report["categories"][c]["base"]["loss"] for c in cats]
    adapted = [report["categories"][c]["adapter"]["loss"] for c in cats]
    x = range(len(cats))
    fig, ax = plt.subplots(figsize=(max(7, 1.6 * len(cats) + 2), 4.5))
    w = 0.38
    b1 = ax.bar([i - w / 2 for i in x], base, w, label="base", color="tab:gray")
    b2 = ax.bar([i + w / 2 for i in x], adapted, w, label="adapter", color="tab:blue")
    ax.bar_label(b1, fmt="%.2f", fontsize=8)
    ax.bar_label(b2, fmt="%.2f", fontsize=8)
    ax.set_xticks(list(x), [c.replace("_", "\n") for c in cats])
    ov = report["overall"]
    ax.set(ylabel="held-out loss (nats/token)",
           title=f"Held-out loss per category: base vs adapter\n(overall: base {ov['base']['loss']:.3f} "
                 f"→ adapter {ov['adapter']['loss']:.3f}, {ov['adapter']['tokens']:,} tokens)")
    ax.set_ylim(0, max(base + adapted) * 1.12)
    ax.legend(loc="lower right")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
