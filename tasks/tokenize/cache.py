"""The token cache: each document is tokenized once per tokenizer (mix counts with the ids, tokenize
packs from them); segments keyed by text hash, verified by sha256 and garbage-collected. The encoders
(Hugging Face and Tekken) and the ordered parallel encode live here too."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

from tasks.tokenize.format import id_dtype, tokenizer_dir_name

log = logging.getLogger(__name__)

_ENCODERS: dict[TokenizerRef, Encoder] = {}



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


def encoder_for(ref: TokenizerRef) -> Encoder:
    """One Encoder per process (and per Dask worker), built on first use."""
    enc = _ENCODERS.get(ref)
    if enc is None:
        enc = _ENCODERS[ref] = Encoder(ref)
    return enc


ENCODE_CHARS = 1 << 20  # characters per encoder call


def encode_job(job: tuple[TokenizerRef, list[str]]) -> list[np.ndarray]:
    """Worker entry point: encode one batch of texts, about ``ENCODE_CHARS`` characters per call: the
    ``tokenizers`` backend holds ~100 bytes per token in its Encoding objects until the call returns
    (measured: a 16 MB batch of short-token text took +760 MB in mix), so a batch is cut by size."""
    ref, texts = job
    enc, out, start, size = encoder_for(ref), [], 0, 0
    for i, t in enumerate(texts):
        size += len(t)
        if size >= ENCODE_CHARS or i == len(texts) - 1:
            out.extend(enc(texts[start : i + 1]))
            start, size = i + 1, 0
    return out


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

    from tasks.core.textio import _executor_slots, _submit

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
        from tasks.core.manifest import sha256_file

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
        from tasks.core.manifest import sha256_file

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
