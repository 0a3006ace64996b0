"""MinHash signatures and the external-memory exact + near-duplicate dedup used by the clean stage.

Signatures (``Signer``): MinHash over the word k-shingles of the casefolded text (words are ``\\w+``
runs), computed with numpy and no per-shingle Python call. Each word gets a polynomial hash over its
characters (a prefix sum mod 2^64, so every word's hash comes from one cumsum), mixed with a 64-bit
finalizer; a shingle hash is a position-weighted sum of its k word hashes, mixed again; permutation j
is ``(a_j * h + b_j) mod 2^64`` with random odd ``a_j``, and the signature keeps the top 32 bits of
each minimum. Everything is drawn from the seed, so signatures are deterministic for a seed.

Dedup (``external_dedup``): the same verdicts as a MinHash LSH visited in order (see ``dedup_reference``)
but with memory that does not grow with the corpus. Documents are numbered in visiting order (their
rank). Exact keys and per-band hashes are spilled into ``P`` partition files by hash, ``P`` chosen so
one partition fits ``memory_bytes``; signatures live in an on-disk array indexed by rank. Per
partition: the first rank of each exact key wins; documents sharing a band bucket become candidate
pairs (later rank -> earlier rank), kept only if their estimated Jaccard reaches the threshold, and
written to pair files partitioned by rank range. A final sequential pass over ranks decides kept or
removed with a bitmap: a near-duplicate joins the kept earlier document with the highest estimate
(ties: the smaller doc_id), exactly as the in-memory LSH query would.
"""

from __future__ import annotations

import functools
import itertools
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

_WORD_RE = re.compile(r"\w+")
_MASK64 = (1 << 64) - 1


def _fmix64(x: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finalizer, in place (uint64 arithmetic wraps)."""
    x ^= x >> np.uint64(33)
    x *= np.uint64(0xFF51AFD7ED558CCD)
    x ^= x >> np.uint64(33)
    x *= np.uint64(0xC4CEB93FE5D3E26B)
    x ^= x >> np.uint64(33)
    return x


@functools.lru_cache(maxsize=4096)
def _is_word_char(code: int) -> bool:
    return _WORD_RE.fullmatch(chr(code)) is not None


_ASCII_WORD = np.array([_is_word_char(i) for i in range(128)] + [False], dtype=bool)


def code_points(text: str) -> np.ndarray:
    """The text's code points as uint32 (lone surrogates pass through rather than fail)."""
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)


class Signer:
    """MinHash signatures (uint32 x num_perm) of word k-shingles, deterministic for a seed."""

    CHUNK_CHARS = 1 << 20  # texts are hashed in slices of this many characters (bounded temporaries)
    CHUNK_SHINGLES = 4096  # rows of the shingle x permutation matrix at a time

    def __init__(self, num_perm: int, shingle_words: int, seed: int):
        self.num_perm, self.k, self.seed = num_perm, shingle_words, seed
        rng = np.random.default_rng([seed, 0x4D696E48])
        full = np.iinfo(np.uint64).max
        self.a = rng.integers(1, full, num_perm, dtype=np.uint64, endpoint=True) | np.uint64(1)
        self.b = rng.integers(0, full, num_perm, dtype=np.uint64, endpoint=True)
        self.pos = rng.integers(1, full, shingle_words, dtype=np.uint64, endpoint=True) | np.uint64(1)
        p = int(rng.integers(1 << 40, full, dtype=np.uint64)) | 1
        self.p, self.p_inv = np.uint64(p), np.uint64(pow(p, -1, 1 << 64))
        self._pw = self._pw_inv = np.zeros(0, np.uint64)

    def _powers(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        if len(self._pw) < n + 1:
            m = max(n + 1, 2 * len(self._pw), 4096)
            with np.errstate(over="ignore"):  # p^0 .. p^(m-1) and p^-i, mod 2^64
                one = np.ones(1, np.uint64)  # (a plain 1 would promote the concatenation to float64)
                self._pw = np.concatenate((one, np.cumprod(np.full(m - 1, self.p, np.uint64))))
                self._pw_inv = np.concatenate((one, np.cumprod(np.full(m - 1, self.p_inv, np.uint64))))
        return self._pw[: n + 1], self._pw_inv[: n + 1]

    def word_hashes(self, text: str) -> np.ndarray:
        """One mixed 64-bit hash per ``\\w+`` word of the casefolded text, in order."""
        text = text.lower() if text.isascii() else text.casefold()
        out = []
        start = 0
        while start < len(text):
            end = min(start + self.CHUNK_CHARS, len(text))
            if end < len(text):  # cut between words: back up to a non-word character
                cut = end
                while cut > start and _is_word_char(ord(text[cut - 1])):
                    cut -= 1
                end = cut if cut > start else end
            out.append(self._chunk_word_hashes(code_points(text[start:end])))
            start = end
        return np.concatenate(out) if out else np.zeros(0, np.uint64)

    def _chunk_word_hashes(self, cp: np.ndarray) -> np.ndarray:
        n = len(cp)
        if n == 0:
            return np.zeros(0, np.uint64)
        word = _ASCII_WORD[np.minimum(cp, 128)]
        if (high := cp > 127).any():
            idx = np.flatnonzero(high)
            codes, inv = np.unique(cp[idx], return_inverse=True)
            word[idx] = np.array([_is_word_char(int(c)) for c in codes], dtype=bool)[inv]
        edges = np.diff(word.view(np.int8), prepend=np.int8(0), append=np.int8(0))
        starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
        if len(starts) == 0:
            return np.zeros(0, np.uint64)
        pw, pw_inv = self._powers(n)
        with np.errstate(over="ignore"):
            prefix = np.empty(n + 1, np.uint64)
            prefix[0] = 0
            np.cumsum(cp.astype(np.uint64) * pw[:n], out=prefix[1:])
            h = (prefix[ends] - prefix[starts]) * pw_inv[starts]  # the word's hash as if it started at 0
        return _fmix64(h)

    def shingle_hashes(self, text: str) -> np.ndarray:
        """64-bit hashes of the word k-shingles; a text of at most k words is one shingle (all its
        words), one without words is the hash of its characters."""
        w = self.word_hashes(text)
        k = self.k
        with np.errstate(over="ignore"):
            if len(w) == 0:
                cp = code_points(text).astype(np.uint64)
                pw, _ = self._powers(len(cp))
                return _fmix64(np.array([int((cp * pw[: len(cp)]).sum(dtype=np.uint64)) ^ len(cp)], np.uint64))
            if len(w) <= k:
                return _fmix64(np.array([int((w * self.pos[: len(w)]).sum(dtype=np.uint64))], np.uint64))
            n = len(w) - k + 1
            s = w[:n] * self.pos[0]
            for t in range(1, k):
                s += w[t : t + n] * self.pos[t]
        return _fmix64(s)

    def signature(self, text: str) -> np.ndarray:
        return self.signature_of(self.shingle_hashes(text))

    def signature_of(self, shingles: np.ndarray) -> np.ndarray:
        """min over shingles of each permutation, top 32 bits (the shift commutes with the min)."""
        sig = np.full(self.num_perm, np.iinfo(np.uint64).max, np.uint64)
        with np.errstate(over="ignore"):
            for lo in range(0, len(shingles), self.CHUNK_SHINGLES):
                m = np.multiply.outer(shingles[lo : lo + self.CHUNK_SHINGLES], self.a)
                m += self.b
                np.minimum(sig, m.min(axis=0), out=sig)
        return (sig >> np.uint64(32)).astype(np.uint32)


def shingle_set(text: str, k: int) -> set[str]:
    """The shingles as strings (for tests and audits: the exact Jaccard the signature estimates)."""
    words = _WORD_RE.findall(text.casefold())
    if len(words) <= k:
        return {" ".join(words) if words else text}
    return {" ".join(words[i : i + k]) for i in range(len(words) - k + 1)}


# ------------------------------------------------------------------------------------ LSH bands
@functools.lru_cache(maxsize=64)
def lsh_bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows per band) minimizing 0.1 x P(false positive) + 0.9 x P(false negative), the way
    datasketch's MinHashLSH(weights=(0.1, 0.9)) chooses them. Every candidate is verified against
    the threshold, so a false positive only costs a comparison while a false negative leaves a
    duplicate in: hence the weight on recall (at threshold 0.8 and 128 permutations: 14 bands of 9
    rows). The integrands are polynomials of degree <= num_perm, so Gauss-Legendre quadrature with
    num_perm/2 + 1 nodes is exact (and needs no scipy)."""
    x, w = np.polynomial.legendre.leggauss(num_perm // 2 + 1)

    def integral(f, lo, hi):
        s = (hi - lo) / 2 * x + (hi + lo) / 2
        return float((hi - lo) / 2 * (w * f(s)).sum())

    best, opt = float("inf"), (0, 0)
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            fp = integral(lambda s, r=r, b=b: 1 - (1 - s ** float(r)) ** float(b), 0.0, threshold)
            fn = integral(lambda s, r=r, b=b: 1 - (1 - (1 - s ** float(r)) ** float(b)), threshold, 1.0)
            if (err := 0.1 * fp + 0.9 * fn) < best:
                best, opt = err, (b, r)
    return opt


def band_hashes(sigs: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """(n, bands) uint64: one hash per band of each signature, distinct per band index, so equal
    values mean the same bucket of the same band (a 64-bit collision only adds a verified candidate)."""
    n = len(sigs)
    out = np.empty((n, bands), np.uint64)
    s = sigs.astype(np.uint64)
    with np.errstate(over="ignore"):
        for b in range(bands):
            h = np.full(n, (b + 1) * 0x9E3779B97F4A7C15 & _MASK64, np.uint64)
            for c in range(b * rows, (b + 1) * rows):
                h = _fmix64(h ^ s[:, c])
            out[:, b] = h
    return out


# ------------------------------------------------------------------------------- the reference
@dataclass
class DedupResult:
    removed: dict[int, tuple[str, str]] = field(default_factory=dict)  # index -> (reason, detail)
    representative: dict[int, int] = field(default_factory=dict)  # near-dup index -> kept index


def visiting_order(doc_ids: list[str], n_prior: int) -> list[int]:
    return list(range(n_prior)) + sorted(range(n_prior, len(doc_ids)), key=doc_ids.__getitem__)


def dedup_reference(doc_ids: list[str], keys: list[bytes], sigs: np.ndarray, threshold: float,
                    n_prior: int = 0) -> DedupResult:
    """In memory, the plain way (the definition ``external_dedup`` must match; used by the tests).
    Exact then near-duplicate removal. The first ``n_prior`` documents were kept by an earlier run:
    they are visited first, in the given order, and always stay. The rest are visited in doc_id order
    (deterministic, and the kept member of each new cluster is the smallest doc_id). A near-duplicate
    joins the kept document sharing an LSH bucket with the highest estimated Jaccard >= threshold
    (ties: the smaller doc_id)."""
    res = DedupResult()
    order = visiting_order(doc_ids, n_prior)
    first: dict[bytes, int] = {}
    for i in order:
        j = first.setdefault(keys[i], i)
        if j != i:
            res.removed[i] = ("exact_duplicate", doc_ids[j])
    if len(sigs) == 0:
        return res
    bands, rows = lsh_bands(threshold, sigs.shape[1])
    hb = band_hashes(sigs, bands, rows)
    tables: list[dict[int, list[int]]] = [{} for _ in range(bands)]
    for i in order:
        if i in res.removed:
            continue
        best: tuple[float, str, int] | None = None
        if i >= n_prior:
            for j in {j for b in range(bands) for j in tables[b].get(int(hb[i, b]), ())}:
                est = float(np.mean(sigs[i] == sigs[j]))
                if est >= threshold and (best is None or (-est, doc_ids[j]) < (-best[0], best[1])):
                    best = (est, doc_ids[j], j)
        if best is None:
            for b in range(bands):
                tables[b].setdefault(int(hb[i, b]), []).append(i)
        else:
            res.removed[i] = ("near_duplicate", f"{best[1]} jaccard~{best[0]:.3f}")
            res.representative[i] = best[2]
    return res


# ------------------------------------------------------------------------------- external dedup
class Spill:
    """Append-only partitioned record files: numpy structured records go to partition ``part[i]``."""

    def __init__(self, directory: Path, dtype: np.dtype, parts: int, flush_rows: int = 1 << 16):
        self.dir, self.dtype, self.parts, self.flush_rows = Path(directory), np.dtype(dtype), parts, flush_rows
        self.dir.mkdir(parents=True, exist_ok=True)
        self._buf: list[list[np.ndarray]] = [[] for _ in range(parts)]
        self._n = [0] * parts

    def add(self, records: np.ndarray, part: np.ndarray) -> None:
        if len(records) == 0:
            return
        order = np.argsort(part, kind="stable")
        part, records = part[order], records[order]
        cuts = np.searchsorted(part, np.arange(self.parts + 1))
        for p in np.flatnonzero(np.diff(cuts)).tolist():
            self._buf[p].append(records[cuts[p] : cuts[p + 1]])
            self._n[p] += int(cuts[p + 1] - cuts[p])
            if self._n[p] >= self.flush_rows:
                self._flush(p)

    def _flush(self, p: int) -> None:
        if self._buf[p]:
            with open(self.dir / f"{p:05d}.bin", "ab") as f:
                np.concatenate(self._buf[p]).tofile(f)
            self._buf[p], self._n[p] = [], 0

    def close(self) -> None:
        for p in range(self.parts):
            self._flush(p)

    def read(self, p: int) -> np.ndarray:
        path = self.dir / f"{p:05d}.bin"
        return np.fromfile(path, self.dtype) if path.is_file() else np.zeros(0, self.dtype)


_EXACT = np.dtype([("k0", "<u8"), ("k1", "<u8"), ("rank", "<i8")])
_BAND = np.dtype([("h", "<u8"), ("rank", "<i8")])
_PAIR = np.dtype([("i", "<i8"), ("j", "<i8"), ("m", "<u2")])  # later rank, earlier rank, matching rows
_DUP = np.dtype([("i", "<i8"), ("j", "<i8")])  # exact duplicate rank -> first rank with its key
_VERDICT = np.dtype([("arrival", "<i8"), ("reason", "u1"), ("other", "<i8"), ("m", "<u2")])
_CLUSTER = np.dtype([("rep", "<i8"), ("cat", "u1")])
EXACT, NEAR = 1, 2


@dataclass
class DedupStats:
    documents: int = 0
    partitions: int = 0
    candidate_pairs: int = 0  # pairs verified at or above the threshold (per shared band)
    exact_removed: int = 0
    near_removed: int = 0
    clusters_by_category: dict[str, int] = field(default_factory=dict)


class ExternalDedup:
    """Exact + MinHash/LSH dedup on disk; memory does not grow with the corpus (but for 2 bits per
    document: the exact-removed and kept bitmaps).

    Feed documents in arrival order with ``add`` (earlier runs' kept documents first, with
    ``prior=True``, in the order they were first kept), call ``run``, then read the verdicts back
    in arrival order with ``verdict``. Work files live in ``work`` (deleted by ``close``).
    ``partitions`` forces P (tests); else P is chosen from ``max_docs`` so that one partition's
    records fit ``memory_bytes``.
    """

    RUN_DOCS = 200_000  # doc ids sorted in memory per run before the k-way merge
    BLOCK = 1 << 18  # ranks (and arrivals) per block of the decision pass and the verdict files

    def __init__(self, work: Path, num_perm: int, threshold: float, categories: Iterable[str], max_docs: int,
                 memory_bytes: int = 256 << 20, partitions: int | None = None):
        self.work = Path(work)
        self.work.mkdir(parents=True, exist_ok=True)
        self.num_perm, self.threshold = num_perm, threshold
        self.bands, self.rows = lsh_bands(threshold, num_perm)
        self.categories = list(categories)
        # a band partition holds ~ docs * bands / P records of 16 bytes; sorting needs about 3x that
        need = max(max_docs, 1) * self.bands * _BAND.itemsize * 3
        self.parts = partitions or max(1, math.ceil(need / memory_bytes))
        self.stats = DedupStats(partitions=self.parts)
        self._sig_f = open(self.work / "sigs.u32", "wb")
        self._key_f = open(self.work / "keys.bin", "wb")
        self._n = 0
        self._n_prior = 0
        self._run: list[tuple[str, int, int]] = []  # (doc_id, arrival, category) of new documents
        self._runs: list[Path] = []
        self._prior_ids: list[Path] = []
        self._prior_buf: list[tuple[str, int, int]] = []
        self._verdict_block = -1
        self._verdicts: dict[int, tuple[int, str, int]] = {}
        self._prior_clusters: list[np.ndarray] = []  # _CLUSTER records

    # ---- feeding
    def add(self, doc_ids: list[str], categories: list[str], keys: list[bytes], sigs: np.ndarray, prior: bool = False) -> None:
        if not doc_ids:
            return
        if prior and self._n != self._n_prior:
            raise ValueError("earlier runs' documents must be added before this run's")
        np.ascontiguousarray(sigs, dtype=np.uint32).tofile(self._sig_f)
        self._key_f.write(b"".join(keys))
        cat = [self.categories.index(c) for c in categories]
        rows = list(zip(doc_ids, range(self._n, self._n + len(doc_ids)), cat))
        self._n += len(doc_ids)
        if prior:
            self._n_prior = self._n
            self._prior_buf += rows
            if len(self._prior_buf) >= self.RUN_DOCS:
                self._write_run(self._prior_buf, self._prior_ids, sort=False)
        else:
            self._run += rows
            if len(self._run) >= self.RUN_DOCS:
                self._write_run(self._run, self._runs, sort=True)

    def add_prior_clusters(self, reps: np.ndarray, cats: np.ndarray) -> None:
        """Earlier runs' near-duplicates (category numbers ``cats``) that joined prior documents ``reps``
        (arrival numbers) and stay removed: counted in the cluster report with this run's (9 bytes
        each, no Python object)."""
        cl = np.empty(len(reps), _CLUSTER)
        cl["rep"], cl["cat"] = reps, cats
        self._prior_clusters.append(cl)

    def _write_run(self, rows: list[tuple[str, int, int]], into: list[Path], sort: bool) -> None:
        import pyarrow as pa
        import pyarrow.ipc as ipc

        if sort:
            rows.sort()
        path = self.work / f"run-{len(self._runs) + len(self._prior_ids):05d}.arrow"
        ids, arr, cat = zip(*rows)
        t = pa.table({"doc_id": pa.array(ids, pa.string()), "arrival": pa.array(arr, pa.int64()),
                      "cat": pa.array(cat, pa.uint8())})
        with ipc.new_file(str(path), t.schema) as w:
            w.write_table(t, max_chunksize=self.BLOCK)
        into.append(path)
        rows.clear()

    # ---- the dedup
    def run(self) -> DedupStats:
        self._sig_f.close()
        self._key_f.close()
        if self._prior_buf:
            self._write_run(self._prior_buf, self._prior_ids, sort=False)
        if self._run:
            self._write_run(self._run, self._runs, sort=True)
        n = self.stats.documents = self._n
        self._merge_order()
        self.exact_removed = np.zeros(n, bool)
        self.kept = np.zeros(n, bool)
        if n:
            self._exact()
            self._bands()
            self._decide()
        return self.stats

    def _iter_runs(self, path: Path):
        import pyarrow.ipc as ipc

        with ipc.open_file(path) as r:
            for b in range(r.num_record_batches):
                batch = r.get_batch(b)
                yield from zip(*(batch.column(c).to_pylist() for c in ("doc_id", "arrival", "cat")))

    def _merge_order(self) -> None:
        """Visiting order: prior documents as given, then the sorted runs merged by doc_id. Writes the
        doc ids (Arrow, for detail strings), rank -> arrival and rank -> category."""
        import heapq

        import pyarrow as pa
        import pyarrow.ipc as ipc

        schema = pa.schema([("doc_id", pa.string())])
        rows = itertools.chain(*(self._iter_runs(p) for p in self._prior_ids),  # already in order
                               heapq.merge(*(self._iter_runs(p) for p in self._runs)))
        with open(self.work / "r2a.i64", "wb") as fa, open(self.work / "r2c.u8", "wb") as fc, \
                ipc.new_file(str(self.work / "order.arrow"), schema) as w:
            buf: list[tuple[str, int, int]] = []

            def flush():
                if buf:
                    ids, arr, cat = zip(*buf)
                    w.write_batch(pa.record_batch([pa.array(ids, pa.string())], schema=schema))
                    np.asarray(arr, np.int64).tofile(fa)
                    np.asarray(cat, np.uint8).tofile(fc)
                    buf.clear()

            for row in rows:
                buf.append(row)
                if len(buf) >= self.BLOCK:
                    flush()
            flush()
        for p in self._runs + self._prior_ids:
            p.unlink()

    def _r2a(self, lo: int, hi: int) -> np.ndarray:
        return np.fromfile(self.work / "r2a.i64", np.int64, count=hi - lo, offset=8 * lo)

    def _sigs(self, arrivals: np.ndarray) -> np.ndarray:
        """Signature rows by arrival (a fresh map per call, so resident pages do not pile up)."""
        mm = np.memmap(self.work / "sigs.u32", np.uint32, "r", shape=(self._n, self.num_perm))
        out = np.asarray(mm[arrivals])
        del mm
        return out

    def _exact(self) -> None:
        spill = Spill(self.work / "exact", _EXACT, self.parts)
        for lo in range(0, self._n, self.BLOCK):
            hi = min(lo + self.BLOCK, self._n)
            keys = np.memmap(self.work / "keys.bin", np.uint64, "r", shape=(self._n, 2))
            k = np.asarray(keys[self._r2a(lo, hi)])
            del keys
            rec = np.empty(hi - lo, _EXACT)
            rec["k0"], rec["k1"], rec["rank"] = k[:, 0], k[:, 1], np.arange(lo, hi)
            spill.add(rec, (k[:, 0] % np.uint64(self.parts)).astype(np.int64))
        spill.close()
        self._dups = Spill(self.work / "dups", _DUP, self._blocks())
        for p in range(self.parts):
            rec = spill.read(p)
            rec = rec[np.lexsort((rec["rank"], rec["k1"], rec["k0"]))]
            same = (rec["k0"][1:] == rec["k0"][:-1]) & (rec["k1"][1:] == rec["k1"][:-1])
            first = np.flatnonzero(np.concatenate(([True], ~same)))
            head = np.repeat(rec["rank"][first], np.diff(np.append(first, len(rec))))
            dup = rec["rank"] != head
            out = np.empty(int(dup.sum()), _DUP)
            out["i"], out["j"] = rec["rank"][dup], head[dup]
            self.exact_removed[out["i"]] = True
            self._dups.add(out, out["i"] // self.BLOCK)
        self._dups.close()
        self.stats.exact_removed = int(self.exact_removed.sum())
        _rmtree(self.work / "exact")

    def _blocks(self) -> int:
        return max(1, -(-self._n // self.BLOCK))

    def _bands(self) -> None:
        spill = Spill(self.work / "bands", _BAND, self.parts)
        for lo in range(0, self._n, self.BLOCK // 8):
            hi = min(lo + self.BLOCK // 8, self._n)
            ranks = np.arange(lo, hi)[~self.exact_removed[lo:hi]]
            if len(ranks) == 0:
                continue
            hb = band_hashes(self._sigs(self._r2a(lo, hi)[ranks - lo]), self.bands, self.rows)
            rec = np.empty(hb.size, _BAND)
            rec["h"], rec["rank"] = hb.ravel(), np.repeat(ranks, self.bands)
            spill.add(rec, (rec["h"] % np.uint64(self.parts)).astype(np.int64))
        spill.close()
        self._pairs = Spill(self.work / "pairs", _PAIR, self._blocks())
        need = math.ceil(self.threshold * self.num_perm - 1e-9)
        for p in range(self.parts):
            rec = spill.read(p)
            rec = rec[np.lexsort((rec["rank"], rec["h"]))]
            # position of each record within its bucket: it pairs with the `pos` earlier members
            start = np.flatnonzero(np.concatenate(([True], rec["h"][1:] != rec["h"][:-1])))
            size = np.diff(np.append(start, len(rec)))
            pos = np.arange(len(rec)) - np.repeat(start, size)
            members = np.flatnonzero(pos > 0)
            if len(members) == 0:
                continue
            for i_idx, j_idx in _pair_chunks(members, pos, 1 << 16):
                ri, rj = rec["rank"][i_idx], rec["rank"][j_idx]
                ranks, inv = np.unique(np.concatenate((ri, rj)), return_inverse=True)
                sig = self._sigs(self._gather_r2a(ranks))
                m = (sig[inv[: len(ri)]] == sig[inv[len(ri) :]]).sum(axis=1)
                ok = m >= need
                out = np.empty(int(ok.sum()), _PAIR)
                out["i"], out["j"], out["m"] = ri[ok], rj[ok], m[ok]
                self.stats.candidate_pairs += len(out)
                self._pairs.add(out, out["i"] // self.BLOCK)
        self._pairs.close()
        _rmtree(self.work / "bands")

    def _gather_r2a(self, ranks: np.ndarray) -> np.ndarray:
        mm = np.memmap(self.work / "r2a.i64", np.int64, "r", shape=(self._n,))
        out = np.asarray(mm[ranks])
        del mm
        return out

    def _doc_ids(self, ranks: Iterable[int]) -> dict[int, str]:
        import pyarrow as pa
        import pyarrow.ipc as ipc

        ranks = sorted(set(ranks))
        if not ranks:
            return {}
        with pa.memory_map(str(self.work / "order.arrow")) as src, ipc.open_file(src) as r:
            out = {}
            for x in ranks:
                b, o = divmod(x, self.BLOCK)
                out[x] = r.get_batch(b).column(0)[o].as_py()
        return out

    def _decide(self) -> None:
        """Rank by rank: exact duplicates are out; a document with verified candidates joins the kept
        one with the most matching rows (ties: the smaller doc_id); the others are kept."""
        verdicts = Spill(self.work / "verdicts", _VERDICT, self._blocks())
        clusters = Spill(self.work / "clusters", _CLUSTER, self._blocks())
        n_cat = len(self.categories)
        for cl in self._prior_clusters:
            clusters.add(cl, cl["rep"] // self.BLOCK)
        self._prior_clusters.clear()
        for blk in range(self._blocks()):
            lo, hi = blk * self.BLOCK, min((blk + 1) * self.BLOCK, self._n)
            self.kept[lo:hi] = ~self.exact_removed[lo:hi]
            dups = self._dups.read(blk)
            pairs = self._pairs.read(blk)
            pairs = pairs[(pairs["i"] >= self._n_prior) & ~self.exact_removed[pairs["i"]]]
            pairs = np.unique(pairs)  # the same pair from several bands
            near: list[tuple[int, int, int]] = []
            if len(pairs):
                ids = self._doc_ids(pairs["j"].tolist())
                cuts = np.flatnonzero(np.diff(pairs["i"])) + 1
                for grp in np.split(pairs, cuts):
                    i = int(grp["i"][0])
                    live = grp[self.kept[grp["j"]]]  # earlier ranks are decided already
                    if len(live) == 0:
                        continue
                    best = min(zip((-live["m"]).tolist(), (ids[j] for j in live["j"].tolist()), live["j"].tolist()))
                    self.kept[i] = False
                    near.append((i, best[2], -best[0]))
            arr = self._gather_r2a(np.arange(lo, hi))
            rec = np.empty(len(dups) + len(near), _VERDICT)
            if len(dups):
                rec["arrival"][: len(dups)] = arr[dups["i"] - lo]
                rec["reason"][: len(dups)], rec["other"][: len(dups)], rec["m"][: len(dups)] = EXACT, dups["j"], 0
            if near:
                ni, nj, nm = (np.array(x, np.int64) for x in zip(*near))
                rec["arrival"][len(dups) :], rec["reason"][len(dups) :] = arr[ni - lo], NEAR
                rec["other"][len(dups) :], rec["m"][len(dups) :] = nj, nm
                cats = np.fromfile(self.work / "r2c.u8", np.uint8, count=hi - lo, offset=lo)[ni - lo]
                cl = np.empty(len(ni), _CLUSTER)
                cl["rep"], cl["cat"] = nj, cats
                clusters.add(cl, nj // self.BLOCK)
            verdicts.add(rec, rec["arrival"] // self.BLOCK)
            self.stats.near_removed += len(near)
        verdicts.close()
        clusters.close()
        self._verdict_spill = verdicts
        counts = np.zeros(n_cat, np.int64)
        for blk in range(self._blocks()):
            cl = np.unique(clusters.read(blk))
            counts += np.bincount(cl["cat"], minlength=n_cat)
        self.stats.clusters_by_category = {c: int(k) for c, k in zip(self.categories, counts.tolist()) if k}
        for d in ("dups", "pairs", "clusters"):
            _rmtree(self.work / d)

    # ---- reading the verdicts back, in arrival order
    def verdict(self, arrival: int) -> tuple[str, str] | None:
        """(reason, detail) for a removed document, None for a kept one.
        Calls must come in increasing arrival order (one verdict block is held at a time)."""
        blk = arrival // self.BLOCK
        if blk != self._verdict_block:
            rec = self._verdict_spill.read(blk) if self._n else np.zeros(0, _VERDICT)
            ids = self._doc_ids(rec["other"].tolist())
            self._verdicts = {int(a): (int(r), ids[int(o)], int(m)) for a, r, o, m in rec.tolist()}
            self._verdict_block = blk
        v = self._verdicts.get(arrival)
        if v is None:
            return None
        reason, other, m = v
        if reason == EXACT:
            return "exact_duplicate", other
        return "near_duplicate", f"{other} jaccard~{m / self.num_perm:.3f}"

    def read_rows(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        """Signatures (uint32) and exact keys (rows of 16 uint8) of arrivals lo..hi-1."""
        sigs = np.fromfile(self.work / "sigs.u32", np.uint32, count=(hi - lo) * self.num_perm, offset=4 * lo * self.num_perm)
        keys = np.fromfile(self.work / "keys.bin", np.uint8, count=(hi - lo) * 16, offset=16 * lo)
        return sigs.reshape(hi - lo, self.num_perm), keys.reshape(hi - lo, 16)

    def close(self) -> None:
        for f in (self._sig_f, self._key_f):
            f.close()
        _rmtree(self.work)


def repeated_keys(chunks: Iterable[np.ndarray], work: Path, n: int, memory_bytes: int = 256 << 20) -> np.ndarray:
    """The distinct ``S16`` keys that occur more than once in ``chunks`` (``n`` keys in all), sorted.
    External: keys are spilled into partitions by hash, sized so that one partition sorts within
    ``memory_bytes``; only the repeated keys (normally none) are held at the end."""
    parts = max(1, math.ceil(max(n, 1) * 16 * 3 / memory_bytes))
    spill = Spill(work, np.dtype("S16"), parts)
    for c in chunks:
        if len(c):
            spill.add(c, (np.frombuffer(c.tobytes(), "<u8")[::2] % np.uint64(parts)).astype(np.int64))
    spill.close()
    out = []
    for p in range(parts):
        k = np.sort(spill.read(p))
        out.append(np.unique(k[1:][k[1:] == k[:-1]]))
    _rmtree(work)
    return np.sort(np.concatenate(out)) if out else np.zeros(0, "S16")


def _pair_chunks(members: np.ndarray, pos: np.ndarray, max_pairs: int):
    """(later, earlier) record indices of every pair inside a bucket, in bounded chunks: the record at
    ``m`` pairs with the ``pos[m]`` records before it."""
    counts = pos[members]
    lo = 0
    while lo < len(members):
        cum = np.cumsum(counts[lo:])
        hi = lo + max(1, int(np.searchsorted(cum, max_pairs, side="right")))
        mem, cnt = members[lo:hi], counts[lo:hi]
        total = int(cnt.sum())
        i_idx = np.repeat(mem, cnt)
        offs = np.arange(total) - np.repeat(np.cumsum(cnt) - cnt, cnt)  # 0 .. cnt-1 per member
        j_idx = i_idx - 1 - offs
        yield i_idx, j_idx
        lo = hi


def _rmtree(p: Path) -> None:
    import shutil

    shutil.rmtree(p, ignore_errors=True)
