from __future__ import annotations

import logging
import math
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tasks.clean.dedup import ExternalDedup, Signer, repeated_keys
from tasks.clean.index import (
    INDEX,
    FirstSeen,
    PriorIndex,
    Reuse,
    _add_prior,
    _concat,
    _IndexWriter,
    _joint_key,
    _reject_key,
    _reusable,
    h16,
    input_key,
    member,
)
from tasks.clean.rules import (
    BOILERPLATE_MIN_LINE_CHARS,
    CODE,
    _boilerplate_candidate,
    _line_key,
    clean_text,
    exact_key,
    normalize_text,
    quality_reject,
    scrub_pii,
    split_parts,
)
from tasks.core._prefect import task
from tasks.core.cli import clean_errors, stage_args
from tasks.core.config import CATEGORIES, CleanConfig, PipelineConfig, config_from_dict, dump_resolved
from tasks.core.manifest import Stage, code_fingerprint, fingerprint, require_manifest
from tasks.core.textio import (
    CategoryWriters,
    Progress,
    category_files,
    dask_executor,
    iter_batches,
    num_rows,
    ordered_map,
)

log = logging.getLogger("tasks.clean")  # stable name also under python -m

_SIGNERS: dict[tuple[int, int, int], Signer] = {}


# Bumped when the cleaning rules change, so existing outputs are rebuilt.
RULES_VERSION = 4  # 4: numpy MinHash signatures (uint32), external dedup


# Input columns (the extract stage's contract); only doc_id, text and category are required.
COLUMNS = ("doc_id", "url", "final_url", "fetched_at", "sha256", "source_id", "category", "license", "title", "text", "fields")


REQUIRED = ("doc_id", "text")


REJECT_SCHEMA = pa.schema(
    [("doc_id", pa.string()), ("url", pa.string()), ("category", pa.string()),
     ("reason", pa.string()), ("detail", pa.string()), ("text", pa.string())]
)


STAGING = "_staging"


INPUT_KEY_COL = "_input_key"  # staging only: each survivor's input key, for its index row in pass 2


DEDUP_MEMORY_BYTES = 256 << 20  # what one dedup partition may take while it is sorted


OUT_CHUNK_BYTES = 16 << 20  # about the most bytes one output table holds (split documents make many rows)


# rows per batch read, cleaned and staged: a batch's texts, their cleaned copies, the Arrow tables and
# the writers' buffers all scale with it (measured peak RSS at 2k -> 20k docs: 1024 rows 341 -> 410 MB,
# 256 rows 301 -> 321 MB, at the same speed)
BATCH_ROWS = 256


# -------------------------------------------------------------------------------- the stage
class _Rejects:
    """Buffered writer for rejects.parquet (always written, possibly empty). The buffer is bounded in
    rows and in text bytes (rejects carry their text, which can be long)."""

    def __init__(self, path: Path, flush_rows: int = 1024, flush_chars: int = 8 << 20):
        self.path, self.flush_rows, self.flush_chars = path, flush_rows, flush_chars
        self.rows: list[dict[str, Any]] = []
        self._chars = 0
        self.writer = pq.ParquetWriter(path, REJECT_SCHEMA)
        self.by_reason: Counter[str] = Counter()
        self._logged: Counter[str] = Counter()

    def add(self, doc_id: Any, url: Any, category: Any, reason: str, detail: str, text: Any, where: str | None = None) -> None:
        self.by_reason[reason] += 1
        if where is not None and self._logged[reason] < 20:  # bad input: say where, but do not flood the log
            self._logged[reason] += 1
            log.warning("clean: rejected (%s): %s", reason, detail)
        self.rows.append(
            {"doc_id": None if doc_id is None else str(doc_id), "url": None if url is None else str(url),
             "category": None if category is None else str(category), "reason": reason, "detail": detail,
             "text": text if isinstance(text, str) else None}
        )
        self._chars += len(text) if isinstance(text, str) else 0
        if len(self.rows) >= self.flush_rows or self._chars >= self.flush_chars:
            self.flush()

    def flush(self) -> None:
        if self.rows:
            self.writer.write_table(pa.Table.from_pylist(self.rows, schema=REJECT_SCHEMA))
            self.rows.clear()
            self._chars = 0

    def close(self) -> None:
        self.flush()
        self.writer.close()


def _conform(batch: pa.RecordBatch, path: Path, warned: set[str]) -> pa.Table:
    """The contract's columns in contract order; missing optional columns become nulls."""
    t = pa.Table.from_batches([batch])
    extra = [c for c in t.column_names if c not in COLUMNS]
    if extra and str(path) not in warned:
        warned.add(str(path))
        log.warning("clean: %s: ignoring columns not in the extract contract: %s", path, extra)
    cols = [t.column(c) if c in t.column_names else pa.nulls(t.num_rows, pa.string()) for c in COLUMNS]
    return pa.Table.from_arrays(cols, names=list(COLUMNS))


def _sample_boilerplate(path: Path, c: CleanConfig, code: bool) -> dict[str, frozenset[str]]:
    """Per source: the (whitespace-collapsed) lines found in >= boilerplate_min_fraction of its
    (sampled) documents."""
    cols = [x for x in ("source_id", "text") if x in pq.ParquetFile(path).schema_arrow.names]
    # counted by 8-byte key; a line's text is kept only once a second document has it (most lines
    # are unique content, and the sample can be 5,000 documents per source)
    counts: dict[str, Counter[bytes]] = defaultdict(Counter)
    texts: dict[str, dict[bytes, str]] = defaultdict(dict)
    docs: Counter[str] = Counter()
    for batch in iter_batches(path, cols, batch_rows=BATCH_ROWS):
        d = batch.to_pydict()
        for src, text in zip(d.get("source_id") or [None] * batch.num_rows, d["text"]):
            src = src or ""
            if not isinstance(text, str) or docs[src] >= c.boilerplate_sample_docs:
                continue
            docs[src] += 1
            lines = normalize_text(text, c.unicode_form, code).split("\n")
            cands = {k for ln in lines if (k := _boilerplate_candidate(ln, code)) is not None}
            ctr = counts[src]
            for line in cands:
                key = _line_key(line)
                ctr[key] += 1
                if ctr[key] == 2:
                    texts[src][key] = line
        if docs and all(n >= c.boilerplate_sample_docs for n in docs.values()):
            break
    out = {}
    for src, ctr in counts.items():
        need = max(c.boilerplate_min_docs, math.ceil(c.boilerplate_min_fraction * docs[src]))
        out[src] = frozenset(texts[src][k] for k, n in ctr.items() if n >= need)
        if out[src]:
            log.info("clean: %s source %r: %d boilerplate line(s) over %d docs", path.name, src, len(out[src]), docs[src])
    return out


def _clean_batch(job: tuple) -> list[tuple[str, dict[str, int], tuple[str, str] | None, bytes | None, np.ndarray | None]]:
    """Worker: clean, score and sign one batch of validated texts of one category. Pure (runs in a
    subprocess): (cleaned, stats, reject-or-None, exact key, MinHash signature) per text."""
    texts, category, sources, boilerplate, cdict, seed = job
    c = CleanConfig(**cdict)
    sk = (c.num_perm, c.shingle_words, seed)
    signer = _SIGNERS.get(sk) or _SIGNERS.setdefault(sk, Signer(*sk))
    out = []
    for text, src in zip(texts, sources):
        cleaned, stats = clean_text(text, category, boilerplate.get(src, frozenset()), c)
        q = quality_reject(cleaned, category, c)
        if q is not None:
            out.append((cleaned, stats, q, None, None))
        else:
            out.append((cleaned, stats, None, exact_key(cleaned), signer.signature(cleaned)))
    return out


CODE_FILES = ("tasks/clean/stage.py", "tasks/clean/rules.py", "tasks/clean/index.py", "tasks/clean/dedup.py",
              "tasks/core/textio.py")


def _stage_config(cfg: PipelineConfig) -> dict[str, Any]:
    rules = {"version": RULES_VERSION, "boilerplate_min_line_chars": BOILERPLATE_MIN_LINE_CHARS}
    # workers and incremental change how the output is made, not what it is
    section = {k: v for k, v in cfg.section("clean").items() if k not in ("workers", "incremental")}
    return {"clean": section, "seed": cfg.seed, "rules": rules}


def stage_for(cfg: PipelineConfig) -> Stage:
    extracted = require_manifest(cfg.root / "extracted", "extract")
    return Stage("clean", cfg.root / "clean", _stage_config(cfg), {"extracted": extracted["fingerprint"]},
                 code=CODE_FILES)


def _index_key(cfg: PipelineConfig) -> str:
    """What the stored verdicts depend on besides the documents: config, seed, rules, code."""
    return fingerprint({"config": _stage_config(cfg), "code": code_fingerprint(CODE_FILES)})



def run_clean(cfg: PipelineConfig, workers: int | None = None, executor=None,
              dedup_partitions: int | None = None) -> dict[str, Any]:
    """Clean + dedup ``<root>/extracted`` into ``<root>/clean``; returns the manifest.

    ``workers`` (default ``clean.workers``) > 1 cleans and signs batches in that many processes,
    ``executor`` (a Dask client) on a cluster; the output is identical either way.
    ``dedup_partitions`` forces the external dedup's partition count (tests; the default fits
    ``DEDUP_MEMORY_BYTES``).
    """
    c = cfg.clean
    workers = c.workers if workers is None else workers
    stage = stage_for(cfg)
    if (m := stage.up_to_date()) is not None:
        log.info("clean: up to date (%s)", stage.out_dir)
        return m
    in_dir = cfg.root / "extracted"
    files = category_files(in_dir, include_unknown=True)
    if not files:
        log.warning("clean: no category files in %s", in_dir)
    index_key = _index_key(cfg)
    prior = PriorIndex.load(stage.out_dir, index_key) if c.incremental else PriorIndex()
    for path in files.values():  # fail early, naming the file
        missing = [x for x in REQUIRED if x not in _schema_names(path)]
        if missing:
            raise ValueError(f"{path}: missing required column(s) {missing}; cannot clean this file")
    boilers = {cat: _sample_boilerplate(path, c, cat in CODE) if cat in CATEGORIES else {} for cat, path in files.items()}

    per_cat: dict[str, Counter[str]] = defaultdict(Counter)
    totals: Counter[str] = Counter()
    warned: set[str] = set()
    n_input = sum(num_rows(p) for p in files.values())

    with stage.building() as work:
        # ---- doc ids that occur more than once (the only ones that need a seen-before check)
        def id_chunks():
            for path in files.values():
                for batch in iter_batches(path, ["doc_id"]):
                    ids = batch.column(0).to_pylist()
                    yield h16([x for x in ids if isinstance(x, str)])

        repeated = repeated_keys(id_chunks(), work / "_ids", n_input, DEDUP_MEMORY_BYTES)

        # ---- pass 0 (only with an index): which documents can keep their stored verdict
        reuse = Reuse()
        if prior.n:
            current, first = [], FirstSeen(repeated)
            for cat, path in files.items():
                cols = [x for x in ("doc_id", "text", "source_id") if x in _schema_names(path)]
                for batch in iter_batches(path, cols, batch_rows=BATCH_ROWS):
                    d = batch.to_pydict()
                    keys, rep_ = [], first.candidates(d["doc_id"])
                    for i, (doc_id, text) in enumerate(zip(d["doc_id"], d["text"])):
                        if isinstance(doc_id, str) and isinstance(text, str) and first.take(rep_, i):
                            src = (d.get("source_id") or [None] * batch.num_rows)[i] or ""
                            keys.append(_joint_key(doc_id, input_key(text, boilers[cat].get(src, frozenset())), cat))
                    current.append(np.frombuffer(b"".join(keys), "S16"))
            current = _concat(current)
            reuse = _reusable(prior, current)
            del current
            log.info("clean: incremental: %d of %d indexed documents unchanged; cleaning the rest", len(reuse), prior.n)
        max_docs = n_input + reuse.prior_kept

        rejects = _Rejects(work / "rejects.parquet")
        staging = work / STAGING
        index = _IndexWriter(work / INDEX, flush_rows=BATCH_ROWS)
        dd = ExternalDedup(work / "_dedup", c.num_perm, c.near_dup_threshold, CATEGORIES, max_docs,
                           memory_bytes=DEDUP_MEMORY_BYTES, partitions=dedup_partitions)
        # ---- earlier runs' kept documents enter the dedup first, in the order they were kept; every
        # reused entry is copied into the new index as it was
        n_prior, seq = 0, 0
        reps = np.unique(reuse.near_rep)
        rep_arrival = np.full(len(reps), -1, np.int64)
        buf: list[dict[str, Any]] = []
        for batch in prior.batches():
            mask = reuse.contains(h16(batch.column("doc_id").to_pylist()))
            if not mask.any():
                continue
            for r in batch.filter(pa.array(mask)).to_pylist():
                index.add(r)
                if r["status"] != "kept":
                    per_cat[r["category"]]["rejected"] += 1
                    continue
                assert r["seq"] >= seq, f"clean: {prior.path}: kept rows out of order"
                seq = r["seq"] + 1
                if len(reps) and member(reps, h16([r["doc_id"]]))[0]:
                    rep_arrival[np.searchsorted(reps, h16([r["doc_id"]]))] = n_prior
                n_prior += 1
                buf.append(r)
                if len(buf) >= BATCH_ROWS:
                    _add_prior(dd, buf)
        _add_prior(dd, buf)
        if len(reuse.near_rep):
            arrivals = rep_arrival[np.searchsorted(reps, reuse.near_rep)]
            assert (arrivals >= 0).all(), "clean: a reused near-duplicate's kept twin is not reused"
            dd.add_prior_clusters(arrivals, reuse.near_cat)
        # ---- pass 1: validate (here: needs the global doc_id set), then clean, score and sign each
        # batch of new or changed documents (in worker processes or on Dask workers; results come
        # back in order), stage survivors
        def prepared():
            for file_cat, path in files.items():
                boiler = boilers[file_cat]
                prog = Progress(log, f"clean {file_cat}", num_rows(path))
                rel = _relative(path, cfg.root)  # the data root's own path would make outputs depend on where it lives
                row0 = 0
                for batch in iter_batches(path, batch_rows=BATCH_ROWS):
                    t = _conform(batch, path, warned)
                    d = t.to_pydict()
                    h = h16(d["doc_id"])
                    reused, rep_ = reuse.contains(h), seen.candidates(d["doc_id"], h)
                    cand: list[int] = []
                    cand_keys: list[bytes] = []
                    for i in range(t.num_rows):
                        where = f"{rel} row {row0 + i}"
                        doc_id, text = d["doc_id"][i], d["text"][i]
                        cat = d["category"][i] or file_cat  # a null category means "the file's"
                        per_cat[file_cat]["documents_in"] += 1
                        verdict: tuple[str, str] | None = None
                        if not isinstance(doc_id, str) or not doc_id.strip():
                            verdict = ("missing_doc_id", f"{where}: doc_id is {doc_id!r}")
                        elif cat not in CATEGORIES:
                            verdict = ("unknown_category", f"{where}: category {cat!r}")
                        elif cat != file_cat:
                            verdict = ("category_mismatch", f"{where}: row says {cat!r}, file is {file_cat!r}")
                        elif not isinstance(text, str) or not text.strip():
                            verdict = ("empty", f"{where}: text is {'null' if text is None else 'empty'}")
                        elif not seen.take(rep_, i):
                            verdict = ("duplicate_doc_id", f"{where}: doc_id {doc_id!r} seen before")
                        if verdict is not None:
                            if c.scrub_pii and isinstance(text, str):  # quarantine is no place for PII either
                                text = scrub_pii(text)[0]
                            rejects.add(doc_id, d["url"][i], cat, *verdict, text, where=where)
                            per_cat[file_cat]["rejected"] += 1
                        elif reused[i]:
                            per_cat[file_cat]["reused"] += 1
                        else:
                            cand.append(i)
                            cand_keys.append(input_key(text, boiler.get(d["source_id"][i] or "", frozenset())))
                    srcs = [d["source_id"][i] or "" for i in cand]
                    job = ([d["text"][i] for i in cand], file_cat, srcs,
                           {s_: boiler[s_] for s_ in set(srcs) if s_ in boiler}, c.model_dump(), cfg.seed)
                    yield (file_cat, t, d, cand, cand_keys), job
                    row0 += t.num_rows
                    prog.update(t.num_rows)

        seen = FirstSeen(repeated)  # the first valid row of a doc id wins
        with CategoryWriters(staging) as stage_out:
            for (file_cat, t, d, cand, cand_keys), results in ordered_map(_clean_batch, prepared(), workers, executor=executor):
                keep_idx: list[int] = []
                keep_keys: list[bytes] = []
                texts: list[str] = []
                keys: list[bytes] = []
                sigs: list[np.ndarray] = []
                for i, ikey, (cleaned, stats, q, key, sig) in zip(cand, cand_keys, results):
                    totals.update(stats)
                    per_cat[file_cat]["cleaned"] += 1
                    if q is not None:
                        rejects.add(d["doc_id"][i], d["url"][i], file_cat, *q, cleaned)
                        per_cat[file_cat]["rejected"] += 1
                        index.add({"doc_id": d["doc_id"][i], "input_key": ikey,
                                   "category": file_cat, "status": q[0], "dup_of": None, "exact_key": None,
                                   "sig": None, "seq": None})
                        continue
                    keep_idx.append(i)
                    keep_keys.append(ikey)
                    texts.append(cleaned)
                    keys.append(key)
                    sigs.append(sig)
                if keep_idx:
                    dd.add([d["doc_id"][i] for i in keep_idx], [file_cat] * len(keep_idx), keys, np.stack(sigs))
                    out = t.take(pa.array(keep_idx, pa.int64()))
                    out = out.set_column(COLUMNS.index("text"), "text", pa.array(texts, pa.string()))
                    out = out.set_column(COLUMNS.index("category"), "category", pa.array([file_cat] * len(keep_idx), pa.string()))
                    # the input key rides along to pass 2 (where the index row is written), not in memory
                    stage_out.write(file_cat, out.append_column(INPUT_KEY_COL, pa.array(keep_keys, pa.binary(16))))

        # ---- dedup over the whole corpus, on disk (see tasks/clean/dedup.py)
        dstats = dd.run()
        log.info("clean: dedup of %d documents in %d partition(s): %d exact and %d near duplicates, %d verified pairs",
                 dstats.documents, dstats.partitions, dstats.exact_removed, dstats.near_removed, dstats.candidate_pairs)

        # ---- pass 2: reused output copied from the previous run, then this run's verdicts applied,
        # long documents split, output written
        idx = n_prior  # arrival number in the dedup
        with CategoryWriters(work) as final:
            for cat in CATEGORIES:
                old = stage.out_dir / f"{cat}.parquet"
                if len(reuse.kept) and old.is_file():
                    last = None
                    for batch in iter_batches(old, batch_rows=BATCH_ROWS):
                        t = pa.Table.from_batches([batch])
                        mask = pa.array(member(reuse.kept, h16(t.column("dup_cluster").to_pylist())), pa.bool_())
                        t = t.filter(mask)
                        if t.num_rows:
                            final.write(cat, t)
                            per_cat[cat]["rows_out"] += t.num_rows
                            per_cat[cat]["chars_out"] += int(pc.sum(t.column("n_chars")).as_py() or 0)
                            for doc_id, cl in zip(t.column("doc_id").to_pylist(), t.column("dup_cluster").to_pylist()):
                                if cl != last:
                                    per_cat[cat]["kept"] += 1
                                    last = cl
                                if doc_id == f"{cl}-p0":
                                    per_cat[cat]["split_documents"] += 1
                sp = staging / f"{cat}.parquet"
                if not sp.is_file():
                    continue
                for batch in iter_batches(sp, batch_rows=BATCH_ROWS):
                    d = batch.to_pydict()
                    sigs_b, keys_b = dd.read_rows(idx, idx + batch.num_rows)
                    take: list[int] = []
                    out_ids: list[str] = []
                    out_texts: list[str] = []
                    clusters_col: list[str] = []
                    for i in range(batch.num_rows):
                        doc_id, text = d["doc_id"][i], d["text"][i]
                        verdict = dd.verdict(idx)
                        # the index for the next run: this run's documents as decided now
                        index.add({"doc_id": doc_id, "input_key": d[INPUT_KEY_COL][i], "category": cat,
                                   "status": "kept" if verdict is None else verdict[0],
                                   "dup_of": None if verdict is None else verdict[1].split(" ")[0],
                                   "exact_key": keys_b[i].tobytes() if verdict is None else None,
                                   "sig": sigs_b[i].tobytes() if verdict is None else None,
                                   "seq": seq if verdict is None else None})
                        if verdict is not None:
                            rejects.add(doc_id, d["url"][i], cat, *verdict, text)
                            per_cat[cat]["rejected"] += 1
                            per_cat[cat]["exact_dup_removed" if verdict[0] == "exact_duplicate" else "near_dup_removed"] += 1
                        else:
                            seq += 1
                            parts = split_parts(text, c.max_chars)
                            per_cat[cat]["kept"] += 1
                            if len(parts) > 1:
                                per_cat[cat]["split_documents"] += 1
                            for p_, part in enumerate(parts):
                                take.append(i)
                                out_ids.append(doc_id if len(parts) == 1 else f"{doc_id}-p{p_}")
                                out_texts.append(part)
                                clusters_col.append(doc_id)
                        idx += 1
                    if take:
                        _write_parts(final, cat, pa.Table.from_batches([batch]).drop_columns([INPUT_KEY_COL]),
                                     take, out_ids, out_texts, clusters_col)
                        per_cat[cat]["rows_out"] += len(take)
                        per_cat[cat]["chars_out"] += sum(len(x) for x in out_texts)
            written = final.keys
        assert idx == dstats.documents, f"clean: staging has {idx - n_prior} rows, pass 1 kept {dstats.documents - n_prior}"
        dd.close()
        # reused rejects: copied from the previous rejects file (validation rejects were recomputed above)
        old_rej = stage.out_dir / "rejects.parquet"
        if len(reuse.rejects) and old_rej.is_file():
            for batch in iter_batches(old_rej, batch_rows=BATCH_ROWS):
                rows = batch.to_pylist()
                rk = np.frombuffer(b"".join(_reject_key(r["doc_id"], r["reason"]) if isinstance(r["doc_id"], str) else bytes(16)
                                            for r in rows), "S16")
                for r, hit in zip(rows, member(reuse.rejects, rk).tolist()):
                    if hit and isinstance(r["doc_id"], str):
                        rejects.add(r["doc_id"], r["url"], r["category"], r["reason"], r["detail"], r["text"])
                        if r["reason"] == "exact_duplicate":
                            per_cat[r["category"]]["exact_dup_removed"] += 1
                        elif r["reason"] == "near_duplicate":
                            per_cat[r["category"]]["near_dup_removed"] += 1
        for cat, n in dstats.clusters_by_category.items():
            per_cat[cat]["near_dup_clusters"] = n
        rejects.close()
        index.close()
        _remove_tree(staging)

        # ---- counts: every input row is kept or rejected
        fields = ("documents_in", "kept", "rejected", "reused", "cleaned", "rows_out", "chars_out", "split_documents",
                  "exact_dup_removed", "near_dup_removed", "near_dup_clusters")
        by_cat = {k: {f: v.get(f, 0) for f in fields} for k, v in per_cat.items()}
        n_in = sum(v["documents_in"] for v in per_cat.values())
        n_kept = sum(v["kept"] for v in per_cat.values())
        n_rej = sum(rejects.by_reason.values())
        assert n_in == n_kept + n_rej, f"clean: documents_in={n_in} != kept={n_kept} + rejected={n_rej}"
        for k, v in by_cat.items():
            assert v.get("documents_in", 0) == v.get("kept", 0) + v.get("rejected", 0), f"clean: counts do not add up for {k}: {v}"
        counts = {
            "documents_in": n_in, "kept": n_kept, "rejected": n_rej,
            "reused": sum(v["reused"] for v in per_cat.values()),
            "cleaned": sum(v["cleaned"] for v in per_cat.values()),
            "rows_out": sum(v["rows_out"] for v in per_cat.values()),
            "split_documents": sum(v["split_documents"] for v in per_cat.values()),
            "rejects_by_reason": dict(sorted(rejects.by_reason.items())),
            "near_dup_clusters_removed": {k: v["near_dup_clusters"] for k, v in by_cat.items() if k in CATEGORIES},
            "by_category": by_cat, **dict(totals),
        }
        dump_resolved(cfg, work / "config.yaml")
        m = stage.manifest(work, counts, categories=written, index_key=index_key)
    log.info("clean: %d in, %d kept (%d rows), %d rejected %s; %d cleaned, %d reused from the index",
             n_in, n_kept, counts["rows_out"], n_rej, counts["rejects_by_reason"], counts["cleaned"], counts["reused"])
    return m


def _write_parts(final: CategoryWriters, cat: str, t: pa.Table, take: list[int], ids: list[str], texts: list[str],
                 clusters: list[str], max_bytes: int = OUT_CHUNK_BYTES) -> None:
    """Write the output rows (``take[j]`` is the input row of part ``j``) in chunks of about
    ``max_bytes``. A long document's parts each copy the other columns of its row, and one take of
    all of them overflowed a string array past 2 GiB (a 25 MB document split into 125 parts, text
    column included: ``ArrowInvalid: Take operation overflowed binary array capacity``); so the text
    is never taken (it is replaced by the parts) and each take copies a bounded number of bytes."""
    rest = t.drop_columns(["doc_id", "text"])
    row_bytes = np.zeros(t.num_rows, np.int64)  # bytes per input row of the columns each part copies
    for col in rest.columns:
        if pa.types.is_string(col.type) or pa.types.is_binary(col.type) or pa.types.is_large_string(col.type):
            row_bytes += pc.fill_null(pc.binary_length(col), 0).to_numpy(zero_copy_only=False).astype(np.int64)
    start, size = 0, 0
    for j in range(len(take) + 1):
        cost = 0 if j == len(take) else len(texts[j]) + int(row_bytes[take[j]])
        if j == len(take) or (j > start and size + cost > max_bytes):
            part = rest.take(pa.array(take[start:j], pa.int64()))
            cols = {"doc_id": pa.array(ids[start:j], pa.string()), "text": pa.array(texts[start:j], pa.string())}
            out = pa.Table.from_arrays([cols[n] if n in cols else part.column(n) for n in t.column_names],
                                       names=t.column_names)
            out = out.append_column("n_chars", pa.array([len(x) for x in texts[start:j]], pa.int64()))
            out = out.append_column("dup_cluster", pa.array(clusters[start:j], pa.string()))
            final.write(cat, out)
            start, size = j, 0
        size += cost


def _relative(path: Path, root: Path) -> str:
    try:
        return str(Path(path).relative_to(root))
    except ValueError:
        return str(path)


def _schema_names(path: Path) -> list[str]:
    try:
        return pq.ParquetFile(path).schema_arrow.names
    except Exception as e:  # noqa: BLE001 - re-raised with the file named
        raise ValueError(f"{path}: not a readable Parquet file ({e})") from e


def _remove_tree(p: Path) -> None:
    import shutil

    shutil.rmtree(p, ignore_errors=True)


# ------------------------------------------------------------------------------- entry points
@task(name="clean")
def clean(cfg_dict: dict, workers: int | None = None) -> dict:
    with dask_executor() as ex:  # on a Dask worker (DaskTaskRunner): clean batches across the cluster
        return run_clean(config_from_dict(cfg_dict), workers=workers, executor=ex)


@clean_errors
def main(argv: list[str] | None = None) -> None:
    cfg, a = stage_args("Clean and deduplicate the extracted corpus.", argv, extra=lambda ap: ap.add_argument(
        "--workers", type=int, default=None, help="processes for cleaning and MinHash (default clean.workers)"))
    m = run_clean(cfg, workers=a.workers)
    k = m["counts"]
    print(f"clean: {k['documents_in']} in, {k['kept']} kept, {k['rejected']} rejected {k['rejects_by_reason']}")
