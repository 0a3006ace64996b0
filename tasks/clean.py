"""Clean and deduplicate the extracted corpus.

Reads ``extracted/<category>.parquet`` and writes ``clean/<category>.parquet`` (the input columns,
``text`` replaced by the cleaned text, plus ``n_chars`` and ``dup_cluster``) and
``clean/rejects.parquet`` (doc_id, url, category, reason, detail, text): every input row is either
kept or rejected with a reason, never silently dropped (``documents_in == kept + rejected``).

Per document, in this order:
  1. Unicode normalization (``clean.unicode_form``), newline/zero-width/control-character cleanup,
     trailing spaces stripped, runs of blank lines collapsed (prose also collapses runs of spaces;
     code keeps its indentation).
  2. Boilerplate: a line that occurs in >= 30% of a source's documents (and in >= 3 of them) is a
     site footer/header, not content, and is removed. Counted on a bounded sample per source.
  3. PII: e-mail addresses -> ``[EMAIL]``, phone numbers -> ``[PHONE]`` (not in code, where digit
     groups are usually literals).
  4. Quality heuristics from ``clean``: ``min_chars`` for all; ``min_alpha_ratio`` and
     ``max_symbol_ratio`` for prose; structured categories (compositions, additives) count letters
     without digits, since quantities and E-numbers are content; code is exempt from both.
  5. Dedup over the whole corpus (all categories): exact (sha256 of whitespace-collapsed text; the
     smallest doc_id is kept), then near-duplicates (MinHash of word shingles + LSH, seeded with
     ``cfg.seed``), visiting documents in doc_id order so the kept member of each cluster is the
     lexicographically smallest one whatever the file order.
  6. Documents longer than ``max_chars`` are split at paragraph (then line, then word) boundaries
     into parts ``<doc_id>-p<i>``; parts share ``dup_cluster`` = the original doc_id so the split
     stage keeps them on one side.

Incremental (``clean.incremental``, default on): ``clean/index.parquet`` keeps, per document that
passed validation, its input key (hash of the raw text and of its source's boilerplate set), its
verdict (kept, or the reject reason and the kept document it duplicates), and for kept documents the
exact-dup key and MinHash signature. On the next run a document whose key is unchanged is not cleaned
again: its output rows (or its reject) are copied from the previous output. New and changed
documents are cleaned and deduplicated against the stored signatures of the kept ones (which are
inserted first, in the order they were first kept, so an earlier decision never flips), then against
each other in doc_id order. A duplicate whose kept twin changed or disappeared is re-decided. The
index is only used while the clean config, seed, rules and code are those that built it; otherwise
the run is a full re-clean. The result equals a full re-clean whenever no new document is a
near-duplicate of an older one with a larger doc_id (there, full and incremental keep different
members of the cluster; incremental keeps the one already trained on).

Memory: texts stream batch by batch (pass 1 writes cleaned survivors to a staging file; pass 2
re-reads it, applies the dedup verdicts and writes the output). Only per-document hashes and MinHash
signatures (num_perm x 4 bytes) of the kept documents stay in memory, plus the LSH index: about
1 KB per kept document (56M documents of ~1,000 tokens: ~60 GB, so at that scale the dedup is run
per band on a cluster, see README "Scaling out"). Pass 1 runs in ``clean.workers`` processes, or on
Dask workers when an executor is given, with results taken in order: the output does not depend on
how it ran.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import math
import re
import unicodedata
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from prefect import task

from tasks.config import CATEGORIES, CleanConfig, PipelineConfig, config_from_dict, dump_resolved, load_config
from tasks.manifest import Stage, code_fingerprint, fingerprint, read_manifest, require_manifest
from tasks.textio import CategoryWriters, Progress, category_files, dask_executor, iter_batches, num_rows, ordered_map

log = logging.getLogger("tasks.clean")  # stable name also under python -m

# Bumped when the cleaning rules change, so existing outputs are rebuilt.
RULES_VERSION = 3
# the boilerplate share/doc thresholds are clean.boilerplate_* config fields
BOILERPLATE_MIN_LINE_CHARS = 12  # shorter lines ("Ingredients", "}") are structure, not boilerplate

# Input columns (the extract stage's contract); only doc_id, text and category are required.
COLUMNS = ("doc_id", "url", "final_url", "fetched_at", "sha256", "source_id", "category", "license", "title", "text", "fields")
REQUIRED = ("doc_id", "text")

# Quality profiles: code is exempt from the alpha/symbol rules, structured categories count letters
# without digits, every other category is prose.
STRUCTURED = frozenset({"product_compositions", "chemical_additives"})
CODE = frozenset({"code"})

REJECT_SCHEMA = pa.schema(
    [("doc_id", pa.string()), ("url", pa.string()), ("category", pa.string()),
     ("reason", pa.string()), ("detail", pa.string()), ("text", pa.string())]
)
STAGING = "_staging"

# ------------------------------------------------------------------------------ text cleanup
_ZERO_WIDTH = dict.fromkeys(map(ord, "\u200b\u200c\u200d\u2060\ufeff\u00ad"), None)
_CONTROL_RE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_SPACES_RE = re.compile(r"[ \t\u00a0\u2000-\u200a\u202f\u205f\u3000]+")
_BLANKS_RE = re.compile(r"\n{3,}")
_CODE_LIKE_RE = re.compile(
    r"[(){}\[\];=<>]|^\s*(import|from|def|class|return|#include|package|using|const|let|var|function|public|private)\b"
)


def normalize_text(text: str, form: str, code: bool = False) -> str:
    """Unicode form, unified newlines, no zero-width/control characters, no trailing spaces."""
    text = unicodedata.normalize(form, text).replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL_RE.sub("", text.translate(_ZERO_WIDTH))
    if code:  # indentation is syntax in code: only trailing whitespace goes
        lines = [ln.rstrip() for ln in text.split("\n")]
    else:
        lines = [_SPACES_RE.sub(" ", ln).strip() for ln in text.split("\n")]
    return "\n".join(lines)


def collapse_blank_lines(text: str) -> str:
    return _BLANKS_RE.sub("\n\n", text).strip("\n").rstrip()


def _line_key(line: str) -> bytes:
    return hashlib.blake2b(" ".join(line.split()).encode(), digest_size=8).digest()


def _boilerplate_candidate(line: str, code: bool) -> bool:
    s = line.strip()
    if len(s) < BOILERPLATE_MIN_LINE_CHARS or len(s.split()) < 3:
        return False
    # in code, repeated lines such as imports are content; only prose-looking lines can be footers
    return not (code and _CODE_LIKE_RE.search(s))


def remove_boilerplate(text: str, keys: frozenset[bytes], code: bool) -> tuple[str, int]:
    if not keys:
        return text, 0
    kept, removed = [], 0
    for ln in text.split("\n"):
        if _boilerplate_candidate(ln, code) and _line_key(ln) in keys:
            removed += 1
        else:
            kept.append(ln)
    return "\n".join(kept), removed


# ---------------------------------------------------------------------------------------- PII
EMAIL = "[EMAIL]"
PHONE = "[PHONE]"
_EMAIL_RE = re.compile(r"(?<![\w.+-])[A-Za-z0-9][A-Za-z0-9._%+-]*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
_PHONE_RE = re.compile(r"(?<![\w+/.-])(\+\d{1,3}[ .-]?)?(\(\d{1,4}\)[ .-]?)?\d{1,4}(?:[ .-]\d{2,4}){1,5}(?![\w/-]|[.,]\d)")
_DATE_RE = re.compile(r"\d{4}[-./]\d{1,2}[-./]\d{1,2}|\d{1,2}[-./]\d{1,2}[-./]\d{4}")
_NANP_RE = re.compile(r"\d{3}[ .-]\d{3}[ .-]\d{4}")


def _phone_or_not(m: re.Match[str]) -> str:
    """Decide whether a run of digit groups is a phone number; quantities, dates and versions stay."""
    s = m.group(0)
    digits = sum(c.isdigit() for c in s)
    if not 7 <= digits <= 15 or _DATE_RE.fullmatch(s):
        return s
    groups = re.split(r"[ .-]+", s)
    seps = set(re.findall(r"[ .-]", s))
    if s.startswith("+") or m.group(2) or _NANP_RE.fullmatch(s):
        return PHONE
    if len(groups) >= 3 and len(seps) == 1 and (seps <= {"-", "."} or s.startswith("0")):
        return PHONE  # 0xx xxx xxxx (national trunk prefix) or dash/dot-grouped numbers
    return s


def scrub_pii(text: str, phones: bool = True) -> tuple[str, int, int]:
    """Replace e-mail addresses and phone numbers with placeholders; returns (text, n_emails, n_phones)."""
    text, n_email = _EMAIL_RE.subn(EMAIL, text)
    n_phone = 0
    if phones:
        out = _PHONE_RE.sub(_phone_or_not, text)
        n_phone = out.count(PHONE) - text.count(PHONE)
        text = out
    return text, n_email, n_phone


# ---------------------------------------------------------------------------------- heuristics
_LETTER_RE = re.compile(r"[^\W\d_]")
_DIGIT_RE = re.compile(r"\d")
_SPACE_RE = re.compile(r"\s")
_SYMBOL_CHARS = frozenset("#*@&{}\\_|~^`<>=$")


def _is_symbol(ch: str) -> bool:
    return ch in _SYMBOL_CHARS or unicodedata.category(ch)[0] == "S"


def quality_reject(text: str, category: str, c: CleanConfig) -> tuple[str, str] | None:
    """(reason, detail) if the cleaned text fails the heuristics for its category, else None."""
    if not text.strip():
        return "empty", "no text left after cleaning"
    if len(text) < c.min_chars:
        return "too_short", f"{len(text)} chars < min_chars={c.min_chars}"
    if category in CODE:
        return None
    non_space = len(text) - len(_SPACE_RE.findall(text))
    denom = non_space - (len(_DIGIT_RE.findall(text)) if category in STRUCTURED else 0)
    alpha = len(_LETTER_RE.findall(text)) / max(denom, 1)
    if alpha < c.min_alpha_ratio:
        return "low_alpha", f"alpha ratio {alpha:.3f} < {c.min_alpha_ratio}"
    # per distinct character, not per character: a document has ~100 distinct ones and ~10^4 characters
    symbols = sum(text.count(ch) for ch in set(text) if not ch.isalnum() and not ch.isspace() and _is_symbol(ch))
    ratio = symbols / max(non_space, 1)
    if ratio > c.max_symbol_ratio:
        return "symbol_ratio", f"symbol ratio {ratio:.3f} > {c.max_symbol_ratio}"
    return None


# --------------------------------------------------------------------------- long documents
_SEPARATORS = ("\n\n", "\n", " ")


def split_parts(text: str, max_chars: int, level: int = 0) -> list[str]:
    """Split at paragraph boundaries into parts of <= max_chars; a paragraph that is itself too long
    falls back to line, then word boundaries, then a hard cut. Nothing is lost but separators."""
    if len(text) <= max_chars:
        return [text]
    if level == len(_SEPARATORS):
        return [text[i : i + max_chars] for i in range(0, len(text), max_chars)]
    sep = _SEPARATORS[level]
    parts: list[str] = []
    cur = ""
    for unit in text.split(sep):
        if len(unit) > max_chars:
            if cur:
                parts.append(cur)
                cur = ""
            parts.extend(split_parts(unit, max_chars, level + 1))
        elif cur and len(cur) + len(sep) + len(unit) > max_chars:
            parts.append(cur)
            cur = unit
        else:
            cur = f"{cur}{sep}{unit}" if cur else unit
    if cur:
        parts.append(cur)
    return [p for p in parts if p.strip()]


# ------------------------------------------------------------------------------------ dedup
_WORD_RE = re.compile(r"\w+")


def exact_key(text: str) -> bytes:
    return hashlib.sha256(" ".join(text.split()).encode()).digest()[:16]


def shingle_hash(data: bytes) -> int:
    """32-bit shingle hash for MinHash: xxh32 (datasketch's default, SHA-1, is ~3x slower per shingle)."""
    import xxhash

    return xxhash.xxh32_intdigest(data)


class Signer:
    """MinHash signatures of word shingles; permutations are drawn once from the seed and shared."""

    def __init__(self, num_perm: int, shingle_words: int, seed: int):
        from datasketch import MinHash

        self._MinHash = MinHash
        self.template = MinHash(num_perm=num_perm, seed=seed, hashfunc=shingle_hash)
        self.num_perm, self.k, self.seed = num_perm, shingle_words, seed

    def shingles(self, text: str) -> list[bytes]:
        words = _WORD_RE.findall(text.casefold())
        if len(words) <= self.k:
            return [" ".join(words).encode() or text.encode()]
        return [" ".join(words[i : i + self.k]).encode() for i in range(len(words) - self.k + 1)]

    def signature(self, text: str) -> np.ndarray:
        m = self._MinHash(
            num_perm=self.num_perm, seed=self.seed, permutations=self.template.permutations, scheme=self.template.scheme,
            hashfunc=shingle_hash,
        )
        m.update_batch(self.shingles(text))
        return m.hashvalues.copy()


@dataclass
class DedupResult:
    removed: dict[int, tuple[str, str]] = field(default_factory=dict)  # index -> (reason, detail)
    representative: dict[int, int] = field(default_factory=dict)  # near-dup index -> kept index


def dedup(doc_ids: list[str], keys: list[bytes], sigs: np.ndarray, threshold: float, seed: int, scheme: str,
          n_prior: int = 0) -> DedupResult:
    """Exact then near-duplicate removal. The first ``n_prior`` documents were kept by an earlier run:
    they are visited first, in the given order, and always stay. The rest are visited in doc_id order
    (deterministic, and the kept member of each new cluster is the smallest doc_id). A near-duplicate
    joins the kept document with the highest estimated Jaccard >= threshold (ties: the smaller doc_id)."""
    from datasketch import LeanMinHash, MinHashLSH

    res = DedupResult()
    order = list(range(n_prior)) + sorted(range(n_prior, len(doc_ids)), key=doc_ids.__getitem__)
    first: dict[bytes, int] = {}
    for i in order:
        j = first.setdefault(keys[i], i)
        if j != i:
            res.removed[i] = ("exact_duplicate", doc_ids[j])
    if len(sigs) == 0:
        return res
    # Every LSH candidate is verified against the threshold below, so a false positive only costs a
    # comparison while a false negative leaves a duplicate in: weight the band layout towards recall
    # (at threshold 0.7 and 128 permutations: a pair at J=0.79 is found with p=0.996, not 0.83).
    lsh = MinHashLSH(threshold=threshold, num_perm=sigs.shape[1], weights=(0.1, 0.9))
    for i in order:
        if i in res.removed:
            continue
        m = LeanMinHash(seed=seed, hashvalues=sigs[i], scheme=scheme)
        if i < n_prior:
            lsh.insert(i, m, check_duplication=False)
            continue
        best: tuple[float, str, int] | None = None
        for j in lsh.query(m):
            est = float(np.mean(sigs[i] == sigs[j]))
            if est >= threshold and (best is None or (-est, doc_ids[j]) < (-best[0], best[1])):
                best = (est, doc_ids[j], j)
        if best is None:
            lsh.insert(i, m, check_duplication=False)
        else:
            res.removed[i] = ("near_duplicate", f"{best[1]} jaccard~{best[0]:.3f}")
            res.representative[i] = best[2]
    return res


# -------------------------------------------------------------------------------- the stage
class _Rejects:
    """Buffered writer for rejects.parquet (always written, possibly empty)."""

    def __init__(self, path: Path, flush_rows: int = 10_000):
        self.path, self.flush_rows = path, flush_rows
        self.rows: list[dict[str, Any]] = []
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
        if len(self.rows) >= self.flush_rows:
            self.flush()

    def flush(self) -> None:
        if self.rows:
            self.writer.write_table(pa.Table.from_pylist(self.rows, schema=REJECT_SCHEMA))
            self.rows.clear()

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


def _sample_boilerplate(path: Path, c: CleanConfig, code: bool) -> dict[str, frozenset[bytes]]:
    """Per source: keys of lines found in >= boilerplate_min_fraction of its (sampled) documents."""
    cols = [x for x in ("source_id", "text") if x in pq.ParquetFile(path).schema_arrow.names]
    counts: dict[str, Counter[bytes]] = defaultdict(Counter)
    docs: Counter[str] = Counter()
    for batch in iter_batches(path, cols):
        d = batch.to_pydict()
        for src, text in zip(d.get("source_id") or [None] * batch.num_rows, d["text"]):
            src = src or ""
            if not isinstance(text, str) or docs[src] >= c.boilerplate_sample_docs:
                continue
            docs[src] += 1
            lines = normalize_text(text, c.unicode_form, code).split("\n")
            counts[src].update({_line_key(ln) for ln in lines if _boilerplate_candidate(ln, code)})
        if docs and all(n >= c.boilerplate_sample_docs for n in docs.values()):
            break
    out = {}
    for src, ctr in counts.items():
        need = max(c.boilerplate_min_docs, math.ceil(c.boilerplate_min_fraction * docs[src]))
        out[src] = frozenset(k for k, n in ctr.items() if n >= need)
        if out[src]:
            log.info("clean: %s source %r: %d boilerplate line(s) over %d docs", path.name, src, len(out[src]), docs[src])
    return out


def clean_text(text: str, category: str, boilerplate: frozenset[bytes], c: CleanConfig) -> tuple[str, dict[str, int]]:
    """One document through normalization, boilerplate removal and PII scrubbing."""
    code = category in CODE
    t = normalize_text(text, c.unicode_form, code)
    t, n_boiler = remove_boilerplate(t, boilerplate, code)
    t = collapse_blank_lines(t)
    n_email = n_phone = 0
    if c.scrub_pii:
        t, n_email, n_phone = scrub_pii(t, phones=not code)
    return t, {"boilerplate_lines": n_boiler, "emails_scrubbed": n_email, "phones_scrubbed": n_phone}


_SIGNERS: dict[tuple[int, int, int], Signer] = {}


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


INDEX = "index.parquet"
# validation verdicts are recomputed every run (cheap); only the rest is remembered in the index
VALIDATION_REASONS = frozenset({"missing_doc_id", "unknown_category", "category_mismatch", "empty", "duplicate_doc_id"})


def _stage_config(cfg: PipelineConfig) -> dict[str, Any]:
    rules = {"version": RULES_VERSION, "boilerplate_min_line_chars": BOILERPLATE_MIN_LINE_CHARS}
    # workers and incremental change how the output is made, not what it is
    section = {k: v for k, v in cfg.section("clean").items() if k not in ("workers", "incremental")}
    return {"clean": section, "seed": cfg.seed, "rules": rules}


def stage_for(cfg: PipelineConfig) -> Stage:
    extracted = require_manifest(cfg.root / "extracted", "extract")
    return Stage("clean", cfg.root / "clean", _stage_config(cfg), {"extracted": extracted["fingerprint"]})


def _index_key(cfg: PipelineConfig) -> str:
    """What the stored verdicts depend on besides the documents: config, seed, rules, code."""
    return fingerprint({"config": _stage_config(cfg), "code": code_fingerprint("clean")})


def input_key(text: str, boilerplate: frozenset[bytes]) -> bytes:
    """A document's cleaned text depends on its raw text and on its source's boilerplate lines."""
    h = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16)
    for k in sorted(boilerplate):
        h.update(k)
    return h.digest()


@dataclass
class PriorIndex:
    """The previous run's verdicts, by doc_id: (input key, category, status, dup_of, exact key, signature, seq)."""

    rows: dict[str, tuple] = field(default_factory=dict)

    @classmethod
    def load(cls, clean_dir: Path, key: str) -> PriorIndex:
        m = read_manifest(clean_dir)
        path = clean_dir / INDEX
        if not m or m.get("index_key") != key or not path.is_file():
            if m:
                log.info("clean: no usable index in %s (config, rules or code changed): full re-clean", clean_dir)
            return cls()
        t = pq.read_table(path)
        cols = [t.column(c).to_pylist() for c in ("doc_id", "input_key", "category", "status", "dup_of", "exact_key", "sig", "seq")]
        return cls({r[0]: r[1:] for r in zip(*cols)})


INDEX_SCHEMA = pa.schema([("doc_id", pa.string()), ("input_key", pa.binary(16)), ("category", pa.string()),
                          ("status", pa.string()), ("dup_of", pa.string()), ("exact_key", pa.binary(16)),
                          ("sig", pa.binary()), ("seq", pa.int64())])


def _reusable(prior: PriorIndex, current: dict[str, tuple[bytes, str]]) -> set[str]:
    """Doc ids whose stored verdict still holds: same input key and category, and, for a duplicate,
    a kept twin that is itself reused (else the duplicate must be decided again)."""
    same = {d for d, (k, cat) in current.items() if (r := prior.rows.get(d)) is not None and r[0] == k and r[1] == cat}
    kept = {d for d in same if prior.rows[d][2] == "kept"}
    return {d for d in same if prior.rows[d][2] == "kept" or prior.rows[d][3] is None or prior.rows[d][3] in kept}


def run_clean(cfg: PipelineConfig, workers: int | None = None, executor=None) -> dict[str, Any]:
    """Clean + dedup ``<root>/extracted`` into ``<root>/clean``; returns the manifest.

    ``workers`` (default ``clean.workers``) > 1 cleans and signs batches in that many processes,
    ``executor`` (a Dask client) on a cluster; the output is identical either way.
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
    scheme = Signer(c.num_perm, c.shingle_words, cfg.seed).template.scheme
    index_key = _index_key(cfg)
    prior = PriorIndex.load(stage.out_dir, index_key) if c.incremental else PriorIndex()
    for path in files.values():  # fail early, naming the file
        missing = [x for x in REQUIRED if x not in _schema_names(path)]
        if missing:
            raise ValueError(f"{path}: missing required column(s) {missing}; cannot clean this file")
    boilers = {cat: _sample_boilerplate(path, c, cat in CODE) if cat in CATEGORIES else {} for cat, path in files.items()}

    # ---- pass 0 (only with an index): which documents can keep their stored verdict
    reuse: set[str] = set()
    if prior.rows:
        current: dict[str, tuple[bytes, str]] = {}
        for cat, path in files.items():
            for batch in iter_batches(path, [x for x in ("doc_id", "text", "source_id") if x in _schema_names(path)]):
                d = batch.to_pydict()
                for i, (doc_id, text) in enumerate(zip(d["doc_id"], d["text"])):
                    if isinstance(doc_id, str) and isinstance(text, str) and doc_id not in current:
                        src = (d.get("source_id") or [None] * batch.num_rows)[i] or ""
                        current[doc_id] = (input_key(text, boilers[cat].get(src, frozenset())), cat)
        reuse = _reusable(prior, current)
        del current
        log.info("clean: incremental: %d of %d indexed documents unchanged; cleaning the rest", len(reuse), len(prior.rows))

    per_cat: dict[str, Counter[str]] = defaultdict(Counter)
    totals: Counter[str] = Counter()
    # dedup inputs: earlier runs' kept documents first (in the order they were kept), then this run's survivors
    prior_kept = sorted((d for d in reuse if prior.rows[d][2] == "kept"), key=lambda d: prior.rows[d][6])
    ids: list[str] = list(prior_kept)
    keys: list[bytes] = [prior.rows[d][4] for d in prior_kept]
    sigs: list[np.ndarray] = [np.frombuffer(prior.rows[d][5], dtype=np.uint64) for d in prior_kept]
    cats: list[str] = [prior.rows[d][1] for d in prior_kept]
    n_prior = len(ids)
    new_keys: dict[str, bytes] = {}  # input key of every document cleaned this run
    new_status: dict[str, tuple[str, str]] = {}  # quality rejects of this run: (reason, category)
    seen_ids: set[str] = set()
    warned: set[str] = set()

    with stage.building() as work:
        rejects = _Rejects(work / "rejects.parquet")
        staging = work / STAGING
        # ---- pass 1: validate (here: needs the global doc_id set), then clean, score and sign each
        # batch of new or changed documents (in worker processes or on Dask workers; results come
        # back in order), stage survivors
        def prepared():
            for file_cat, path in files.items():
                boiler = boilers[file_cat]
                prog = Progress(log, f"clean {file_cat}", num_rows(path))
                rel = _relative(path, cfg.root)  # the data root's own path would make outputs depend on where it lives
                row0 = 0
                for batch in iter_batches(path):
                    t = _conform(batch, path, warned)
                    d = t.to_pydict()
                    cand: list[int] = []
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
                        elif doc_id in seen_ids:
                            verdict = ("duplicate_doc_id", f"{where}: doc_id {doc_id!r} seen before")
                        if verdict is not None:
                            if c.scrub_pii and isinstance(text, str):  # quarantine is no place for PII either
                                text = scrub_pii(text)[0]
                            rejects.add(doc_id, d["url"][i], cat, *verdict, text, where=where)
                            per_cat[file_cat]["rejected"] += 1
                        else:
                            seen_ids.add(doc_id)
                            if doc_id in reuse:
                                per_cat[file_cat]["reused"] += 1
                            else:
                                cand.append(i)
                                new_keys[doc_id] = input_key(text, boiler.get(d["source_id"][i] or "", frozenset()))
                    srcs = [d["source_id"][i] or "" for i in cand]
                    job = ([d["text"][i] for i in cand], file_cat, srcs,
                           {s_: boiler[s_] for s_ in set(srcs) if s_ in boiler}, c.model_dump(), cfg.seed)
                    yield (file_cat, t, d, cand), job
                    row0 += t.num_rows
                    prog.update(t.num_rows)

        with CategoryWriters(staging) as stage_out:
            for (file_cat, t, d, cand), results in ordered_map(_clean_batch, prepared(), workers, executor=executor):
                keep_idx: list[int] = []
                texts: list[str] = []
                for i, (cleaned, stats, q, key, sig) in zip(cand, results):
                    totals.update(stats)
                    per_cat[file_cat]["cleaned"] += 1
                    if q is not None:
                        rejects.add(d["doc_id"][i], d["url"][i], file_cat, *q, cleaned)
                        per_cat[file_cat]["rejected"] += 1
                        new_status[d["doc_id"][i]] = (q[0], file_cat)
                        continue
                    keep_idx.append(i)
                    texts.append(cleaned)
                    ids.append(d["doc_id"][i])
                    keys.append(key)
                    sigs.append(sig)
                    cats.append(file_cat)
                if keep_idx:
                    out = t.take(pa.array(keep_idx, pa.int64()))
                    out = out.set_column(COLUMNS.index("text"), "text", pa.array(texts, pa.string()))
                    out = out.set_column(COLUMNS.index("category"), "category", pa.array([file_cat] * len(keep_idx), pa.string()))
                    stage_out.write(file_cat, out)

        # ---- dedup over the whole corpus, in memory on hashes and signatures
        sig_arr = np.stack(sigs) if sigs else np.zeros((0, c.num_perm), np.uint64)
        res = dedup(ids, keys, sig_arr, c.near_dup_threshold, cfg.seed, scheme, n_prior=n_prior)
        clusters: dict[str, set[str]] = defaultdict(set)  # category -> kept doc_ids that absorbed near-dups
        for i, rep in res.representative.items():
            clusters[cats[i]].add(ids[rep])

        # ---- the index for the next run: reused entries as they were, this run's documents as decided now
        index_rows: list[dict[str, Any]] = []
        seq = 1 + max((prior.rows[d][6] for d in prior_kept), default=-1)
        for d in sorted(reuse):
            r = prior.rows[d]
            index_rows.append(dict(zip(INDEX_SCHEMA.names, (d, *r))))
            if r[2] != "kept":
                per_cat[r[1]]["rejected"] += 1
        for i in range(n_prior, len(ids)):
            v = res.removed.get(i)
            status, dup_of = ("kept", None) if v is None else (v[0], v[1].split(" ")[0])
            index_rows.append({"doc_id": ids[i], "input_key": new_keys[ids[i]], "category": cats[i], "status": status,
                               "dup_of": dup_of, "exact_key": keys[i] if v is None else None,
                               "sig": sigs[i].astype(np.uint64).tobytes() if v is None else None,
                               "seq": seq if v is None else None})
            seq += v is None
        for d, (reason, cat) in new_status.items():
            index_rows.append({"doc_id": d, "input_key": new_keys[d], "category": cat, "status": reason,
                               "dup_of": None, "exact_key": None, "sig": None, "seq": None})
        del sigs, keys

        # ---- pass 2: reused output copied from the previous run, then this run's verdicts applied,
        # long documents split, output written
        reused_kept = {d for d in reuse if prior.rows[d][2] == "kept"}
        reused_rejected = {(d, prior.rows[d][2]) for d in reuse if prior.rows[d][2] != "kept"}
        idx = n_prior
        with CategoryWriters(work) as final:
            for cat in CATEGORIES:
                old = stage.out_dir / f"{cat}.parquet"
                if reused_kept and old.is_file():
                    last = None
                    for batch in iter_batches(old):
                        t = pa.Table.from_batches([batch])
                        mask = pa.array([x in reused_kept for x in t.column("dup_cluster").to_pylist()], pa.bool_())
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
                for batch in iter_batches(sp):
                    d = batch.to_pydict()
                    take: list[int] = []
                    out_ids: list[str] = []
                    out_texts: list[str] = []
                    clusters_col: list[str] = []
                    for i in range(batch.num_rows):
                        doc_id, text = d["doc_id"][i], d["text"][i]
                        if (verdict := res.removed.get(idx)) is not None:
                            rejects.add(doc_id, d["url"][i], cat, *verdict, text)
                            per_cat[cat]["rejected"] += 1
                            per_cat[cat]["exact_dup_removed" if verdict[0] == "exact_duplicate" else "near_dup_removed"] += 1
                        else:
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
                        out = pa.Table.from_batches([batch]).take(pa.array(take, pa.int64()))
                        out = out.set_column(COLUMNS.index("doc_id"), "doc_id", pa.array(out_ids, pa.string()))
                        out = out.set_column(COLUMNS.index("text"), "text", pa.array(out_texts, pa.string()))
                        out = out.append_column("n_chars", pa.array([len(x) for x in out_texts], pa.int64()))
                        out = out.append_column("dup_cluster", pa.array(clusters_col, pa.string()))
                        final.write(cat, out)
                        per_cat[cat]["rows_out"] += len(take)
                        per_cat[cat]["chars_out"] += sum(len(x) for x in out_texts)
            written = final.keys
        assert idx == len(ids), f"clean: staging has {idx - n_prior} rows, pass 1 kept {len(ids) - n_prior}"
        # reused rejects: copied from the previous rejects file (validation rejects were recomputed above)
        old_rej = stage.out_dir / "rejects.parquet"
        if reused_rejected and old_rej.is_file():
            for batch in iter_batches(old_rej):
                for r in batch.to_pylist():
                    if (r["doc_id"], r["reason"]) in reused_rejected:
                        rejects.add(r["doc_id"], r["url"], r["category"], r["reason"], r["detail"], r["text"])
                        if r["reason"] == "exact_duplicate":
                            per_cat[r["category"]]["exact_dup_removed"] += 1
                        elif r["reason"] == "near_duplicate":
                            per_cat[r["category"]]["near_dup_removed"] += 1
                            clusters[r["category"]].add(prior.rows[r["doc_id"]][3])
        for cat, reps in clusters.items():
            per_cat[cat]["near_dup_clusters"] = len(reps)
        rejects.close()
        _remove_tree(staging)
        pq.write_table(pa.Table.from_pylist(index_rows, schema=INDEX_SCHEMA), work / INDEX)

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


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Clean and deduplicate the extracted corpus.")
    ap.add_argument("--config", required=True)
    ap.add_argument("--workers", type=int, default=None, help="processes for cleaning and MinHash (default clean.workers)")
    ap.add_argument("overrides", nargs="*", help="section.key=value")
    a = ap.parse_args(argv)
    # force: importing prefect already configured the root logger at WARNING, which would hide progress
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    m = run_clean(load_config(a.config, a.overrides), workers=a.workers)
    k = m["counts"]
    print(f"clean: {k['documents_in']} in, {k['kept']} kept, {k['rejected']} rejected {k['rejects_by_reason']}")


if __name__ == "__main__":
    main()
