"""What the Prefect UI shows about a run: keyed artifacts built from the stages' manifests.

The ``*_markdown`` / ``*_table`` builders are plain functions of manifests and reports (tests call
them without Prefect); ``publish_*`` create the artifacts inside a flow run. Keys are prefixed with
the config's ``run_name`` (``demo-scrape-report``, ...), so the Artifacts page keeps one history
per pipeline and shows how, e.g., the eval table changed from run to run.

Publishing never fails a run: an artifact that cannot be written is a warning in the log.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tasks.core.config import PipelineConfig
from tasks.core.textio import read_jsonl

log = logging.getLogger("flows.artifacts")


def artifact_key(cfg: PipelineConfig, name: str) -> str:
    """Prefect keys: lowercase letters, digits and dashes only."""
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", f"{cfg.run_name}-{name}".lower())).strip("-")


def _fmt(v: Any, nd: int = 4) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{nd}f}" if math.isfinite(v) else str(v)
    return str(v)


# ------------------------------------------------------------------------------------ builders
def scrape_markdown(m: dict[str, Any]) -> str:
    c = m["counts"]
    refused = c.get("refused", {})
    lines = [
        f"## Scrape report (generation {m.get('generation')}{', resumed' if m.get('resumed') else ''})",
        "",
        "| pages published | fetched (200) | not modified (304) | refused | errors |",
        "|---:|---:|---:|---:|---:|",
        f"| {c.get('pages', 0)} | {c.get('fetched', 0)} | {c.get('not_modified', 0)} | "
        f"{sum(refused.values())} | {c.get('errors', 0)} |",
        "",
        "**Changes since the previous scrape:** "
        f"new {c.get('new', 0)}, changed {c.get('changed', 0)}, unchanged {c.get('unchanged', 0)}, "
        f"gone {c.get('gone', 0)}",
        "",
        "### Refused, by reason",
        "",
        "| reason | pages |",
        "|---|---:|",
        *([f"| {k.removeprefix('refused_')} | {v} |" for k, v in sorted(refused.items())] or ["| (none) | 0 |"]),
        "",
        "### Pages per category",
        "",
        "| category | pages |",
        "|---|---:|",
        *[f"| {k} | {v} |" for k, v in sorted(c.get("pages_per_category", {}).items())],
        "",
        "### Every request, by decision",
        "",
        "| decision | requests |",
        "|---|---:|",
        *[f"| {k} | {v} |" for k, v in sorted(c.get("requests", {}).items())],
        "",
        f"Pages fingerprint `{m.get('inputs', {}).get('pages', '')[:16]}`; "
        f"{len(m.get('refused_sources') or [])} source(s) refused; fetch log: `raw/fetch_log.jsonl`.",
    ]
    return "\n".join(lines)


def mixture_table(m: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for cat, v in m["counts"]["categories"].items():
        rows.append({
            "category": cat,
            "target share": _fmt(v.get("target_share"), 3),
            "achieved share": _fmt(v.get("achieved_share"), 3),
            "target tokens": v.get("target_tokens"),
            "selected tokens": v.get("selected_tokens"),
            "available tokens": v.get("available_tokens"),
            "repeat": _fmt(v.get("repeat_factor"), 2),
            "shortfall tokens": v.get("shortfall_tokens"),
        })
    return rows


def training_markdown(run_dir: Path, train_m: dict[str, Any] | None) -> str:
    recs = read_jsonl(Path(run_dir) / "metrics.jsonl")
    train = [r for r in recs if "loss" in r]
    evals = [r for r in recs if "eval_loss" in r]
    c = (train_m or {}).get("counts", {})
    lines = [f"## Training: `{Path(run_dir).name}`", ""]
    if train:
        tps = [r["tokens_per_s"] for r in train if "tokens_per_s" in r]
        lines += [
            "| steps | tokens seen | first loss | last loss | last lr | mean tokens/s | skipped steps | wall |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|",
            f"| {train[-1]['step']} | {train[-1].get('tokens_seen', '')} | {_fmt(train[0]['loss'])} | "
            f"{_fmt(train[-1]['loss'])} | {train[-1].get('lr', 0):.2e} | {_fmt(sum(tps) / len(tps), 0) if tps else '–'} | "
            f"{c.get('skipped_steps', 0)} | {_fmt(c.get('wall_s'), 1)} s |",
            "",
        ]
    else:
        lines += ["No metrics recorded yet.", ""]
    if evals:
        cats = sorted({k.split("/", 1)[1] for r in evals for k in r if k.startswith("eval_loss/")})
        lines += ["### Periodic held-out loss (bounded sample)", "",
                  "| step | overall | " + " | ".join(cats) + " |",
                  "|---:|---:|" + "---:|" * len(cats)]
        for r in evals:
            lines.append(f"| {r['step']} | {_fmt(r['eval_loss'])} | " +
                         " | ".join(_fmt(r.get(f"eval_loss/{k}")) for k in cats) + " |")
    lines += ["", f"Metrics: `{Path(run_dir) / 'metrics.jsonl'}`; TensorBoard: `{Path(run_dir) / 'tensorboard'}`"]
    return "\n".join(lines)


def eval_table(report: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for cat, r in report["categories"].items():
        rows.append({"category": cat, "base loss": _fmt(r["base"]["loss"]), "adapter loss": _fmt(r["adapter"]["loss"]),
                     "delta": f"{r['delta_loss']:+.4f}", "base ppl": _fmt(r["base"]["ppl"], 2),
                     "adapter ppl": _fmt(r["adapter"]["ppl"], 2), "tokens": r["adapter"]["tokens"]})
    ov = report.get("overall", {})
    if ov.get("base") and ov.get("adapter"):
        rows.append({"category": "OVERALL", "base loss": _fmt(ov["base"]["loss"]), "adapter loss": _fmt(ov["adapter"]["loss"]),
                     "delta": f"{ov['adapter']['loss'] - ov['base']['loss']:+.4f}", "base ppl": _fmt(ov["base"]["ppl"], 2),
                     "adapter ppl": _fmt(ov["adapter"]["ppl"], 2), "tokens": ov["adapter"]["tokens"]})
    return rows


def lineage_markdown(lin: dict[str, Any]) -> str:
    q = lin.get("quantization") or {}
    lines = [
        f"## Lineage of adapter `{lin['run_id']}`",
        "",
        f"- **adapter**: `{lin['adapter']}` (train fingerprint `{(lin.get('train_fingerprint') or '')[:16]}`)",
        f"- **base**: `{lin['base_model']}` from `{lin.get('base_path')}`, "
        f"{'NF4' if q.get('quant_type') == 'nf4' else q.get('quant_type', '?')}"
        f"{' + double quant' if q.get('double_quant') else ''}, compute {q.get('compute_dtype', '?')}",
        f"- **data snapshot**: tokenized `{(lin.get('tokenized') or '')[:16]}` in `{lin.get('tokenized_dir')}`",
        "",
        "| stage | fingerprint | made from | created |",
        "|---|---|---|---|",
    ]
    for s in lin.get("data_chain", []):
        ins = ", ".join(f"{k} `{str(v)[:12]}`" for k, v in (s.get("inputs") or {}).items())
        gen = f" (generation {s['generation']})" if s.get("generation") is not None else ""
        lines.append(f"| {s['stage']}{gen} | `{(s.get('fingerprint') or '')[:12]}` | {ins} | {s.get('created_at', '')} |")
    if not lin.get("data_chain_matches_run", True):
        lines += ["", "_The data stages have moved on since this adapter was trained; the chain above is today's._"]
    return "\n".join(lines)


def promotion_markdown(p: dict[str, Any]) -> str:
    verdict = "**promoted** to current" if p["promoted"] else "**not promoted**: the current adapter was kept"
    lines = [f"## Promotion of `{p['run_id']}`: {verdict}", "", *[f"- {r}" for r in p["reasons"]], ""]
    if p.get("rows"):
        lines += ["| category | current | candidate | delta | verdict |", "|---|---:|---:|---:|---|"]
        for r in p["rows"]:
            d = r.get("delta")
            lines.append(f"| {r['category']} | {_fmt(r.get('current'))} | {_fmt(r.get('candidate'))} | "
                         f"{'–' if d is None else f'{d:+.4f}'} | {r['verdict']} |")
        lines += ["", f"Tolerance {p['tolerance']:+.4f} nats/token; "
                      f"{'both measured on the same held-out rows' if p.get('same_rows', True) else 'different tokenizers: each on its own rows'}."]
    return "\n".join(lines)


MAX_EMBED_BYTES = 4 << 20  # a dashboard PNG is ~100 KB; refuse to bloat the database with anything huge


def dashboard_markdown(name: str, png: Path, run_dir: Path) -> str:
    """The PNG inline as a data: URI, so the Prefect UI shows it wherever it is opened."""
    import base64

    data = png.read_bytes()
    rel = png.relative_to(run_dir) if png.is_relative_to(run_dir) else png.name
    if len(data) > MAX_EMBED_BYTES:
        return f"## {name}\n\n`{rel}` in run `{run_dir.name}` is {len(data):,} bytes: too large to embed."
    return (f"## {name} ({run_dir.name})\n\n![{name}](data:image/png;base64,{base64.b64encode(data).decode()})\n\n"
            f"File: `{rel}` in the run directory.")


def adapter_markdown(run_dir: Path, root: Path) -> str:
    """Where the adapter is, relative to the data root (the same on every node), and what it holds."""
    ad = run_dir / "adapter"
    rel = ad.relative_to(root) if ad.is_relative_to(root) else ad
    lines = [f"## Adapter `{run_dir.name}`", "", f"`<data root>/{rel}` (data root `{root.name}`)", "",
             "| file | bytes |", "|---|---:|"]
    lines += [f"| {f.name} | {f.stat().st_size:,} |" for f in sorted(ad.iterdir()) if f.is_file()] if ad.is_dir() else []
    lines += ["", f"Use it: `d2a generate --run <data root>/runs/{run_dir.name} --prompt ...`"]
    return "\n".join(lines)


class MetricsFollower:
    """Reads only the lines appended to metrics.jsonl since the last call (a multi-week run's file
    grows to millions of lines; re-reading it every few seconds would not do). A partial last line
    is kept until its newline arrives."""

    def __init__(self, path: Path):
        self.path, self.offset, self.tail, self.last_step = Path(path), 0, b"", None

    def poll(self) -> int | None:
        import json

        try:
            with open(self.path, "rb") as f:
                if f.seek(0, 2) < self.offset:  # replaced (a forced restart): start over
                    self.offset, self.tail = 0, b""
                f.seek(self.offset)
                chunk = f.read()
                self.offset = f.tell()
        except FileNotFoundError:
            return self.last_step
        lines = (self.tail + chunk).split(b"\n")
        self.tail = lines.pop()
        for line in lines:
            try:
                r = json.loads(line)
            except ValueError:
                continue
            if isinstance(r, dict) and "loss" in r and "step" in r:
                self.last_step = r["step"]
        return self.last_step


def stages_table(status: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"stage": k, "status": v["status"], "fingerprint": (v.get("fingerprint") or "")[:16],
             "created at": v.get("created_at") or ""} for k, v in status.items()]


# ------------------------------------------------------------------------------------ publish
def _safe(fn):
    def wrapper(*a, **kw):
        try:
            return fn(*a, **kw)
        except Exception as e:  # an artifact is a view: never fail the run over it
            log.warning("could not publish artifact (%s): %s", fn.__name__, e)
            return None
    wrapper.__name__ = fn.__name__
    return wrapper


@_safe
def publish_scrape(cfg: PipelineConfig, m: dict[str, Any]) -> None:
    from prefect.artifacts import create_markdown_artifact

    c = m["counts"]
    create_markdown_artifact(scrape_markdown(m), key=artifact_key(cfg, "scrape-report"),
                             description=f"scrape: {c.get('fetched', 0)} fetched, {c.get('not_modified', 0)} not "
                                         f"modified, {sum(c.get('refused', {}).values())} refused")


@_safe
def publish_mixture(cfg: PipelineConfig, m: dict[str, Any]) -> None:
    from prefect.artifacts import create_table_artifact

    create_table_artifact(mixture_table(m), key=artifact_key(cfg, "data-mixture"),
                          description="Training mixture by tokens: achieved vs target share per category")


@_safe
def publish_training(cfg: PipelineConfig, run_dir: Path, train_m: dict[str, Any] | None) -> None:
    from prefect.artifacts import create_markdown_artifact

    create_markdown_artifact(training_markdown(run_dir, train_m), key=artifact_key(cfg, "training"),
                             description=f"Training progress of {Path(run_dir).name}")


@_safe
def publish_eval(cfg: PipelineConfig, report: dict[str, Any]) -> None:
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    create_table_artifact(eval_table(report), key=artifact_key(cfg, "eval-base-vs-adapter"),
                          description=f"Held-out loss per category, base vs adapter ({Path(report['run_dir']).name})")
    run_dir = Path(report["run_dir"])
    # embedded, not linked: a file:// path means nothing to a browser on another machine
    for name, path in report.get("dashboards", {}).items():
        create_markdown_artifact(dashboard_markdown(name, Path(path), run_dir), key=artifact_key(cfg, f"dashboard-{name}"),
                                 description=f"Dashboard: {name} ({run_dir.name})")
    create_markdown_artifact(adapter_markdown(run_dir, cfg.root), key=artifact_key(cfg, "adapter"),
                             description=f"PEFT adapter of {run_dir.name} (safetensors)")
    s = (report.get("samples") or [{}])[0]
    if s:
        create_markdown_artifact(f"**Prompt:** {s.get('prompt')}\n\n**Base:** {s.get('base')}\n\n**Adapter:** {s.get('adapter')}",
                                 key=artifact_key(cfg, "sample"), description="Sample answer, base vs adapter")


@_safe
def publish_lineage(cfg: PipelineConfig, lin: dict[str, Any]) -> None:
    from prefect.artifacts import create_markdown_artifact

    create_markdown_artifact(lineage_markdown(lin), key=artifact_key(cfg, "lineage"),
                             description=f"Which data snapshot and base made adapter {lin['run_id']}")


@_safe
def publish_promotion(cfg: PipelineConfig, p: dict[str, Any]) -> None:
    from prefect.artifacts import create_markdown_artifact

    create_markdown_artifact(promotion_markdown(p), key=artifact_key(cfg, "promotion"),
                             description=("promoted " if p["promoted"] else "kept current; not promoted ") + p["run_id"])


@_safe
def publish_markdown(cfg: PipelineConfig, name: str, text: str, description: str) -> None:
    from prefect.artifacts import create_markdown_artifact

    create_markdown_artifact(text, key=artifact_key(cfg, name), description=description)


@_safe
def publish_table(cfg: PipelineConfig, name: str, rows: list[dict[str, Any]], description: str) -> None:
    from prefect.artifacts import create_table_artifact

    create_table_artifact(rows, key=artifact_key(cfg, name), description=description)


@_safe
def publish_stages(cfg: PipelineConfig, status: dict[str, dict[str, Any]]) -> None:
    from prefect.artifacts import create_table_artifact

    create_table_artifact(stages_table(status), key=artifact_key(cfg, "stages"),
                          description="Which stages ran and which were up to date (skipped by fingerprint)")


@contextlib.contextmanager
def training_progress(cfg: PipelineConfig, run_dir: Path, total_steps: int | None,
                      every_s: float = 5.0) -> Iterator[None]:
    """A progress artifact that follows ``metrics.jsonl`` while the training subprocess runs."""
    try:
        from prefect.artifacts import create_progress_artifact, update_progress_artifact

        art = create_progress_artifact(0.0, key=artifact_key(cfg, "training-progress"),
                                       description=f"training {Path(run_dir).name}: steps done / {total_steps or '?'}")
    except Exception as e:
        log.warning("no training progress artifact: %s", e)
        yield
        return
    stop = threading.Event()
    follower = MetricsFollower(Path(run_dir) / "metrics.jsonl")

    def pct() -> float:
        step = follower.poll()
        return min(100.0, 100.0 * step / total_steps) if step and total_steps else 0.0

    def follow() -> None:
        last = -1.0
        while not stop.wait(every_s):
            with contextlib.suppress(Exception):
                p = pct()
                if p != last:
                    update_progress_artifact(art, p)
                    last = p

    t = threading.Thread(target=follow, name="training-progress", daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join(timeout=every_s + 5)
        with contextlib.suppress(Exception):
            update_progress_artifact(art, pct() if total_steps else 100.0)
