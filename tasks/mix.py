"""Mix the training split to the configured category ratios, by tokens.

Reads ``split/train/<category>.parquet``, counts each document's tokens with the model's tokenizer
(``n_tokens`` = ids without special tokens + 1 for the EOS the packer appends), and writes
``mix/train/<category>.parquet`` with one row per selected document: doc_id, category, text,
n_tokens, repeat (the tokenize stage emits the document ``repeat`` times), text_hash (the token
cache key of its ids). The eval split is not mixed: every category keeps its own held-out stream.

Budget. With ``mix.total_tokens`` set, T is that. Otherwise T is automatic:

    T = min( sum of available tokens over categories with ratio > 0,
             min over those categories of available_c * max_repeat / ratio_c )

i.e. the largest budget that no category must be up-sampled more than ``max_repeat`` times to meet,
and never larger than the corpus itself (so a corpus with plenty of every category is re-weighted,
not inflated). A category with ratio > 0 but no tokens at all cannot bind T (it would make T = 0);
it is reported with its whole target as shortfall, and the other shares come out proportionally
higher than their targets.

Selection per category c with budget B_c = round(ratio_c * T):
  * B_c <= available: whole documents in a seeded stable order (hash of seed and doc_id) while they
    fit the budget, then later documents that fit the remaining gap, then one that overshoots if
    that lands closer to B_c (see ``fill``).
  * B_c > available: every document floor(k) times (k = B_c / available, capped at max_repeat), and
    the same ``fill`` picks documents once more for the fractional part, never passing
    max_repeat * available; what the cap leaves unmet is the shortfall.
The same seed, corpus and tokenizer always give the same selection; a new document only changes
the selection where its hash falls in the order.

Bad input: a row with null/empty text or no doc_id, or a file of an unknown category, is never
selected; it is listed in ``mix/quarantine.parquet`` (file, row, reason) and counted, so
``documents in = available + quarantined`` per category. Token counting is the expensive part (a
full tokenization): it runs in ``tokenize.workers`` processes, or on Dask workers when an executor
is given, with results taken in order, so the plan is the same however it ran.

Token cache: counting exactly means encoding, so the ids are kept (``tasks.tokenize.TokenCache``,
``<root>/tokcache/``) keyed by the text's hash, and only texts the cache lacks are encoded: the
tokenize stage packs from the kept ids (each output row names them by ``text_hash``) and a re-run
after a re-scrape encodes only new or changed documents. Entries the current split no longer holds
are collected at the end of the stage.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tasks.core._prefect import task
from tasks.core.cli import clean_errors, stage_args
from tasks.core.config import CATEGORIES, PipelineConfig, config_from_dict, dump_resolved
from tasks.core.manifest import Stage, require_manifest
from tasks.core.textio import CategoryWriters, Progress, category_files, dask_executor, iter_batches, num_rows

log = logging.getLogger("tasks.mix")

OUT_SCHEMA = pa.schema(
    [("doc_id", pa.string()), ("category", pa.string()), ("text", pa.string()),
     ("n_tokens", pa.int64()), ("repeat", pa.int32()), ("text_hash", pa.binary(16))]
)


def get_tokenizer(cfg):
    from tasks.core.model import model_tokenizer
    return model_tokenizer(cfg.model, cfg.root / "models")


# ------------------------------------------------------------------------------- planning
def order_key(seed: int, doc_id: str) -> int:
    """Stable per-document position in the selection order (independent of file order)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{doc_id}".encode()).digest()[:8], "big")


def plan_total(available: dict[str, int], ratios: dict[str, float], total_tokens: int | None,
               max_repeat: float) -> tuple[int, str]:
    """(T, what decided it): the configured budget, or the automatic one described in the module doc."""
    if total_tokens is not None:
        return int(total_tokens), "mix.total_tokens"
    active = {c: r for c, r in ratios.items() if r > 0 and available.get(c, 0) > 0}
    if not active:
        return 0, "no tokens in any category with ratio > 0"
    corpus = sum(available.get(c, 0) for c, r in ratios.items() if r > 0)
    binding = min(active, key=lambda c: (available[c] * max_repeat / active[c], CATEGORIES.index(c)))
    cap = available[binding] * max_repeat / active[binding]
    if corpus <= cap:
        return int(corpus), "corpus size"
    return int(math.floor(cap)), f"{binding} at max_repeat={max_repeat:g}"


def fill(n_ordered: np.ndarray, budget: int, limit: int) -> np.ndarray:
    """Which docs (in selection order) to take so their tokens come closest to ``budget`` without
    passing ``limit`` (the max_repeat cap): the ordered prefix that stays under the budget, then
    first-fit of later docs into the gap (matters when documents are large relative to the budget),
    then one more doc if overshooting lands closer than stopping short."""
    take = np.zeros(len(n_ordered), dtype=bool)
    if budget <= 0 or len(n_ordered) == 0:
        return take
    cum = np.cumsum(n_ordered)
    k = int(np.searchsorted(cum, budget, side="right"))  # docs whose prefix sum stays <= budget
    take[:k] = True
    gap = budget - (int(cum[k - 1]) if k else 0)
    for i in np.flatnonzero(n_ordered[k:] <= gap) + k:  # later docs small enough to fit the gap
        if n_ordered[i] <= gap:
            take[i] = True
            gap -= int(n_ordered[i])
            if gap == 0:
                return take
    rest = np.flatnonzero(~take)
    if gap > 0 and len(rest):
        j = rest[0]  # the next doc in order
        if n_ordered[j] - gap < gap and budget - gap + n_ordered[j] <= limit:
            take[j] = True
    return take


def select(n_tokens: np.ndarray, keys: np.ndarray, budget: int, max_repeat: float) -> np.ndarray:
    """Repeat count per document (0 = not selected) that meets ``budget`` tokens; see module doc."""
    rep = np.zeros(len(n_tokens), dtype=np.int64)
    avail = int(n_tokens.sum())
    if budget <= 0 or avail == 0:
        return rep
    order = np.argsort(keys, kind="stable")
    if budget <= avail:
        rep[order[fill(n_tokens[order], budget, avail)]] = 1
        return rep
    cap = int(math.floor(max_repeat * avail))
    reach = min(budget, cap)
    full = reach // avail
    rep[:] = full
    rep[order[fill(n_tokens[order], reach - full * avail, cap - full * avail)]] += 1
    return rep


@dataclass
class CategoryMix:
    category_id: int
    ratio: float
    available_docs: int
    available_tokens: int
    target_tokens: int
    selected_docs: int = 0
    selected_tokens: int = 0
    target_share: float = 0.0
    achieved_share: float = 0.0
    repeat_factor: float = 0.0
    shortfall_tokens: int = 0


def plan(available: dict[str, tuple[np.ndarray, np.ndarray]], ratios: dict[str, float], total_tokens: int | None,
         max_repeat: float) -> tuple[dict[str, CategoryMix], dict[str, np.ndarray], dict[str, Any]]:
    """Per category (n_tokens, keys) -> (report per category, repeats per category, totals)."""
    avail_tok = {c: int(n.sum()) for c, (n, _) in available.items()}
    T, why = plan_total(avail_tok, ratios, total_tokens, max_repeat)
    report: dict[str, CategoryMix] = {}
    repeats: dict[str, np.ndarray] = {}
    for cat in CATEGORIES:
        n, keys = available.get(cat, (np.zeros(0, np.int64), np.zeros(0, np.uint64)))
        ratio = float(ratios.get(cat, 0.0))
        if ratio == 0 and len(n) == 0:
            continue
        budget = int(round(ratio * T))
        rep = select(n, keys, budget, max_repeat)
        repeats[cat] = rep
        sel = int((n * rep).sum())
        report[cat] = CategoryMix(
            category_id=CATEGORIES.index(cat), ratio=ratio, available_docs=int((n > 0).sum()), available_tokens=int(n.sum()),
            target_tokens=budget, selected_docs=int((rep > 0).sum()), selected_tokens=sel, target_share=ratio,
            repeat_factor=round(sel / int(n.sum()), 4) if len(n) and n.sum() else 0.0,
            shortfall_tokens=max(0, budget - sel),
        )
    total_sel = sum(r.selected_tokens for r in report.values())
    for r in report.values():
        r.achieved_share = round(r.selected_tokens / total_sel, 6) if total_sel else 0.0
    totals = {"target_tokens": T, "selected_tokens": total_sel, "budget_from": why, "max_repeat": max_repeat,
              "available_tokens": sum(avail_tok.values()),
              "shortfall_tokens": sum(r.shortfall_tokens for r in report.values())}
    return report, repeats, totals


def format_table(report: dict[str, CategoryMix], totals: dict[str, Any]) -> str:
    head = f"{'category':<22}{'available':>14}{'target':>14}{'selected':>14}{'target%':>9}{'got%':>9}{'repeat':>8}{'short':>12}"
    lines = [head, "-" * len(head)]
    for cat, r in report.items():
        lines.append(f"{cat:<22}{r.available_tokens:>14,}{r.target_tokens:>14,}{r.selected_tokens:>14,}"
                     f"{100 * r.target_share:>8.2f}%{100 * r.achieved_share:>8.2f}%{r.repeat_factor:>8.2f}{r.shortfall_tokens:>12,}")
    lines.append(f"{'total':<22}{totals['available_tokens']:>14,}{totals['target_tokens']:>14,}{totals['selected_tokens']:>14,}"
                 f"   (budget from {totals['budget_from']})")
    return "\n".join(lines)


# ------------------------------------------------------------------------------- the stage
def count_job(job) -> tuple[np.ndarray, np.ndarray]:
    """Worker entry point: encode one batch of texts the token cache lacks; (ids per text, all ids
    concatenated), two arrays instead of one per text, which is cheaper to send back from a worker."""
    from tasks.tokenize.cache import encode_job

    ids = encode_job(job)
    lengths = np.fromiter((len(a) for a in ids), np.int64, len(ids))
    return lengths, (np.concatenate(ids) if ids else np.zeros(0, np.uint32))


QUARANTINE_SCHEMA = pa.schema([("category", pa.string()), ("file", pa.string()), ("row", pa.int64()),
                               ("doc_id", pa.string()), ("reason", pa.string())])


@dataclass
class Measured:
    """Per row of one split/train file."""

    n_tokens: np.ndarray  # ids + 1 (EOS); 0 for a bad row
    order: np.ndarray  # selection-order keys
    ok: np.ndarray  # usable (not quarantined)
    text_keys: np.ndarray  # (rows, 16) token-cache keys; zeros for a bad row


def _measure(path: Path, cat: str, scope, encode, seed: int, quarantine: list[dict]) -> Measured:
    """Count tokens per row of one category file: cached ids' lengths, and the misses encoded (by
    ``encode``, in order) and added to the cache; bad rows are quarantined."""
    from tasks.tokenize.cache import KEY_BYTES, text_keys

    n_tok: list[np.ndarray] = []
    keys: list[int] = []
    ok: list[bool] = []
    tkeys: list[np.ndarray] = []
    prog = Progress(log, f"mix: counting tokens in {cat}", num_rows(path))

    def batches():
        row0 = 0
        for batch in iter_batches(path, ["doc_id", "text"]):
            d = batch.to_pydict()
            good = [isinstance(t, str) and bool(t.strip()) and isinstance(i, str) and bool(i)
                    for i, t in zip(d["doc_id"], d["text"])]
            for r, g in enumerate(good):
                if not g:
                    reason = "no doc_id" if not isinstance(d["doc_id"][r], str) or not d["doc_id"][r] else "null or empty text"
                    if len(quarantine) < 20:
                        log.warning("mix: %s row %d: %s; not selected (quarantined)", path, row0 + r, reason)
                    quarantine.append({"category": cat, "file": "/".join(path.parts[-3:]), "row": row0 + r,
                                       "doc_id": d["doc_id"][r], "reason": reason})
            texts = [t for t, g in zip(d["text"], good) if g]
            k = text_keys(texts)
            seg, row = scope.lookup(k)
            miss = np.flatnonzero(seg < 0)
            yield (d["doc_id"], good, k, seg, row, miss), [texts[i] for i in miss]
            row0 += batch.num_rows

    for (doc_ids, good, k, seg, row, miss), enc in encode(batches()):
        n = np.zeros(len(k), np.int64)
        hit = seg >= 0
        n[hit] = scope.n_ids(seg[hit], row[hit]) + 1
        if len(miss):
            lengths, flat = enc
            n[miss] = lengths + 1
            scope.add(k[miss], np.split(flat, np.cumsum(lengths)[:-1]))
        mask = np.asarray(good, dtype=bool)
        full = np.zeros(len(good), np.int64)
        full[mask] = n
        fk = np.zeros((len(good), KEY_BYTES), np.uint8)
        fk[mask] = k
        n_tok.append(full)
        tkeys.append(fk)
        keys.extend(order_key(seed, str(x)) for x in doc_ids)
        ok.extend(good)
        prog.update(len(good))
    return Measured(np.concatenate(n_tok) if n_tok else np.zeros(0, np.int64), np.asarray(keys, dtype=np.uint64),
                    np.asarray(ok, dtype=bool),
                    np.concatenate(tkeys) if tkeys else np.zeros((0, KEY_BYTES), np.uint8))


# mix counts tokens through the token cache (tokenize/cache.py), not the packer or the training reader
CODE_FILES = ("tasks/mix.py", "tasks/tokenize/cache.py", "tasks/tokenize/format.py", "tasks/core/textio.py")


def run_mix(cfg: PipelineConfig, tokenizer=None, workers: int | None = None, executor=None) -> dict[str, Any]:
    """Plan and write ``<root>/mix/train``; ``tokenizer`` defaults to the model's (``get_tokenizer``).
    Token counting runs in ``workers`` processes (default ``tokenize.workers``) or on ``executor``;
    the ids it yields go into the token cache for the tokenize stage (and later runs)."""
    from tasks.core.model import tokenizer_fingerprint
    from tasks.tokenize.cache import TokenCache, keys_array, ordered_encode, register_encoder, tokenizer_ref

    split_m = require_manifest(cfg.root / "split", "split")
    tok = tokenizer if tokenizer is not None else get_tokenizer(cfg)
    tok_fp = tokenizer_fingerprint(tok)
    stage = Stage("mix", cfg.root / "mix", {"mix": cfg.section("mix"), "seed": cfg.seed},
                  {"split": split_m["fingerprint"], "tokenizer": tok_fp}, code=CODE_FILES)
    if (m := stage.up_to_date()) is not None:
        log.info("mix: up to date (%s)", stage.out_dir)
        return m
    workers = cfg.tokenize.workers if workers is None else workers
    ref = tokenizer_ref(tok, tok_fp, cfg.root / "models" / "tokenizers")
    if workers <= 1 and executor is None:
        register_encoder(ref, tok)
    cache = TokenCache(cfg.root, tok_fp, len(tok), cfg.tokenize.cache_segment_tokens, cfg.tokenize.token_cache)

    def encode(batches):
        return ordered_encode(count_job, ref, batches, workers, executor)

    split_dir = cfg.root / "split" / "train"
    files = category_files(split_dir)
    quarantine: list[dict] = []
    for p in category_files(split_dir, include_unknown=True).values():
        if p.stem not in files:  # an unknown category upstream: never mixed, but never silently ignored
            for row0, batch in enumerate(iter_batches(p, ["doc_id"], batch_rows=1)):
                quarantine.append({"category": p.stem, "file": "/".join(p.parts[-3:]), "row": row0,
                                   "doc_id": batch.column("doc_id")[0].as_py(), "reason": "unknown category"})
            log.warning("mix: %s is not one of the categories %s; its rows are quarantined", p, list(CATEGORIES))
    measured3: dict[str, Measured] = {}
    for cat, p in files.items():
        scope = cache.scope("train", cat)
        measured3[cat] = got = _measure(p, cat, scope, encode, cfg.seed, quarantine)
        scope.gc(got.text_keys[got.ok])  # what the current split no longer has is dropped from the cache
        scope.flush()
    cache.prune("train", files)
    measured = {cat: (m.n_tokens, m.order) for cat, m in measured3.items()}
    report, repeats, totals = plan(measured, cfg.mix.ratios, cfg.mix.total_tokens, cfg.mix.max_repeat)
    for cat, m in measured3.items():  # a zero-token bad row costs nothing to "select": never write it
        if cat in repeats:
            repeats[cat][~m.ok] = 0
    totals["quarantined"] = len(quarantine)
    totals["quarantined_by_reason"] = {r: sum(1 for q in quarantine if q["reason"] == r)
                                       for r in sorted({q["reason"] for q in quarantine})}
    # every row in is available (counted, selectable) or quarantined
    totals["documents_in"] = sum(num_rows(p) for p in category_files(split_dir, include_unknown=True).values())
    totals["available_docs"] = int(sum(m.ok.sum() for m in measured3.values()))
    if totals["documents_in"] != totals["available_docs"] + totals["quarantined"]:
        raise AssertionError(f"mix: documents_in {totals['documents_in']} != available {totals['available_docs']} "
                             f"+ quarantined {totals['quarantined']}")
    with stage.building() as work:
        with CategoryWriters(work / "train") as out:
            for cat, path in files.items():
                rep, n_tok, tkeys = repeats.get(cat), measured3[cat].n_tokens, measured3[cat].text_keys
                if rep is None or not rep.any():
                    continue
                row = 0
                for batch in iter_batches(path, ["doc_id", "text"]):
                    r = rep[row : row + batch.num_rows]
                    idx = np.flatnonzero(r)
                    if len(idx):
                        out.write(cat, pa.table(
                            [batch.column("doc_id").take(pa.array(idx)).cast(pa.string()),
                             pa.array([cat] * len(idx), pa.string()),
                             batch.column("text").take(pa.array(idx)).cast(pa.string()),
                             pa.array(n_tok[row + idx], pa.int64()),
                             pa.array(r[idx], pa.int32()),
                             keys_array(tkeys[row + idx])],
                            schema=OUT_SCHEMA))
                    row += batch.num_rows
        counts = {"categories": {c: asdict(r) for c, r in report.items()}, "total": totals}
        pq.write_table(pa.Table.from_pylist(quarantine, schema=QUARANTINE_SCHEMA), work / "quarantine.parquet")
        table = format_table(report, totals)
        (work / "report.txt").write_text(table + "\n", encoding="utf-8")
        dump_resolved(cfg, work / "config.yaml")
        m = stage.manifest(work, counts, tokenizer_fingerprint=tok_fp, report=str(stage.out_dir / "report.txt"),
                           tokenizer=getattr(tok, "name_or_path", type(tok).__name__), token_cache=cache.stats())
    log.info("mix: target vs achieved (tokens)\n%s", table)
    short = {c: r.shortfall_tokens for c, r in report.items() if r.shortfall_tokens}
    if short:
        log.warning("mix: categories short of their target (up-sampling is capped at max_repeat=%g): %s",
                    cfg.mix.max_repeat, short)
    return m


# ------------------------------------------------------------------------------- entry points
@task(name="mix")
def mix(cfg_dict: dict) -> dict:
    with dask_executor() as ex:  # on a Dask worker (DaskTaskRunner): count tokens across the cluster
        return run_mix(config_from_dict(cfg_dict), executor=ex)


@clean_errors
def main(argv: list[str] | None = None) -> None:
    cfg, _ = stage_args("Mix the training split to the configured category ratios by tokens.", argv)
    m = run_mix(cfg)
    t = m["counts"]["total"]
    print(f"mix: {t['selected_tokens']:,} of {t['target_tokens']:,} target tokens (budget from {t['budget_from']}), "
          f"shortfall {t['shortfall_tokens']:,}\n{Path(m['report']).read_text(encoding='utf-8')}")


if __name__ == "__main__":
    main()
