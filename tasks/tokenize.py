"""Tokenize and pack documents into fixed-size Arrow shards, and read them back for training.

Writes ``tokenized/<tokenizer-fingerprint[:16]>/``:
  ``train/shard-NNNNN.arrow``             the mixed training stream, rows globally shuffled (seeded)
  ``eval/<category>/shard-NNNNN.arrow``   one held-out stream per category
  ``quarantine.parquet``                  input rows that could not be tokenized, with file, row, reason
Each row is ``seq_len`` token ids (uint16, or uint32 when the vocabulary exceeds 65,535) holding
several documents, each ended by EOS. ``seg_starts`` records where each document segment begins so
training can keep attention inside documents; ``seg_categories`` says which category each segment
came from; ``length`` is the number of real tokens (the rest is padding in the last row only).

Writing streams: documents are read in record batches; their ids come from the token cache
(``TokenCache``, ``<root>/tokcache/``: the mix stage already encoded every training document to
count its tokens) and only what it lacks is encoded, in worker processes (or on Dask workers) with
results consumed in order, so the output does not depend on how many workers ran or on what was
cached. Packing, shuffling and sharding are always redone in full: added documents change the
mixture and the seeded global shuffle, and that part is memory-copy work.
Encoding goes through ``Encoder``: for Tekken (Mistral) it calls the tiktoken ``Encoding`` inside
mistral-common's own ``Tekkenizer`` with the same special-token offset (tests/test_tekken.py proves
the ids equal mistral-common's and transformers' MistralCommonBackend's on golden strings); for
other models the ``tokenizers`` Rust backend the model's fast tokenizer wraps.

The global shuffle is a two-pass external shuffle (each packed row goes to one of K temporary
buckets chosen at random, then each bucket is permuted in memory and appended in bucket order):
that yields a uniformly random permutation with at most ``shuffle_bucket_rows`` rows in memory.

The reader (``PackedShards``) memory-maps the shards; its order is a permutation drawn from
(seed, epoch), so a data position is just (epoch, batch index): resuming costs O(1).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import logging
import math
import os
import shutil
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
from tasks._prefect import task

from tasks.config import CATEGORIES, PipelineConfig, config_from_dict, load_config
from tasks.manifest import Stage, require_manifest
from tasks.textio import Progress, dask_executor, iter_batches

log = logging.getLogger(__name__)


def id_dtype(vocab_size: int) -> pa.DataType:
    return pa.uint16() if vocab_size <= 65_536 else pa.uint32()


def row_schema(seq_len: int, vocab_size: int) -> pa.Schema:
    return pa.schema(
        [
            ("input_ids", pa.list_(id_dtype(vocab_size), seq_len)),
            ("seg_starts", pa.list_(pa.int32())),
            ("seg_categories", pa.list_(pa.int8())),
            ("length", pa.int32()),
        ]
    )


def rows_table(schema: pa.Schema, ids: np.ndarray, starts: list, cats: list, lengths: list) -> pa.Table:
    """Packed rows (ids: rows x seq_len) as a table of ``schema``."""
    id_type = schema.field("input_ids").type
    flat = pa.array(ids.reshape(-1).astype(id_type.value_type.to_pandas_dtype(), copy=False), type=id_type.value_type)
    return pa.table(
        [pa.FixedSizeListArray.from_arrays(flat, id_type.list_size),
         pa.array(starts, type=pa.list_(pa.int32())), pa.array(cats, type=pa.list_(pa.int8())),
         pa.array(lengths, type=pa.int32())],
        schema=schema,
    )


class ShardWriter:
    """Writes packed rows into Arrow IPC files of exactly ``rows_per_shard`` rows (the last one may be short)."""

    def __init__(self, out_dir: Path, seq_len: int, vocab_size: int, rows_per_shard: int):
        self.out_dir, self.seq_len, self.rows_per_shard = out_dir, seq_len, rows_per_shard
        self.schema = row_schema(seq_len, vocab_size)
        self.np_dtype = np.uint16 if self.schema.field("input_ids").type.value_type == pa.uint16() else np.uint32
        self.buf: list[tuple[np.ndarray, list[int], list[int], int]] = []
        self.shards: list[str] = []
        self.rows = 0
        out_dir.mkdir(parents=True, exist_ok=True)

    def add(self, ids: np.ndarray, seg_starts: list[int], seg_cats: list[int], length: int) -> None:
        self.buf.append((ids, seg_starts, seg_cats, length))
        if len(self.buf) == self.rows_per_shard:
            self.flush()

    def flush(self) -> None:
        if not self.buf:
            return
        ids = np.stack([b[0] for b in self.buf]).astype(self.np_dtype, copy=False)
        table = rows_table(self.schema, ids, [b[1] for b in self.buf], [b[2] for b in self.buf], [b[3] for b in self.buf])
        path = self.out_dir / f"shard-{len(self.shards):05d}.arrow"
        with pa.OSFile(str(path), "wb") as sink, ipc.new_file(sink, self.schema) as writer:
            writer.write_table(table, max_chunksize=1024)
        self.shards.append(path.name)
        self.rows += len(self.buf)
        self.buf = []


class ShuffleBuckets:
    """First pass of the external shuffle: a row sink (same ``add`` as ShardWriter) that sends every
    row to one of ``n_buckets`` temporary Arrow streams chosen by a seeded RNG. ``drain`` is the
    second pass: each bucket is permuted in memory and its rows go to ``writer`` in bucket order."""

    def __init__(self, tmp_dir: Path, writer: ShardWriter, n_buckets: int, seed: int, max_rows_in_memory: int):
        self.tmp, self.w, self.k, self.seed = tmp_dir, writer, max(1, n_buckets), seed
        self.seq_len = writer.seq_len
        tmp_dir.mkdir(parents=True, exist_ok=True)
        self.flush_rows = max(1, min(1024, max_rows_in_memory // self.k))  # bounds pass-1 memory over all buckets
        self.rng = np.random.default_rng([seed, 0x5EED])
        self.choice = np.zeros(0, np.int64)
        self.buf: list[list] = [[] for _ in range(self.k)]
        self.writers: dict[int, ipc.RecordBatchStreamWriter] = {}
        self.sinks: dict[int, pa.OSFile] = {}
        self.rows = 0
        if self.k > 512:
            _raise_open_files_limit(self.k + 64)

    def add(self, ids: np.ndarray, seg_starts: list[int], seg_cats: list[int], length: int) -> None:
        if not len(self.choice):
            self.choice = self.rng.integers(0, self.k, 4096)
        b, self.choice = int(self.choice[0]), self.choice[1:]
        self.buf[b].append((ids.astype(self.w.np_dtype), seg_starts, seg_cats, length))
        self.rows += 1
        if len(self.buf[b]) >= self.flush_rows:
            self._flush(b)

    def _flush(self, b: int) -> None:
        rows = self.buf[b]
        if not rows:
            return
        if b not in self.writers:
            self.sinks[b] = pa.OSFile(str(self.tmp / f"bucket-{b:05d}.arrows"), "wb")
            self.writers[b] = ipc.new_stream(self.sinks[b], self.w.schema)
        self.writers[b].write_table(rows_table(self.w.schema, np.stack([r[0] for r in rows]), [r[1] for r in rows],
                                              [r[2] for r in rows], [r[3] for r in rows]))
        self.buf[b] = []

    def drain(self) -> None:
        for b in range(self.k):
            self._flush(b)
        for b in self.writers:
            self.writers[b].close()
            self.sinks[b].close()
        for b in range(self.k):
            path = self.tmp / f"bucket-{b:05d}.arrows"
            if not path.is_file():
                continue
            with pa.OSFile(str(path), "rb") as f:
                t = ipc.open_stream(f).read_all()
            perm = np.random.default_rng([self.seed, b]).permutation(t.num_rows)
            ids = t.column("input_ids").combine_chunks().values.to_numpy().reshape(t.num_rows, -1)
            starts, cats, lengths = (t.column(c).to_pylist() for c in ("seg_starts", "seg_categories", "length"))
            for i in perm:
                self.w.add(ids[i], starts[i], cats[i], lengths[i])
            del t, ids
            path.unlink()
        self.w.flush()
        shutil.rmtree(self.tmp, ignore_errors=True)


def _raise_open_files_limit(n: int) -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < n:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(n, hard), hard))


class Packer:
    """Greedy packer: concatenates documents (each + EOS) and cuts rows of exactly seq_len.

    A document longer than the space left continues in the next row as a new segment, so no
    token is dropped; only the final row is padded. Works on numpy arrays: a row is filled with
    slice copies, not token by token."""

    def __init__(self, writer: ShardWriter, eos_id: int, pad_id: int):
        self.w, self.eos, self.pad = writer, eos_id, pad_id
        self.row = np.full(writer.seq_len, pad_id, dtype=np.int64)
        self.n = 0
        self.starts: list[int] = []
        self.cats: list[int] = []
        self.tokens = 0
        self.docs = 0

    def add(self, ids, cat: int) -> None:
        seq = np.asarray(ids, dtype=np.int64)
        total = len(seq) + 1  # + EOS
        self.tokens += total
        self.docs += 1
        pos, L = 0, self.w.seq_len
        while pos < total:
            take = min(L - self.n, total - pos)
            self.starts.append(self.n)
            self.cats.append(cat)
            body = min(take, len(seq) - pos)  # document tokens in this piece; the EOS goes after them
            if body > 0:
                self.row[self.n : self.n + body] = seq[pos : pos + body]
            if body < take:
                self.row[self.n + body] = self.eos
            self.n += take
            pos += take
            if self.n == L:
                self._emit()

    def _emit(self) -> None:
        self.w.add(self.row.copy(), self.starts, self.cats, self.n)
        self.row[:] = self.pad
        self.n = 0
        self.starts, self.cats = [], []

    def close(self) -> None:
        if self.n:
            self._emit()
        if isinstance(self.w, ShuffleBuckets):
            self.w.drain()
        else:
            self.w.flush()


# ------------------------------------------------------------------------------ encoding
@dataclass(frozen=True)
class TokenizerRef:
    """A picklable handle on the model's tokenizer for worker processes and Dask workers: the file
    that defines it (a tekken.json, or a tokenizers JSON written next to the data) and its fingerprint."""

    kind: str  # "tekken" | "hf"
    path: str
    fingerprint: str


def tokenizer_ref(tok, tok_fp: str, cache_dir: Path) -> TokenizerRef:
    tk = _tekkenizer(tok)
    if tk is not None:
        return TokenizerRef("tekken", str(tok._tokenizer_path), tok_fp)
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise TypeError(f"{type(tok).__name__}: no fast (Rust) backend; only fast tokenizers and Tekken are supported")
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / f"tokenizer-{tok_fp[:16]}.json"
    if not path.is_file():
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(backend.to_str(), encoding="utf-8")
        tmp.replace(path)
    return TokenizerRef("hf", str(path), tok_fp)


def _tekkenizer(tok):
    """mistral-common's Tekkenizer behind a MistralCommonBackend (or a MistralTokenizer), else None."""
    inner = getattr(tok, "tokenizer", tok)
    inner = getattr(getattr(inner, "instruct_tokenizer", None), "tokenizer", inner)
    try:
        from mistral_common.tokens.tokenizers.tekken import Tekkenizer
    except ImportError:
        return None
    return inner if isinstance(inner, Tekkenizer) else None


class Encoder:
    """Texts -> token ids (no BOS/EOS) exactly as the model's tokenizer gives them, as numpy arrays.

    Tekken: mistral-common's ``Tekkenizer.encode`` is ``tiktoken.Encoding.encode`` plus
    ``num_special_tokens``; we call the same Encoding object (no Python list per token) and add the
    same offset. Other models: the ``tokenizers`` backend's ``encode_batch``, which is what
    ``PreTrainedTokenizerFast.__call__(add_special_tokens=False)`` runs."""

    def __init__(self, ref: TokenizerRef | None = None, tok=None):
        self.tekken = None
        if ref is not None and ref.kind == "tekken":
            from mistral_common.tokens.tokenizers.tekken import Tekkenizer

            self.tekken = Tekkenizer.from_file(ref.path)
        elif ref is not None:
            from tokenizers import Tokenizer

            self.backend = Tokenizer.from_file(ref.path)
        elif (tk := _tekkenizer(tok)) is not None:
            self.tekken = tk
        else:
            self.backend = tok.backend_tokenizer
        if self.tekken is not None:
            self._bpe, self._offset = self.tekken._model, np.uint32(self.tekken.num_special_tokens)

    texts_encoded = 0  # per process, all Encoders: what the tests count to prove the cache skips work

    def __call__(self, texts: list[str]) -> list[np.ndarray]:
        Encoder.texts_encoded += len(texts)
        if self.tekken is not None:
            return [self._bpe.encode_to_numpy(t) + self._offset for t in texts]
        return [np.asarray(e.ids, dtype=np.uint32) for e in self.backend.encode_batch(texts, add_special_tokens=False)]


_ENCODERS: dict[TokenizerRef, Encoder] = {}


def encoder_for(ref: TokenizerRef) -> Encoder:
    """One Encoder per process (and per Dask worker), built on first use."""
    enc = _ENCODERS.get(ref)
    if enc is None:
        enc = _ENCODERS[ref] = Encoder(ref)
    return enc


def encode_job(job: tuple[TokenizerRef, list[str]]) -> list[np.ndarray]:
    """Worker entry point: encode one batch of texts."""
    ref, texts = job
    return encoder_for(ref)(texts)


class _Done:
    """A finished 'future' for work that ran here (or needed no work)."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def result(self) -> Any:
        return self.value


def register_encoder(ref: TokenizerRef, tok) -> None:
    """Let in-process jobs use the tokenizer object already loaded here instead of reloading it from file."""
    if ref not in _ENCODERS:
        _ENCODERS[ref] = Encoder(tok=tok)


def ordered_encode(fn, ref: TokenizerRef, items: Iterable[tuple[Any, list[str]]], workers: int = 1,
                   executor=None) -> Iterator[tuple[Any, Any]]:
    """For (context, texts) yield (context, fn((ref, texts))) in input order, like ``textio.ordered_map``,
    except that a batch with no texts (all of it cached) yields None and is never submitted: a warm
    cache starts no worker process and sends nothing to the cluster. Jobs run here (workers <= 1, no
    executor), in a local spawn pool started on the first real job, or on ``executor``."""
    from collections import deque

    from tasks.textio import _executor_slots, _submit

    pool = None
    window = 2 * max(_executor_slots(executor), 1) if executor is not None else 2 * max(workers, 1)
    pending: deque = deque()

    def submit(texts: list[str]):
        nonlocal pool
        if not texts:
            return _Done(None)
        if executor is not None:
            return _submit(executor, fn, (ref, texts))
        if workers <= 1:
            return _Done(fn((ref, texts)))
        if pool is None:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor

            # spawn, not fork: the parent has threads (Prefect, Arrow) and forking those can deadlock
            pool = ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"))
        return pool.submit(fn, (ref, texts))

    try:
        for ctx, texts in items:
            pending.append((ctx, submit(texts)))
            while len(pending) >= window or (pending and isinstance(pending[0][1], _Done)):
                c, fut = pending.popleft()
                yield c, fut.result()
        while pending:
            c, fut = pending.popleft()
            yield c, fut.result()
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)


# ------------------------------------------------------------------------------ token cache
# Every document's ids, kept once per tokenizer so that mix (which must encode to count tokens
# exactly) and tokenize (which packs) never encode the same text twice, and a re-scrape encodes only
# new or changed texts. Layout, under ``<data_root>/tokcache/<tokenizer-fingerprint[:16]>/``:
#   ``cache.json``                               the full tokenizer fingerprint and id type
#   ``<split>/<category>/<sha256>.arrow``        segments: Arrow IPC files of one record batch,
#                                                (key fixed_size_binary(16), ids list<uint16|uint32>)
# A key is sha256(text)[:16]; a segment is named by the sha256 of its own bytes, checked before any
# of its ids are used (a corrupted or truncated segment is deleted with a warning and its documents
# are encoded again). The index (key -> segment, row) is built when a scope is opened from the
# segments' memory-mapped key columns: 24 bytes per document in memory, ids stay on disk.
KEY_BYTES = 16


def text_keys(texts: list[str]) -> np.ndarray:
    """(n, 16) uint8 cache keys: the first 16 bytes of sha256 of each text (so a changed text is a new key)."""
    sha = hashlib.sha256
    buf = b"".join([sha(t.encode("utf-8", "surrogatepass")).digest()[:KEY_BYTES] for t in texts])
    return np.frombuffer(buf, np.uint8).reshape(-1, KEY_BYTES)


def keys_array(keys: np.ndarray) -> pa.FixedSizeBinaryArray:
    keys = np.ascontiguousarray(keys, dtype=np.uint8)
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(KEY_BYTES), len(keys), [None, pa.py_buffer(keys)])


def keys_numpy(arr: pa.Array) -> np.ndarray:
    """Zero-copy (n, 16) uint8 view of a fixed_size_binary(16) array without nulls."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if arr.null_count:
        raise ValueError("null cache keys")
    buf = np.frombuffer(arr.buffers()[1], np.uint8)
    return buf[arr.offset * KEY_BYTES : (arr.offset + len(arr)) * KEY_BYTES].reshape(-1, KEY_BYTES)


def _np_view(arr: pa.Array, dtype) -> np.ndarray:
    """Zero-copy numpy view of a null-free primitive array (``to_numpy`` would import pandas, ~0.3 s)."""
    item = np.dtype(dtype).itemsize
    return np.frombuffer(arr.buffers()[1], dtype, count=len(arr), offset=arr.offset * item)


def _hi_lo(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    v = np.ascontiguousarray(keys, dtype=np.uint8).view(">u8")
    return v[:, 0].astype(np.uint64), v[:, 1].astype(np.uint64)


class KeyIndex:
    """A set of 16-byte keys sorted as (high, low) uint64 pairs; ``find`` is a vectorized binary search."""

    def __init__(self, keys: np.ndarray):
        hi, lo = _hi_lo(keys)
        self.order = np.lexsort((lo, hi))  # stable: among equal keys the first given wins
        self.hi, self.lo = hi[self.order], lo[self.order]

    def find(self, keys: np.ndarray) -> np.ndarray:
        """Position of each key in the keys given to the constructor, -1 where absent."""
        out = np.full(len(keys), -1, np.int64)
        if not len(keys) or not len(self.hi):
            return out
        hi, lo = _hi_lo(keys)
        left = np.searchsorted(self.hi, hi, "left")
        right = np.searchsorted(self.hi, hi, "right")
        one = np.flatnonzero(right - left == 1)  # the high half alone decides: compare the low half
        same = self.lo[left[one]] == lo[one]
        out[one[same]] = self.order[left[one[same]]]
        for i in np.flatnonzero(right - left > 1):  # high halves that collide (or a duplicated key)
            a, b = int(left[i]), int(right[i])
            j = a + int(np.searchsorted(self.lo[a:b], lo[i]))
            if j < b and self.lo[j] == lo[i]:
                out[i] = self.order[j]
        return out


class CacheCorrupt(Exception):
    pass


class Segment:
    """One memory-mapped segment file; its ids are only handed out after ``verify``."""

    SCHEMA_NAMES = ["key", "ids"]

    def __init__(self, path: Path):
        self.path, self.sha, self.verified = path, path.stem, False
        try:
            reader = ipc.open_file(pa.memory_map(str(path), "r"))
            if reader.num_record_batches != 1 or reader.schema.names != self.SCHEMA_NAMES:
                raise ValueError(f"unexpected layout {reader.schema.names} x {reader.num_record_batches} batches")
            batch = reader.get_batch(0)
            self.keys = keys_numpy(batch.column(0))
            ids = batch.column(1)
            self.offsets = _np_view(ids.offsets, np.int32)
            self.values = _np_view(ids.values, np.uint16 if ids.type.value_type == pa.uint16() else np.uint32)
        except (OSError, ValueError, pa.ArrowException) as e:
            raise CacheCorrupt(f"unreadable ({e})") from e

    def verify(self) -> None:
        from tasks.manifest import sha256_file

        if not self.verified:
            got = sha256_file(self.path)
            if got != self.sha:
                raise CacheCorrupt(f"sha256 {got[:16]}... does not match its name")
            self.verified = True


class CacheScope:
    """The cached ids of one split input file's documents (``<split>/<category>``): lookup by key,
    append what was encoded, drop what the current split no longer references. With ``enabled``
    False it holds nothing and keeps nothing (everything is a miss)."""

    def __init__(self, directory: Path, id_np: type, max_ids: int, enabled: bool = True):
        self.dir, self.id_np, self.max_ids, self.enabled = directory, id_np, max_ids, enabled
        self.stats = {"cached": 0, "encoded": 0, "segments_written": 0, "segments_corrupt": 0,
                      "segments_dropped": 0, "segments_compacted": 0}
        self.segs: list[Segment] = []
        if enabled:
            directory.mkdir(parents=True, exist_ok=True)
            for p in sorted(directory.glob("*.arrow")):
                try:
                    self.segs.append(Segment(p))
                except CacheCorrupt as e:
                    self._drop_file(p, str(e))
        sizes = [len(s.keys) for s in self.segs]
        keys = np.concatenate([s.keys for s in self.segs]) if self.segs else np.zeros((0, KEY_BYTES), np.uint8)
        self.index = KeyIndex(keys)
        self.seg_of = np.repeat(np.arange(len(self.segs), dtype=np.int32), sizes)
        self.row_of = np.concatenate([np.arange(n, dtype=np.int32) for n in sizes]) if sizes else np.zeros(0, np.int32)
        self.dead = np.zeros(len(self.segs), dtype=bool)
        self._keys: list[np.ndarray] = []
        self._ids: list[np.ndarray] = []
        self._n = 0

    def _drop_file(self, path: Path, why: str) -> None:
        log.warning("token cache: segment %s is corrupt (%s); deleting it, its documents are encoded again", path, why)
        path.unlink(missing_ok=True)
        self.stats["segments_corrupt"] += 1

    def _usable(self, s: int) -> bool:
        if self.dead[s]:
            return False
        try:
            self.segs[s].verify()
            return True
        except (OSError, CacheCorrupt) as e:
            self.dead[s] = True
            self._drop_file(self.segs[s].path, str(e))
            return False

    def lookup(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(segment, row) per key; segment -1 = not cached (or its segment failed its check)."""
        pos = self.index.find(keys)
        hit = pos >= 0
        seg = np.full(len(keys), -1, np.int32)
        row = np.zeros(len(keys), np.int32)
        seg[hit], row[hit] = self.seg_of[pos[hit]], self.row_of[pos[hit]]
        for s in np.unique(seg[hit]):
            if not self._usable(int(s)):
                seg[seg == s] = -1
        self.stats["cached"] += int((seg >= 0).sum())
        return seg, row

    def ids(self, s: int, r: int) -> np.ndarray:
        seg = self.segs[s]
        return seg.values[seg.offsets[r] : seg.offsets[r + 1]]

    def n_ids(self, seg: np.ndarray, row: np.ndarray) -> np.ndarray:
        """Number of ids of each cached (segment, row), from the list offsets (no ids are read)."""
        out = np.zeros(len(seg), np.int64)
        for s in np.unique(seg):
            m = seg == s
            off = self.segs[int(s)].offsets
            out[m] = off[row[m] + 1] - off[row[m]]
        return out

    def add(self, keys: np.ndarray, ids: list[np.ndarray]) -> None:
        """Keep freshly encoded ids; written as a new segment every ``max_ids`` ids and on ``close``."""
        self.stats["encoded"] += len(ids)
        self._keep(keys, ids)

    def _keep(self, keys: np.ndarray, ids: list[np.ndarray]) -> None:
        if not self.enabled:
            return
        for k, a in zip(np.asarray(keys, np.uint8), ids):
            self._keys.append(k)
            self._ids.append(a)
            self._n += len(a)
            if self._n >= self.max_ids:
                self.flush()

    def flush(self) -> None:
        from tasks.manifest import sha256_file

        if not self._ids:
            return
        lens = np.fromiter((len(a) for a in self._ids), np.int64, len(self._ids))
        offsets = np.zeros(len(lens) + 1, np.int32)
        np.cumsum(lens, out=offsets[1:])
        values = np.concatenate(self._ids).astype(self.id_np, copy=False) if self._n else np.zeros(0, self.id_np)
        batch = pa.record_batch([keys_array(np.stack(self._keys)),
                                 pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))],
                                names=Segment.SCHEMA_NAMES)
        tmp = self.dir / f"{os.getpid()}-{time.time_ns()}.part"  # not *.arrow: never read as a segment
        with pa.OSFile(str(tmp), "wb") as sink, ipc.new_file(sink, batch.schema) as w:
            w.write_batch(batch)
        os.replace(tmp, self.dir / f"{sha256_file(tmp)}.arrow")  # content-addressed: a rewrite is identical
        self.stats["segments_written"] += 1
        self._keys, self._ids, self._n = [], [], 0

    def gc(self, live_keys: np.ndarray) -> None:
        """Drop cached documents the current split no longer has: a segment with no live row is
        deleted, one with under half its rows live is rewritten with only those."""
        if not self.enabled:
            return
        live = KeyIndex(live_keys)
        stale: list[Path] = []
        for s, seg in enumerate(self.segs):
            if self.dead[s]:
                continue
            alive = np.flatnonzero(live.find(seg.keys) >= 0)
            if not len(alive):
                stale.append(seg.path)
                self.stats["segments_dropped"] += 1
            elif 2 * len(alive) < len(seg.keys) and self._usable(s):
                self._keep(seg.keys[alive], [self.ids(s, int(r)) for r in alive])
                stale.append(seg.path)
                self.stats["segments_compacted"] += 1
        self.flush()  # the rewritten rows are on disk before their old segments go
        day_ago = time.time() - 86400
        for p in self.dir.glob("*.part"):  # left by a killed writer (a live one is younger)
            with contextlib.suppress(OSError):
                if p.stat().st_mtime < day_ago:
                    stale.append(p)
        for p in stale:
            p.unlink(missing_ok=True)


class TokenCache:
    """``<data_root>/tokcache/<tokenizer-fingerprint[:16]>/``: one ``CacheScope`` per (split, category)."""

    def __init__(self, root: Path, tok_fp: str, vocab_size: int, max_ids: int = 1 << 24, enabled: bool = True):
        self.dir = Path(root) / "tokcache" / tokenizer_dir_name(tok_fp)
        self.enabled, self.max_ids = enabled, max_ids
        self.id_np = np.uint16 if id_dtype(vocab_size) == pa.uint16() else np.uint32
        self.scopes: dict[tuple[str, str], CacheScope] = {}
        if enabled:
            import json

            meta = {"tokenizer_fingerprint": tok_fp, "id_dtype": str(id_dtype(vocab_size))}
            p = self.dir / "cache.json"
            if p.is_file() and json.loads(p.read_text(encoding="utf-8")) != meta:
                raise ValueError(f"{p}: token cache of another tokenizer under the same 16-hex prefix; remove {self.dir}")
            self.dir.mkdir(parents=True, exist_ok=True)
            p.write_text(json.dumps(meta), encoding="utf-8")

    def scope(self, split: str, category: str) -> CacheScope:
        key = (split, category)
        if key not in self.scopes:
            self.scopes[key] = CacheScope(self.dir / split / category, self.id_np, self.max_ids, self.enabled)
        return self.scopes[key]

    def close(self) -> None:
        for s in self.scopes.values():
            s.flush()

    def prune(self, split: str, keep: Iterable[str]) -> list[str]:
        """Delete the scopes of categories the split no longer has (their documents are all gone)."""
        keep = set(keep)
        gone = []
        if self.enabled and (self.dir / split).is_dir():
            for d in sorted((self.dir / split).iterdir()):
                if d.is_dir() and d.name not in keep:
                    shutil.rmtree(d)
                    gone.append(d.name)
        return gone

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {"dir": str(self.dir), "enabled": self.enabled}
        for s in self.scopes.values():
            for k, v in s.stats.items():
                out[k] = out.get(k, 0) + v
        return out


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


def _train_batches(mix_dir: Path, batch_docs: int, q: Quarantine) -> Iterator[tuple[int, np.ndarray, list[str]]]:
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


def tokenizer_dir_name(tok_fp: str) -> str:
    return tok_fp[:16]


def _expected_rows(mix_m: dict[str, Any], seq_len: int) -> int:
    """Packed training rows the mix's token count implies (packing is dense: only the last row pads)."""
    tokens = int(mix_m.get("counts", {}).get("total", {}).get("selected_tokens", 0) or 0)
    return max(1, math.ceil(tokens / seq_len))


def run_tokenize(cfg: PipelineConfig, tokenizer=None, workers: int | None = None, executor=None) -> dict[str, Any]:
    """Tokenize and pack ``mix/train`` and ``split/eval`` into ``tokenized/<fp>/``; returns the manifest.

    ``workers`` (default ``tokenize.workers``) local processes, or ``executor`` (a Dask client or any
    object with ``submit``) encode the batches; the output is the same byte for byte either way."""
    from tasks.model import load_tokenizer, resolve_base, tokenizer_fingerprint

    root = cfg.root
    mix_m = require_manifest(root / "mix", "mix")
    split_m = require_manifest(root / "split", "split")
    tok = tokenizer or load_tokenizer(resolve_base(cfg.model, root / "models"), cfg.model)
    tok_fp = tokenizer_fingerprint(tok)
    out_dir = root / "tokenized" / tokenizer_dir_name(tok_fp)
    tc = cfg.tokenize
    # workers/executor and the token cache change how, not what: they are not part of the fingerprint
    stage = Stage(
        "tokenize",
        out_dir,
        {**cfg.section("tokenize"), "workers": None, "token_cache": None, "cache_segment_tokens": None, "seed": cfg.seed},
        {"mix": mix_m["fingerprint"], "split": split_m["fingerprint"], "tokenizer": tok_fp},
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
                 for cat_id, keys, texts in _train_batches(root / "mix" / "train", tc.batch_docs, q))
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


def tokenized_dir(cfg: PipelineConfig, tok_fp: str) -> Path:
    return cfg.root / "tokenized" / tokenizer_dir_name(tok_fp)


# ------------------------------------------------------------------------------------ reading
@dataclass(frozen=True)
class DataPosition:
    """Where training is in the data: enough to resume in O(1)."""

    epoch: int = 0
    batch: int = 0  # micro-batches already consumed in this epoch, per rank


class PackedShards:
    """Memory-mapped view over a directory of packed shards (zero-copy numpy views per record batch)."""

    def __init__(self, shard_dir: Path):
        files = sorted(Path(shard_dir).glob("shard-*.arrow"))
        if not files:
            raise FileNotFoundError(f"no shards in {shard_dir}")
        self.batches_: list[tuple[np.ndarray, pa.Array, np.ndarray]] = []
        for f in files:
            reader = ipc.open_file(pa.memory_map(str(f), "r"))
            for k in range(reader.num_record_batches):
                rb = reader.get_batch(k)
                seq = rb.schema.field("input_ids").type.list_size
                ids = rb.column("input_ids").values.to_numpy(zero_copy_only=True).reshape(-1, seq)
                self.batches_.append((ids, rb.column("seg_starts"), rb.column("length").to_numpy()))
        self.offsets = np.cumsum([0] + [b[0].shape[0] for b in self.batches_])
        self.seq_len = self.batches_[0][0].shape[1]

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def rows(self, idx: Iterable[int]) -> dict[str, Any]:
        ids, starts, lengths = [], [], []
        for i in idx:
            k = int(np.searchsorted(self.offsets, i, side="right") - 1)
            arr, seg, length = self.batches_[k]
            j = int(i - self.offsets[k])
            ids.append(arr[j])
            starts.append(seg[j].as_py())
            lengths.append(int(length[j]))
        return {"input_ids": np.stack(ids).astype(np.int64), "seg_starts": starts, "length": lengths}

    def order(self, seed: int, epoch: int, rank: int = 0, world: int = 1) -> np.ndarray:
        """This rank's row order for an epoch: a seeded global shuffle, dealt round-robin, trimmed so
        every rank sees the same number of rows (DDP steps stay in lockstep)."""
        perm = np.random.default_rng([seed, epoch]).permutation(len(self))
        per_rank = len(perm) // world
        return perm[rank : per_rank * world : world]

    def batches(self, seed: int, micro_batch: int, start: DataPosition, rank: int = 0, world: int = 1
                ) -> Iterator[tuple[DataPosition, dict[str, Any]]]:
        """Endless micro-batches from ``start``; yields the position *after* each batch."""
        epoch, b = start.epoch, start.batch
        while True:
            order = self.order(seed, epoch, rank, world)
            n = len(order) // micro_batch
            if n == 0:
                raise ValueError(f"{len(order)} rows per rank cannot fill one micro-batch of {micro_batch}")
            while b < n:
                idx = order[b * micro_batch : (b + 1) * micro_batch]
                b += 1
                yield DataPosition(epoch, b), self.rows(idx)
            epoch, b = epoch + 1, 0


def collate(rows: dict[str, Any]):
    """Torch tensors for a packed batch: position ids restart at every document so attention stays
    inside documents (transformers builds the block-diagonal mask from them), and no label
    crosses a document boundary or falls on padding."""
    import torch

    ids = torch.from_numpy(rows["input_ids"])
    bsz, seq = ids.shape
    pos = torch.zeros_like(ids)
    labels = ids.clone()
    for r in range(bsz):
        starts = list(rows["seg_starts"][r]) + [seq]
        for a, b in zip(starts[:-1], starts[1:]):
            pos[r, a:b] = torch.arange(b - a)
        for a in starts[1:-1]:
            labels[r, a] = -100  # first token of a new document is not predicted from the previous one
        n = rows["length"][r]
        labels[r, n:] = -100
        if n < seq:
            pos[r, n:] = torch.arange(seq - n)
    return {"input_ids": ids, "position_ids": pos, "labels": labels}


def check_tokenizer(manifest: dict[str, Any], tok_fp: str, where: Path) -> None:
    if manifest.get("tokenizer_fingerprint") != tok_fp:
        raise ValueError(
            f"{where}: shards were tokenized with tokenizer {str(manifest.get('tokenizer_fingerprint'))[:16]}, "
            f"but the model's tokenizer is {tok_fp[:16]}; re-run the tokenize stage for this model"
        )


# ------------------------------------------------------------------------------- entry points
@task(name="tokenize")
def tokenize(cfg_dict: dict) -> dict:
    with dask_executor() as ex:  # on a Dask worker (DaskTaskRunner): fan the batches out over the cluster
        return run_tokenize(config_from_dict(cfg_dict), executor=ex)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Tokenize and pack the mixed corpus into Arrow shards.")
    ap.add_argument("--config", required=True)
    ap.add_argument("overrides", nargs="*", help="section.key=value")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    m = run_tokenize(load_config(a.config, a.overrides))
    print(f"tokenize: {m['counts']['train']['rows']} training rows, eval categories {list(m['counts']['eval'])}")


if __name__ == "__main__":
    main()
