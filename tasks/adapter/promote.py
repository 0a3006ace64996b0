"""Which adapter is current, when to retrain, and whether a new adapter replaces the current one.

Plain functions (no Prefect), used by the ``rescrape-and-retrain`` and ``data-to-adapter`` flows and
called directly by the tests.

  <data root>/current.json        the current adapter: run dir, adapter, held-out loss per category,
                                  lineage, when and why it was promoted
  <data root>/promotions.jsonl    every decision, promoted or kept, with its reasons
  runs/<run_id>/corpus.json       source:path -> sha256 of every page the run was trained from (what the
                                  next re-scrape is compared with)
  runs/<run_id>/promotion.json    the decision for this run: both adapters' losses on the same rows

Retrain gate: the fraction of pages that are new, changed or gone since the *current adapter's*
corpus (not since the last scrape, so small changes add up across scheduled runs) must exceed
``schedule.change_threshold``.

Promotion gate. It fails closed: anything it cannot check keeps the current adapter.
- Base: the candidate must be trained on the config's base revision, and on the current adapter's
  (an adapter only fits the weights it was trained on; a new base is promoted by hand).
- Domain: the candidate's held-out loss may be at most ``schedule.promote_tolerance`` (nats/token)
  above the current adapter's in every category, and a category held out by one side only blocks.
  The held-out split grows with the corpus, so the current adapter is re-measured on the
  candidate's held-out rows (same rows, same count, same code); only when the two were made with
  different tokenizers are their own recorded numbers compared, and the decision says so.
- General ability: base and candidate are scored by their loss on the reference answers of a small
  general instruction set (``schedule.general_set``); the candidate may lose at most
  ``schedule.general_tolerance`` there (an instruct model trained on raw text can lose its chat
  ability while its food-text loss improves).
- Approval (``schedule.approval``): when the checks pass, a person still decides; the flow pauses
  with the comparison table (flows/pipeline.py) and no answer in time rejects.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tasks.core.config import PipelineConfig
from tasks.core.manifest import fingerprint, read_manifest, write_json_atomic

log = logging.getLogger("tasks.adapter.promote")

CURRENT = "current.json"
HISTORY = "promotions.jsonl"


# ------------------------------------------------------------------------------ current adapter
def read_current(root: Path) -> dict[str, Any] | None:
    p = Path(root) / CURRENT
    if not p.is_file():
        return None
    try:
        cur = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        log.warning("%s is not valid JSON: treated as no current adapter", p)
        return None
    if not (Path(cur.get("adapter", "")) / "adapter_config.json").is_file():
        log.warning("current adapter %s is missing: treated as no current adapter", cur.get("adapter"))
        return None
    return cur


def eval_losses_of(report: dict[str, Any]) -> dict[str, float]:
    """Adapter loss per category from an ``eval.json``."""
    return {c: float(r["adapter"]["loss"]) for c, r in report.get("categories", {}).items()}


def mark_current(root: Path, run_dir: Path, report: dict[str, Any], reasons: list[str],
                 lineage_info: dict[str, Any] | None = None) -> dict[str, Any]:
    run_dir = Path(run_dir)
    cur = {
        "run_id": run_dir.name,
        "run_dir": str(run_dir),
        "adapter": str(run_dir / "adapter"),
        "eval_report": str(run_dir / "eval.json"),
        "eval_fingerprint": report.get("fingerprint"),
        "heldout_loss": eval_losses_of(report),
        "overall_loss": report.get("overall", {}).get("adapter", {}).get("loss"),
        "lineage": lineage_info or {},
        "reasons": reasons,
        "promoted_at": _now(),
    }
    write_json_atomic(Path(root) / CURRENT, cur)
    return cur


# --------------------------------------------------------------------------------- corpus drift
def corpus_snapshot(root: Path) -> dict[str, str]:
    """``source_id:path?query`` -> sha256 of every page published in ``raw/`` (three small columns).

    Keyed like the scrape's pages fingerprint: without the origin, so the same site served from
    another host or port is the same corpus."""
    import pyarrow.parquet as pq

    from scrapers.common import path_query

    out: dict[str, str] = {}
    for f in sorted((Path(root) / "raw").glob("*/pages.parquet")):
        t = pq.read_table(f, columns=["source_id", "url", "sha256"])
        for sid, url, sha in zip(t.column("source_id").to_pylist(), t.column("url").to_pylist(),
                                 t.column("sha256").to_pylist()):
            out[f"{sid}:{path_query(url)}"] = sha
    return out


def record_corpus(run_dir: Path, root: Path) -> Path:
    """Remember which pages a run was trained from (the baseline of the next drift check)."""
    p = Path(run_dir) / "corpus.json"
    snap = corpus_snapshot(root)
    raw = read_manifest(Path(root) / "raw") or {}
    write_json_atomic(p, {"pages_fingerprint": raw.get("inputs", {}).get("pages"),
                          "generation": raw.get("generation"), "pages": snap, "recorded_at": _now()})
    return p


@dataclass
class Drift:
    new: int
    changed: int
    gone: int
    unchanged: int
    fraction: float
    baseline: str  # what the corpus was compared with

    def summary(self) -> str:
        return (f"{self.fraction:.1%} of pages differ from {self.baseline} "
                f"(new {self.new}, changed {self.changed}, gone {self.gone}, unchanged {self.unchanged})")


def corpus_drift(old: dict[str, str], new: dict[str, str], baseline: str = "the baseline") -> Drift:
    """Fraction of pages new, changed or gone, over every page in either snapshot."""
    n_new = sum(u not in old for u in new)
    changed = sum(u in old and old[u] != h for u, h in new.items())
    gone = sum(u not in new for u in old)
    unchanged = len(new) - n_new - changed
    total = len(set(old) | set(new))
    return Drift(n_new, changed, gone, unchanged, (n_new + changed + gone) / total if total else 0.0, baseline)


@dataclass
class RetrainDecision:
    retrain: bool
    reason: str
    drift: Drift | None
    current: dict[str, Any] | None


def retrain_decision(cfg: PipelineConfig, force: bool = False) -> RetrainDecision:
    """After a scrape: should the pipeline prepare, train and evaluate?"""
    root = cfg.root
    cur = read_current(root)
    snap = corpus_snapshot(root)
    threshold = cfg.schedule.change_threshold
    if cur is None:
        return RetrainDecision(True, "no current adapter yet: training the first one", None, None)
    base_file = Path(cur["run_dir"]) / "corpus.json"
    old = json.loads(base_file.read_text())["pages"] if base_file.is_file() else {}
    drift = corpus_drift(old, snap, f"the corpus of current adapter {cur['run_id']}")
    if not base_file.is_file():
        return RetrainDecision(True, f"current adapter {cur['run_id']} has no corpus.json: retraining", drift, cur)
    if force:
        return RetrainDecision(True, f"forced; {drift.summary()}", drift, cur)
    if drift.fraction > threshold:
        return RetrainDecision(True, f"{drift.summary()} > threshold {threshold:.1%}: retraining", drift, cur)
    return RetrainDecision(False, f"{drift.summary()} <= threshold {threshold:.1%}: kept adapter {cur['run_id']}, "
                                  "nothing retrained", drift, cur)


# ------------------------------------------------------------------------------ promotion gate
@dataclass
class PromotionDecision:
    promote: bool
    reasons: list[str]
    rows: list[dict[str, Any]] = field(default_factory=list)  # per category: current, candidate, delta, verdict
    same_rows: bool = True


def decide(candidate: dict[str, float], current: dict[str, float] | None, tolerance: float,
           same_rows: bool = True) -> PromotionDecision:
    """Promote iff no category's held-out loss is worse than the current one's by more than ``tolerance``."""
    if current is None:
        return PromotionDecision(True, ["no current adapter: the first one is promoted"],
                                 [{"category": c, "current": None, "candidate": v, "delta": None, "verdict": "new"}
                                  for c, v in sorted(candidate.items())], same_rows)
    rows, worse, reasons, one_sided = [], [], [], []
    for cat in sorted(set(candidate) | set(current)):
        a, b = current.get(cat), candidate.get(cat)
        if a is None or b is None:
            side = "the current adapter" if b is None else "the candidate"
            rows.append({"category": cat, "current": a, "candidate": b, "delta": None,
                         "verdict": f"blocks: held out by {side} only"})
            one_sided.append(f"{cat} (held out by {side} only)")
            continue
        delta = b - a
        ok = delta <= tolerance
        rows.append({"category": cat, "current": a, "candidate": b, "delta": delta,
                     "verdict": "ok" if ok else "worse"})
        if not ok:
            worse.append(f"{cat}: {b:.4f} vs current {a:.4f} ({delta:+.4f} > tolerance {tolerance:+.4f})")
    compared = [r for r in rows if r["delta"] is not None]
    if one_sided:  # fail closed: a category nobody can compare may be the one that got worse
        return PromotionDecision(False, ["kept the current adapter: cannot compare " + ", ".join(one_sided)
                                         + "; both must be measured on every category"], rows, same_rows)
    if not compared:
        return PromotionDecision(False, ["no category held out by both adapters: cannot compare, kept the current one"],
                                 rows, same_rows)
    if worse:
        reasons.append("kept the current adapter: the new one is worse in " + "; ".join(worse))
        return PromotionDecision(False, reasons, rows, same_rows)
    mean_delta = sum(r["delta"] for r in compared) / len(compared)
    reasons.append(f"promoted: no category worse than the current adapter by more than {tolerance:+.4f} "
                   f"(mean delta {mean_delta:+.4f} over {len(compared)} categories)")
    if not same_rows:
        reasons.append("note: the adapters use different tokenizers, so each was measured on its own held-out rows")
    return PromotionDecision(True, reasons, rows, same_rows)


def measure_adapter(run_dir: Path, tokenized_dir: Path, max_rows: int, batch_size: int) -> dict[str, float]:
    """Held-out loss per category of the adapter in ``run_dir`` on ``tokenized_dir``'s eval rows: the
    same rows and code as ``tasks.evaluate`` (tasks/train/heldout.py), so the numbers compare with an ``eval.json``."""
    from tasks.adapter.generate import load_for_inference
    from tasks.train.heldout import eval_losses, load_eval_sets

    model, _ = load_for_inference(Path(run_dir))
    device = next(model.parameters()).device
    res = eval_losses(model, load_eval_sets(Path(tokenized_dir)), max_rows, batch_size, device)
    del model
    return {c: r["loss"] for c, r in res["categories"].items()}


# ------------------------------------------------------------------------------ general ability
def read_general_set(path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """({line, prompt, answer} items, rejects): a line that is not a JSON object with non-empty string
    ``prompt`` and ``answer`` is kept aside with its file:line and reason; the rest is used."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"schedule.general_set: {path} not found (set it to null to skip the general check)")
    items, rejects = [], []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            rejects.append({"file": str(path), "line": n, "reason": f"not JSON: {e.msg}"})
            continue
        bad = [k for k in ("prompt", "answer") if not isinstance(obj, dict) or not isinstance(obj.get(k), str)
               or not obj[k].strip()]
        if bad:
            rejects.append({"file": str(path), "line": n, "reason": f"missing or empty {', '.join(bad)}"})
            continue
        items.append({"line": n, "prompt": obj["prompt"], "answer": obj["answer"]})
    for r in rejects:
        log.warning("%s:%d: %s: skipped", r["file"], r["line"], r["reason"])
    if not items:
        raise ValueError(f"schedule.general_set: {path} holds no usable line ({len(rejects)} rejected)")
    return items, rejects


def general_loss(model, tok, items: list[dict[str, Any]]) -> dict[str, float]:
    """Token-weighted loss of the reference answers, each after its prompt in the chat template: how
    well the model still predicts plain good answers to general instructions."""
    import torch

    from tasks.adapter.generate import _input_device, encode_messages

    device = _input_device(model)
    loss_sum = tokens = 0.0
    model.eval()
    with torch.no_grad():
        for it in items:
            prompt = encode_messages(tok, [{"role": "user", "content": it["prompt"]}])["input_ids"][0].tolist()
            answer = tok(it["answer"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            ids = torch.tensor([prompt + answer], device=device)
            labels = torch.tensor([[-100] * len(prompt) + answer], device=device)
            loss = model(input_ids=ids, labels=labels, use_cache=False).loss.float().item()
            loss_sum += loss * len(answer)  # HF shifts labels: exactly the answer tokens are predicted
            tokens += len(answer)
    return {"loss": loss_sum / tokens, "tokens": int(tokens), "items": len(items)}


def measure_general(run_dir: Path, set_path: Path, logger: logging.Logger | None = None) -> dict[str, Any]:
    """Base and candidate loss on the general set, on the same quantized base weights (the base first,
    untouched); cached in ``runs/<id>/general.json`` by the set's and the adapter's hashes."""
    from tasks.adapter.generate import attach_adapter, load_run_base
    from tasks.core.manifest import sha256_file

    logger = logger or log
    run_dir, set_path = Path(run_dir), Path(set_path)
    key = fingerprint({"set": sha256_file(set_path), "adapter": sha256_file(run_dir / "adapter" / "adapter_model.safetensors")})
    prev = _read_json(run_dir / "general.json")
    if prev and prev.get("key") == key:
        return prev
    items, rejects = read_general_set(set_path)
    logger.info("promote: scoring base and candidate on %d general instructions (%s)", len(items), set_path)
    model, tok = load_run_base(run_dir)
    base = general_loss(model, tok, items)
    model = attach_adapter(model, run_dir)
    cand = general_loss(model, tok, items)
    del model
    out = {"key": key, "set": str(set_path), "base": base, "candidate": cand, "delta": cand["loss"] - base["loss"],
           "rejected_lines": rejects}
    write_json_atomic(run_dir / "general.json", out)
    return out


def revision_of(run_dir: Path) -> str | None:
    """The base revision a run's adapter was trained on (None: not recorded)."""
    return (_read_json(Path(run_dir) / "adapter" / "quantization.json") or {}).get("base_revision")


def _run_inputs(run_dir: Path) -> dict[str, Any]:
    return json.loads((Path(run_dir) / "inputs.json").read_text())


def run_promote(cfg: PipelineConfig, run_dir: Path, logger: logging.Logger | None = None,
                approve: Callable[[dict[str, Any]], tuple[bool, str]] | None = None) -> dict[str, Any]:
    """The promotion gate for a trained and evaluated run: marks it current or says why not.

    ``approve`` (the flow's human approval step) is asked only when every check passed; it gets the
    decision so far and returns (approved, why). Returns (and writes to ``runs/<id>/promotion.json``)
    the decision with both adapters' losses."""
    from tasks.core.model import base_revision

    logger = logger or log
    root, run_dir = cfg.root, Path(run_dir)
    report = json.loads((run_dir / "eval.json").read_text())
    candidate = eval_losses_of(report)
    cur = read_current(root)
    tol = cfg.schedule.promote_tolerance
    same_rows = True
    current_losses: dict[str, float] | None = None
    key: str | None = None  # what decided the current adapter's re-measured losses (cache key)
    # the base first: an adapter only fits the weights it was trained on
    cand_rev, cfg_rev = revision_of(run_dir), base_revision(cfg.model)
    cur_rev = revision_of(Path(cur["run_dir"])) if cur else None
    blocked = []
    if cand_rev != cfg_rev:
        blocked.append(f"base revision mismatch: the candidate was trained on base revision {cand_rev}, the config's "
                       f"base is revision {cfg_rev}")
    if cur is not None and cur_rev != cand_rev:
        blocked.append(f"base revision mismatch: the current adapter {cur['run_id']} was made on base revision "
                       f"{cur_rev}, the candidate on {cand_rev}: their losses do not compare; promote a new base by "
                       f"hand (remove {root / CURRENT} after checking the candidate)")
    if blocked:
        decision = PromotionDecision(False, ["kept the current adapter: " + "; ".join(blocked)])
    elif cur is not None and Path(cur["run_dir"]).resolve() == run_dir.resolve():
        # the same run again (re-run on unchanged inputs, or a forced re-evaluation): refresh, no contest
        decision = PromotionDecision(True, [f"{run_dir.name} is already the current adapter; record refreshed"],
                                     [{"category": c, "current": v, "candidate": v, "delta": 0.0, "verdict": "ok"}
                                      for c, v in sorted(candidate.items())])
    else:
        if cur is not None:
            cand_tok = Path(_run_inputs(run_dir)["tokenized_dir"])
            cur_tok = Path(_run_inputs(Path(cur["run_dir"]))["tokenized_dir"])
            if cand_tok.name == cur_tok.name:
                # measure the current adapter on the candidate's held-out rows (cached by what decides it)
                ec = cfg.evaluate
                key = fingerprint({"current": cur["run_id"], "current_eval": cur.get("eval_fingerprint"),
                                   "tokenized": (read_manifest(cand_tok) or {}).get("fingerprint"),
                                   "rows": ec.max_rows_per_category, "batch": ec.batch_size})
                prev = _read_json(run_dir / "promotion.json")
                if prev and prev.get("current_measure_key") == key:
                    current_losses = prev["current_losses"]
                else:
                    logger.info("promote: measuring current adapter %s on %s's held-out rows", cur["run_id"], run_dir.name)
                    current_losses = measure_adapter(Path(cur["run_dir"]), cand_tok, ec.max_rows_per_category,
                                                     ec.batch_size)
                # a category the current adapter was held out on that the candidate's rows lack stays on the
                # current side (its recorded loss), so the comparison sees it one-sided and blocks
                for c, v in cur.get("heldout_loss", {}).items():
                    current_losses.setdefault(c, float(v))
            else:
                same_rows = False
                current_losses = {k: float(v) for k, v in cur.get("heldout_loss", {}).items()}
        decision = decide(candidate, current_losses, tol, same_rows)
    general = None
    sc = cfg.schedule
    if sc.general_set and not blocked:  # general ability, base vs candidate (also for the first adapter)
        from scrapers.schema import resolve_path

        general = measure_general(run_dir, resolve_path(sc.general_set), logger)
        g_ok = general["delta"] <= sc.general_tolerance
        decision.rows.append({"category": "general set (vs base)", "current": general["base"]["loss"],
                              "candidate": general["candidate"]["loss"], "delta": general["delta"],
                              "verdict": "ok" if g_ok else "worse"})
        if not g_ok:
            decision.promote = False
            decision.reasons.append(
                f"kept the current adapter: on the general instruction set the candidate's loss is "
                f"{general['candidate']['loss']:.4f} vs the base's {general['base']['loss']:.4f} "
                f"({general['delta']:+.4f} > tolerance {sc.general_tolerance:+.4f}): it lost general ability")
    out = {
        "run_id": run_dir.name,
        "promoted": decision.promote,
        "reasons": decision.reasons,
        "rows": decision.rows,
        "same_rows": decision.same_rows,
        "tolerance": tol,
        "base_revision": {"candidate": cand_rev, "config": cfg_rev, "current": cur_rev},
        "general": general and {k: general[k] for k in ("set", "base", "candidate", "delta")},
        "general_tolerance": sc.general_tolerance,
        "current_before": cur and {k: cur[k] for k in ("run_id", "run_dir", "promoted_at")},
        "current_losses": current_losses,
        "candidate_losses": candidate,
        "current_measure_key": key,
        "approval": None,
        "decided_at": _now(),
    }
    if decision.promote and approve is not None:  # every check passed: a person has the last word
        ok, why = approve(out)
        out["approval"] = {"approved": ok, "detail": why}
        decision.promote = out["promoted"] = ok
        out["reasons"] = decision.reasons = [*decision.reasons, why]
    if decision.promote:
        mark_current(root, run_dir, report, decision.reasons, lineage(cfg, run_dir))
    write_json_atomic(run_dir / "promotion.json", out)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / HISTORY, "a", encoding="utf-8") as f:
        f.write(json.dumps({k: out[k] for k in ("run_id", "promoted", "reasons", "decided_at")}) + "\n")
    (logger.info if decision.promote else logger.warning)("promote: %s", " ".join(decision.reasons))
    return out


# ------------------------------------------------------------------------------------- lineage
def lineage(cfg: PipelineConfig, run_dir: Path) -> dict[str, Any]:
    """Which data snapshot and which base made this adapter, from the manifests (newest first)."""
    root, run_dir = cfg.root, Path(run_dir)
    train_m = read_manifest(run_dir) or {}
    inputs = _read_json(run_dir / "inputs.json") or {}
    tok_dir = Path(inputs.get("tokenized_dir", ""))
    chain = []
    for name, d in (("tokenize", tok_dir), ("mix", root / "mix"), ("split", root / "split"),
                    ("clean", root / "clean"), ("extract", root / "extracted"), ("scrape", root / "raw")):
        m = read_manifest(d) if str(d) else None
        if m:
            chain.append({"stage": name, "dir": str(d), "fingerprint": m.get("fingerprint"),
                          "inputs": m.get("inputs"), "created_at": m.get("created_at"),
                          **({"generation": m.get("generation")} if name == "scrape" else {})})
    # the data the run actually used is the tokenized snapshot it names; say when the chain moved on
    consistent = bool(chain) and chain[0]["stage"] == "tokenize" and \
        chain[0]["fingerprint"] == train_m.get("inputs", {}).get("tokenized")
    return {
        "run_id": run_dir.name,
        "adapter": str(run_dir / "adapter"),
        "train_fingerprint": train_m.get("fingerprint"),
        "base_model": cfg.model.name,
        "base_revision": (inputs.get("quantization") or {}).get("base_revision"),
        "base_path": inputs.get("base"),
        "quantization": (inputs.get("quantization") or {}).get("quantization"),
        "tokenized": train_m.get("inputs", {}).get("tokenized"),
        "tokenized_dir": str(tok_dir),
        "data_chain": chain,
        "data_chain_matches_run": consistent,
    }


def _read_json(p: Path) -> dict[str, Any] | None:
    try:
        return json.loads(Path(p).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
