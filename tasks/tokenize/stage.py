from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tasks.core._prefect import task
from tasks.core.cli import clean_errors, stage_args
from tasks.core.config import CATEGORIES, PipelineConfig, config_from_dict
from tasks.core.manifest import Stage, require_manifest
from tasks.core.textio import Progress, dask_executor, iter_batches
from tasks.tokenize.cache import (
    KEY_BYTES,
    CacheScope,
    TokenCache,
    encode_job,
    keys_numpy,
    ordered_encode,
    register_encoder,
    text_keys,
    tokenizer_ref,
)
from tasks.tokenize.format import id_dtype, tokenizer_dir_name
from tasks.tokenize.pack import Packer, ShardWriter, ShuffleBuckets

log = logging.getLogger(__name__)




# ------------------------------------------------------------------------------ reading the inputs
QUARANTINE_SCHEMA = pa.schema([("split", pa.string()), ("category", pa.string()), ("file", pa.string()),
                               ("row", pa.int64()), ("doc_id", pa.string()), ("reason", pa.string())])


def _relative(path: Path) -> str:
    """``<split|mix>/.../<category>.parquet``: the path under the data root, so outputs do not depend on where it lives."""
    parts = Path(path).parts
    return str(Path(*parts[-3:])) if len(parts) >= 3 else str(path)


class Quarantine:
    """Rows that cannot be tokenized (null/empty text, an unknown category file): kept with file and
    row so ``documents in = packed + quarantined`` always holds."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def add(self, split: str, category: str, file: Path, row: int, doc_id: Any, reason: str) -> None:
        if len(self.rows) < 20:
            log.warning("tokenize: quarantined %s row %d (%s): %s", file, row, doc_id, reason)
        self.rows.append({"split": split, "category": category, "file": _relative(file), "row": row,
                          "doc_id": None if doc_id is None else str(doc_id), "reason": reason})

    def write(self, path: Path) -> None:
        pq.write_table(pa.Table.from_pylist(self.rows, schema=QUARANTINE_SCHEMA), path)


def _valid_texts(batch: pa.RecordBatch, row0: int, split: str, cat: str, path: Path, q: Quarantine) -> tuple[list[str], list[int]]:
    """The batch's usable texts and their row indices; the rest is quarantined (named by file and row)."""
    texts = batch.column("text").to_pylist()
    ids = batch.column("doc_id").to_pylist() if "doc_id" in batch.schema.names else [None] * len(texts)
    keep, idx = [], []
    for i, t in enumerate(texts):
        if not isinstance(t, str) or not t.strip():
            q.add(split, cat, path, row0 + i, ids[i], "null text" if t is None else "empty text")
        else:
            keep.append(t)
            idx.append(i)
    return keep, idx


def _train_batches(mix_dir: Path, batch_docs: int, q: Quarantine,
                   seen: dict[str, int] | None = None) -> Iterator[tuple[int, np.ndarray, list[str]]]:
    """(category id, cache keys, texts) batches of the training stream, streamed from the mix files
    (the keys are mix's ``text_hash`` column, or computed here for a file without it).

    Every selected document is emitted ``repeat`` times, the copies in separate passes over the files
    so they land far apart; within a pass the categories interleave in proportion to their sizes (the
    category that is furthest behind goes next), so every part of the stream carries every category.
    Only one record batch per category is in memory."""
    files = {cat: mix_dir / f"{cat}.parquet" for cat in CATEGORIES if (mix_dir / f"{cat}.parquet").is_file()}
    for p in sorted(mix_dir.glob("*.parquet")):
        if p.stem not in files:
            for row0, b in _numbered(iter_batches(p, ["doc_id"], batch_docs)):
                for i, d in enumerate(b.column("doc_id").to_pylist()):
                    q.add("train", p.stem, p, row0 + i, d, "unknown category")
                if seen is not None:
                    seen["in"] += b.num_rows
    sizes = {c: pq.ParquetFile(p).metadata.num_rows for c, p in files.items()}
    hashed = {c: _has_text_hash(p) for c, p in files.items()}
    max_rep = max((int(pc.max(pq.read_table(p, columns=["repeat"]).column("repeat")).as_py() or 1)
                   for p in files.values()), default=0)
    for rep in range(max_rep):
        its = {c: _numbered(iter_batches(p, ["doc_id", "text", "repeat"] + ["text_hash"] * hashed[c], batch_docs))
               for c, p in files.items()}
        done = dict.fromkeys(files, 0)
        while its:
            cat = min(its, key=lambda c: (done[c] / max(sizes[c], 1), CATEGORIES.index(c)))
            nxt = next(its[cat], None)
            if nxt is None:
                del its[cat]
                continue
            row0, b = nxt
            done[cat] += b.num_rows
            reps = b.column("repeat").to_numpy(zero_copy_only=False)
            sel = np.flatnonzero(reps > rep)
            if not len(sel):
                continue
            b = b.take(pa.array(sel))
            # quarantine only once (in the first pass), not once per copy
            texts, idx = _valid_texts(b, row0, "train", cat, files[cat], q if rep == 0 else Quarantine())
            if rep == 0 and seen is not None:  # distinct documents: each counted in its first copy only
                seen["in"] += b.num_rows
                seen["packed"] += len(texts)
            if texts:
                keys = keys_numpy(b.column("text_hash").take(pa.array(idx))) if hashed[cat] else text_keys(texts)
                yield CATEGORIES.index(cat), keys, texts


def _has_text_hash(path: Path) -> bool:
    schema = pq.ParquetFile(path).schema_arrow
    return "text_hash" in schema.names and schema.field("text_hash").type == pa.binary(KEY_BYTES)


def _numbered(batches: Iterable[pa.RecordBatch]) -> Iterator[tuple[int, pa.RecordBatch]]:
    row0 = 0
    for b in batches:
        yield row0, b
        row0 += b.num_rows


def _expected_rows(mix_m: dict[str, Any], seq_len: int) -> int:
    """Packed training rows the mix's token count implies (packing is dense: only the last row pads)."""
    tokens = int(mix_m.get("counts", {}).get("total", {}).get("selected_tokens", 0) or 0)
    return max(1, math.ceil(tokens / seq_len))


# the writer side only: editing the training reader (loader.py) re-runs no data stage
CODE_FILES = ("tasks/tokenize/stage.py", "tasks/tokenize/pack.py", "tasks/tokenize/cache.py", "tasks/tokenize/format.py",
              "tasks/core/textio.py")


def run_tokenize(cfg: PipelineConfig, tokenizer=None, workers: int | None = None, executor=None) -> dict[str, Any]:
    """Tokenize and pack ``mix/train`` and ``split/eval`` into ``tokenized/<fp>/``; returns the manifest.

    ``workers`` (default ``tokenize.workers``) local processes, or ``executor`` (a Dask client or any
    object with ``submit``) encode the batches; the output is the same byte for byte either way."""
    from tasks.core.model import model_tokenizer, tokenizer_fingerprint

    root = cfg.root
    mix_m = require_manifest(root / "mix", "mix")
    split_m = require_manifest(root / "split", "split")
    tok = tokenizer or model_tokenizer(cfg.model, root / "models")
    tok_fp = tokenizer_fingerprint(tok)
    out_dir = root / "tokenized" / tokenizer_dir_name(tok_fp)
    tc = cfg.tokenize
    # workers/executor and the token cache change how, not what: they are not part of the fingerprint
    stage = Stage(
        "tokenize",
        out_dir,
        {**cfg.section("tokenize"), "workers": None, "token_cache": None, "cache_segment_tokens": None, "seed": cfg.seed},
        {"mix": mix_m["fingerprint"], "split": split_m["fingerprint"], "tokenizer": tok_fp},
        code=CODE_FILES,
    )
    if done := stage.up_to_date():
        log.info("tokenize: up to date (%s)", out_dir)
        return done
    workers = tc.workers if workers is None else workers
    ref = tokenizer_ref(tok, tok_fp, root / "models" / "tokenizers")
    if workers <= 1 and executor is None:
        register_encoder(ref, tok)
    vocab = len(tok)
    eos = tok.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    counts: dict[str, Any] = {"train": {}, "eval": {}}
    q = Quarantine()
    cache = TokenCache(root, tok_fp, vocab, tc.cache_segment_tokens, tc.token_cache)

    def resolved(batches: Iterable[tuple[Any, CacheScope, np.ndarray, list[str]]]):
        """(context, ids per text) in input order: cached ids read back (memory-mapped), the rest
        encoded here or in workers and added to the cache."""
        def misses():
            for ctx, scope, keys, texts in batches:
                seg, row = scope.lookup(keys)
                miss = np.flatnonzero(seg < 0)
                yield (ctx, scope, keys, seg, row, miss), [texts[i] for i in miss]

        for (ctx, scope, keys, seg, row, miss), enc in ordered_encode(encode_job, ref, misses(), workers, executor):
            out = [scope.ids(s, r) if s >= 0 else None for s, r in zip(seg.tolist(), row.tolist())]
            if len(miss):
                scope.add(keys[miss], enc)
                for i, ids in zip(miss.tolist(), enc):
                    out[i] = ids
            yield ctx, out

    t0 = time.time()
    seen = {"train": {"in": 0, "packed": 0}, "eval": {"in": 0, "packed": 0}}
    with stage.building() as work:
        # training stream: mixed categories, packed, then rows shuffled globally
        w = ShardWriter(work / "train", tc.seq_len, vocab, tc.rows_per_shard)
        sink = w
        if tc.shuffle:
            n_buckets = math.ceil(_expected_rows(mix_m, tc.seq_len) / tc.shuffle_bucket_rows)
            sink = ShuffleBuckets(work / "_shuffle", w, n_buckets, cfg.seed, tc.shuffle_bucket_rows)
        packer = Packer(sink, eos, pad)
        per_cat = dict.fromkeys(CATEGORIES, 0)
        docs_per_cat = dict.fromkeys(CATEGORIES, 0)
        prog = Progress(log, "tokenize train", unit="tokens")
        train = ((cat_id, cache.scope("train", CATEGORIES[cat_id]), keys, texts)
                 for cat_id, keys, texts in _train_batches(root / "mix" / "train", tc.batch_docs, q, seen["train"]))
        for cat_id, ids_list in resolved(train):
            n0 = packer.tokens
            for ids in ids_list:
                packer.add(ids, cat_id)
            per_cat[CATEGORIES[cat_id]] += packer.tokens - n0
            docs_per_cat[CATEGORIES[cat_id]] += len(ids_list)
            prog.update(packer.tokens - n0)
        packer.close()
        counts["train"] = {"rows": w.rows, "shards": len(w.shards), "documents": packer.docs,
                           "tokens": packer.tokens, "tokens_per_category": per_cat,
                           "documents_per_category": docs_per_cat}
        log.info("tokenize: train %d docs -> %d tokens -> %d rows of %d (%.0f tok/s)",
                 packer.docs, packer.tokens, w.rows, tc.seq_len, packer.tokens / max(time.time() - t0, 1e-9))
        if tc.token_cache and (n := sum(s.stats["encoded"] for (sp, _), s in cache.scopes.items() if sp == "train")):
            log.warning("tokenize: %d training document(s) were not in the token cache (mix ran without it, or a "
                        "segment was lost or corrupt): encoded now and cached", n)
        # held-out streams: one per category, never mixed, in file order (no shuffle needed: eval reads them all)
        for cat_id, cat in enumerate(CATEGORIES):
            p = root / "split" / "eval" / f"{cat}.parquet"
            if not p.is_file():
                continue
            ew = ShardWriter(work / "eval" / cat, tc.seq_len, vocab, tc.rows_per_shard)
            ep = Packer(ew, eos, pad)
            scope, live = cache.scope("eval", cat), []

            def eval_batches(p=p, cat=cat, scope=scope, live=live):
                for row0, b in _numbered(iter_batches(p, ["doc_id", "text"], tc.batch_docs)):
                    texts, _ = _valid_texts(b, row0, "eval", cat, p, q)
                    seen["eval"]["in"] += b.num_rows
                    seen["eval"]["packed"] += len(texts)
                    if texts:
                        live.append(text_keys(texts))
                        yield None, scope, live[-1], texts

            for _, ids_list in resolved(eval_batches()):
                for ids in ids_list:
                    ep.add(ids, cat_id)
            ep.close()
            scope.gc(np.concatenate(live) if live else np.zeros((0, KEY_BYTES), np.uint8))
            if ew.rows:
                counts["eval"][cat] = {"rows": ew.rows, "documents": ep.docs, "tokens": ep.tokens}
        cache.close()
        cache.prune("eval", [c for c in CATEGORIES if (root / "split" / "eval" / f"{c}.parquet").is_file()])
        q.write(work / "quarantine.parquet")
        counts["quarantined"] = len(q.rows)
        # distinct documents in (mix rows, eval rows) = packed + quarantined
        counts["documents_in"] = seen["train"]["in"] + seen["eval"]["in"]
        counts["documents_packed"] = seen["train"]["packed"] + seen["eval"]["packed"]
        if counts["documents_in"] != counts["documents_packed"] + len(q.rows):
            raise AssertionError(f"tokenize: documents_in {counts['documents_in']} != packed "
                                 f"{counts['documents_packed']} + quarantined {len(q.rows)}")
        counts["quarantined_by_reason"] = {r: sum(1 for x in q.rows if x["reason"] == r) for r in sorted({x["reason"] for x in q.rows})}
        if q.rows:
            log.warning("tokenize: %d row(s) quarantined %s (see %s)", len(q.rows), counts["quarantined_by_reason"],
                        out_dir / "quarantine.parquet")
        return stage.manifest(
            work,
            counts,
            tokenizer_fingerprint=tok_fp,
            tokenizer=str(getattr(tok, "name_or_path", "") or getattr(tok, "_tokenizer_path", "")),
            seq_len=tc.seq_len,
            vocab_size=vocab,
            id_dtype=str(id_dtype(vocab)),
            eos_id=eos,
            pad_id=pad,
            categories=list(CATEGORIES),
            token_cache=cache.stats(),
        )


# ------------------------------------------------------------------------------- entry points
@task(name="tokenize")
def tokenize(cfg_dict: dict) -> dict:
    with dask_executor() as ex:  # on a Dask worker (DaskTaskRunner): fan the batches out over the cluster
        return run_tokenize(config_from_dict(cfg_dict), executor=ex)


@clean_errors
def main(argv: list[str] | None = None) -> None:
    cfg, _ = stage_args("Tokenize and pack the mixed corpus into Arrow shards.", argv)
    m = run_tokenize(cfg)
    print(f"tokenize: {m['counts']['train']['rows']} training rows, eval categories {list(m['counts']['eval'])}")
