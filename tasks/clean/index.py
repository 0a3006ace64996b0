"""The incremental index: per document its input key, verdict and signature, so a re-run only cleans
new or changed documents and checks them against the stored signatures."""

from __future__ import annotations

import functools
import hashlib
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tasks.clean.dedup import ExternalDedup
from tasks.clean.rules import _line_key
from tasks.core.config import CATEGORIES
from tasks.core.manifest import read_manifest
from tasks.core.textio import (
    iter_batches,
    num_rows,
)

log = logging.getLogger("tasks.clean")



INDEX = "index.parquet"


def input_key(text: str, boilerplate: frozenset[str]) -> bytes:
    """A document's cleaned text depends on its raw text and on its source's boilerplate lines."""
    h = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16)
    h.update(_boilerplate_digest(boilerplate))
    return h.digest()


@functools.lru_cache(maxsize=1024)
def _boilerplate_digest(boilerplate: frozenset[str]) -> bytes:
    return b"".join(sorted(_line_key(ln) for ln in boilerplate))


def h16(values: list[Any]) -> np.ndarray:
    """16-byte blake2b of each string as a numpy ``S16`` array (non-strings: all zero bytes, which
    callers never look up). The per-document sets of the stage are sorted arrays of these: 16 bytes
    per document instead of a Python object; at 128 bits a collision among 10^9 ids has odds ~10^-21."""
    return np.frombuffer(b"".join(hashlib.blake2b(v.encode("utf-8", "surrogatepass"), digest_size=16).digest()
                                  if isinstance(v, str) else bytes(16) for v in values), "S16")


def member(sorted_keys: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Mask of the entries of ``q`` found in ``sorted_keys``."""
    if len(sorted_keys) == 0 or len(q) == 0:
        return np.zeros(len(q), bool)
    i = np.minimum(np.searchsorted(sorted_keys, q), len(sorted_keys) - 1)
    return sorted_keys[i] == q


def _concat(chunks: list[np.ndarray], dtype: str = "S16") -> np.ndarray:
    return np.sort(np.concatenate(chunks)) if chunks else np.zeros(0, dtype)


def _joint_key(doc_id: str, key: bytes, category: str) -> bytes:
    """What a stored verdict depends on: (doc_id, input key, category), as one 16-byte hash."""
    b = doc_id.encode("utf-8", "surrogatepass")
    return hashlib.blake2b(len(b).to_bytes(8, "little") + b + key + category.encode(), digest_size=16).digest()


def _reject_key(doc_id: str, reason: str) -> bytes:
    b = doc_id.encode("utf-8", "surrogatepass")
    return hashlib.blake2b(len(b).to_bytes(8, "little") + b + reason.encode(), digest_size=16).digest()


@dataclass
class PriorIndex:
    """The previous run's index file (``path``, None when unusable) and its row count; verdicts,
    exact keys and signatures stay in the file and are streamed when needed."""

    path: Path | None = None
    n: int = 0

    @classmethod
    def load(cls, clean_dir: Path, key: str) -> PriorIndex:
        m = read_manifest(clean_dir)
        path = clean_dir / INDEX
        if not m or m.get("index_key") != key or not path.is_file():
            if m:
                log.info("clean: no usable index in %s (config, rules or code changed): full re-clean", clean_dir)
            return cls()
        return cls(path, num_rows(path))

    def batches(self, columns: list[str] | None = None):
        if self.path is not None:
            yield from iter_batches(self.path, columns)


class FirstSeen:
    """The seen-before test for doc ids without a set of every id: only ids in ``repeated`` (sorted
    ``h16`` of the ids that occur more than once in the input) can have been seen, so one flag per
    repeated id is all the state."""

    def __init__(self, repeated: np.ndarray):
        self.repeated = repeated
        self.taken = np.zeros(len(repeated), bool)

    def candidates(self, ids: list[Any], h: np.ndarray | None = None) -> np.ndarray:
        """Per row of a batch: the index of its id in ``repeated``, or -1."""
        if len(self.repeated) == 0:
            return np.full(len(ids), -1, np.int64)
        h = h16(ids) if h is None else h
        pos = np.minimum(np.searchsorted(self.repeated, h), len(self.repeated) - 1)
        return np.where(self.repeated[pos] == h, pos, -1)

    def take(self, cand: np.ndarray, i: int) -> bool:
        """True for the first row of its id (which marks the id seen), False for a later one."""
        g = int(cand[i])
        if g < 0:
            return True
        if self.taken[g]:
            return False
        self.taken[g] = True
        return True


@dataclass
class Reuse:
    """Which documents keep their stored verdict, as sorted ``h16`` arrays: ``kept`` (reused kept
    documents), ``other`` (reused rejects), ``rejects`` (``_reject_key`` of the reused rejects), and
    the reused near-duplicates' kept twins and categories (``near_rep``, ``near_cat``) for the
    cluster report; ``prior_kept``: kept documents in the whole index."""

    kept: np.ndarray = field(default_factory=lambda: np.zeros(0, "S16"))
    other: np.ndarray = field(default_factory=lambda: np.zeros(0, "S16"))
    rejects: np.ndarray = field(default_factory=lambda: np.zeros(0, "S16"))
    near_rep: np.ndarray = field(default_factory=lambda: np.zeros(0, "S16"))
    near_cat: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint8))
    prior_kept: int = 0

    def __len__(self) -> int:
        return len(self.kept) + len(self.other)

    def contains(self, h: np.ndarray) -> np.ndarray:
        return member(self.kept, h) | member(self.other, h)


def _reusable(prior: PriorIndex, current: np.ndarray) -> Reuse:
    """Doc ids whose stored verdict still holds: same input key and category (``current``: sorted
    ``_joint_key`` of this run's documents), and, for a duplicate, a kept twin that is itself reused
    (else the duplicate must be decided again). One streaming pass over the index."""
    kept, direct, direct_rej = [], [], []
    req: dict[str, list[np.ndarray]] = defaultdict(list)  # duplicates whose twin must be reused too
    n_kept = 0
    for batch in prior.batches(["doc_id", "input_key", "category", "status", "dup_of"]):
        d = batch.to_pydict()
        n_kept += d["status"].count("kept")
        same = member(current, np.frombuffer(b"".join(
            _joint_key(*r) for r in zip(d["doc_id"], d["input_key"], d["category"])), "S16"))
        rows = [r for r, ok in zip(zip(d["doc_id"], d["status"], d["dup_of"], d["category"]), same.tolist()) if ok]
        kept.append(h16([r[0] for r in rows if r[1] == "kept"]))
        alone = [r for r in rows if r[1] != "kept" and r[2] is None]
        direct.append(h16([r[0] for r in alone]))
        direct_rej.append(np.frombuffer(b"".join(_reject_key(r[0], r[1]) for r in alone), "S16"))
        dups = [r for r in rows if r[1] != "kept" and r[2] is not None]
        req["h"].append(h16([r[0] for r in dups]))
        req["dup_of"].append(h16([r[2] for r in dups]))
        req["rej"].append(np.frombuffer(b"".join(_reject_key(r[0], r[1]) for r in dups), "S16"))
        req["near"].append(np.array([r[1] == "near_duplicate" for r in dups], bool))
        req["cat"].append(np.array([CATEGORIES.index(r[3]) for r in dups], np.uint8))
    out = Reuse(kept=_concat(kept), prior_kept=n_kept)
    if not req:
        return out
    r = {k: np.concatenate(v) for k, v in req.items()}
    ok = member(out.kept, r["dup_of"])
    out.other = _concat([*direct, r["h"][ok]])
    out.rejects = _concat([*direct_rej, r["rej"][ok]])
    near = ok & r["near"]
    out.near_rep, out.near_cat = r["dup_of"][near], r["cat"][near]
    return out


INDEX_SCHEMA = pa.schema([("doc_id", pa.string()), ("input_key", pa.binary(16)), ("category", pa.string()),
                          ("status", pa.string()), ("dup_of", pa.string()), ("exact_key", pa.binary(16)),
                          ("sig", pa.binary()), ("seq", pa.int64())])


def _add_prior(dd: ExternalDedup, rows: list[dict[str, Any]]) -> None:
    if rows:
        sigs = np.stack([np.frombuffer(r["sig"], np.uint32) for r in rows])
        dd.add([r["doc_id"] for r in rows], [r["category"] for r in rows], [r["exact_key"] for r in rows], sigs, prior=True)
        rows.clear()


class _IndexWriter:
    """index.parquet, written in batches (it has a row, and for kept documents a signature, per document)."""

    def __init__(self, path: Path, flush_rows: int = 1024):  # a row holds a signature (num_perm x 4 bytes)
        self.writer = pq.ParquetWriter(path, INDEX_SCHEMA)
        self.rows: list[dict[str, Any]] = []
        self.flush_rows = flush_rows

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        if len(self.rows) >= self.flush_rows:
            self.flush()

    def flush(self) -> None:
        if self.rows:
            self.writer.write_table(pa.Table.from_pylist(self.rows, schema=INDEX_SCHEMA))
            self.rows.clear()

    def close(self) -> None:
        self.flush()
        self.writer.close()
