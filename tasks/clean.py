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
     ``cfg.seed``; see ``tasks/dedup.py``), visiting documents in doc_id order so the kept member of
     each cluster is the lexicographically smallest one whatever the file order.
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
re-reads it, applies the dedup verdicts and writes the output). Signatures (num_perm x 4 bytes),
exact keys and LSH band records go to disk and the dedup runs partition by partition
(``tasks/dedup.py``: ``ExternalDedup``), so they do not grow memory with the corpus; the index is
written in batches. No Python object is kept per document: the seen-before test for doc ids needs
only the ids that occur more than once (found by an external sort of 16-byte id hashes), each
survivor's input key travels through the staging file, and the incremental verdicts are sorted
numpy arrays of 16-byte hashes (of the reused documents only). Pass 1 runs in ``clean.workers``
processes, or on Dask workers when an executor is given, with results taken in order: the output
does not depend on how it ran.
"""

from __future__ import annotations

import argparse
import functools
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
from tasks.dedup import ExternalDedup, Signer, code_points, repeated_keys
from tasks.manifest import Stage, code_fingerprint, fingerprint, read_manifest, require_manifest
from tasks.textio import CategoryWriters, Progress, category_files, dask_executor, iter_batches, num_rows, ordered_map

log = logging.getLogger("tasks.clean")  # stable name also under python -m

# Bumped when the cleaning rules change, so existing outputs are rebuilt.
RULES_VERSION = 4  # 4: numpy MinHash signatures (uint32), external dedup
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
INPUT_KEY_COL = "_input_key"  # staging only: each survivor's input key, for its index row in pass 2
DEDUP_MEMORY_BYTES = 256 << 20  # what one dedup partition may take while it is sorted
# rows per batch read, cleaned and staged: a batch's texts, their cleaned copies, the Arrow tables and
# the writers' buffers all scale with it (measured peak RSS at 2k -> 20k docs: 1024 rows 341 -> 410 MB,
# 256 rows 301 -> 321 MB, at the same speed)
BATCH_ROWS = 256

# ------------------------------------------------------------------------------ text cleanup
_ZERO_WIDTH_CHARS = "\u200b\u200c\u200d\u2060\ufeff\u00ad"
_ZERO_WIDTH = dict.fromkeys(map(ord, _ZERO_WIDTH_CHARS), None)
_CONTROL_RE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_CONTROL_BYTES = bytes([*range(0x09), 0x0B, 0x0C, *range(0x0E, 0x20), 0x7F])
_SPACES_RE = re.compile(r"[ \t\u00a0\u2000-\u200a\u202f\u205f\u3000]+")
# whitespace other than space, tab and newline: where it occurs, lines take the general per-line path
_ODD_SPACE_RE = re.compile(r"[^\S \t\n]")
_TRAILING_RE = re.compile(r"[ \t]+\n")
_MULTI_SPACE_RE = re.compile(r"  +")
_BLANKS_RE = re.compile(r"\n{3,}")
_CODE_LIKE_RE = re.compile(
    r"[(){}\[\];=<>]|^\s*(import|from|def|class|return|#include|package|using|const|let|var|function|public|private)\b"
)


def _has_control(text: str) -> bool:
    b = text.encode("utf-8", "surrogatepass")
    if len(b.translate(None, _CONTROL_BYTES)) != len(b):
        return True
    # C1 controls (U+0080..U+009F) are 0xC2 0x80..0x9F in UTF-8; 0xC2 alone also starts common
    # characters (nbsp, degree sign), so only then is the regex asked
    return b"\xc2" in b and _CONTROL_RE.search(text) is not None


def normalize_text(text: str, form: str, code: bool = False) -> str:
    """Unicode form, unified newlines, no zero-width/control characters, no trailing spaces.

    Each step first checks (with C-speed string methods) whether it has anything to do: most
    documents need none of them, and the per-line regex pass was the stage's largest cost."""
    if not text.isascii():  # ASCII is already in every normal form and has no zero-width characters
        text = unicodedata.normalize(form, text)
        if any(ch in text for ch in _ZERO_WIDTH_CHARS):
            text = text.translate(_ZERO_WIDTH)
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if _has_control(text):
        text = _CONTROL_RE.sub("", text)
    if not text.isascii() and _ODD_SPACE_RE.search(text):
        return _normalize_lines(text, code)
    # from here the only whitespace is space, tab and newline
    if code:  # indentation is syntax in code: only trailing whitespace goes
        if " \n" in text or "\t\n" in text:
            text = _TRAILING_RE.sub("\n", text)
        return text.rstrip(" \t")
    # runs of spaces and tabs become one space (a tab becomes a space first: same runs, same result)
    if "\t" in text:
        text = text.replace("\t", " ")
    if "  " in text:
        text = _MULTI_SPACE_RE.sub(" ", text)
    # single spaces only: strip each line's one leading/trailing space
    if " \n" in text:
        text = text.replace(" \n", "\n")
    if "\n " in text:
        text = text.replace("\n ", "\n")
    return text.strip(" ")


def _normalize_lines(text: str, code: bool) -> str:
    """The general path: every line on its own."""
    if code:
        lines = [ln.rstrip() for ln in text.split("\n")]
    else:
        lines = [_SPACES_RE.sub(" ", ln).strip() for ln in text.split("\n")]
    return "\n".join(lines)


def collapse_blank_lines(text: str) -> str:
    if "\n\n\n" in text:
        text = _BLANKS_RE.sub("\n\n", text)
    return text.strip("\n").rstrip()


def _canonical_line(line: str) -> str:
    return " ".join(line.split())


def _line_key(line: str) -> bytes:
    return hashlib.blake2b(_canonical_line(line).encode(), digest_size=8).digest()


def _boilerplate_candidate(line: str, code: bool) -> str | None:
    """The line's whitespace-collapsed form if it could be boilerplate, else None."""
    words = line.split()
    if len(words) < 3:
        return None
    s = line.strip()
    # in code, repeated lines such as imports are content; only prose-looking lines can be footers
    if len(s) < BOILERPLATE_MIN_LINE_CHARS or (code and _CODE_LIKE_RE.search(s)):
        return None
    return " ".join(words)


@functools.lru_cache(maxsize=1024)
def _first_words(lines: frozenset[str]) -> tuple[str, ...]:
    return tuple({ln.split(" ", 1)[0] for ln in lines})


def remove_boilerplate(text: str, lines: frozenset[str], code: bool) -> tuple[str, int]:
    """Drop the lines whose whitespace-collapsed form is one of the source's boilerplate lines (a
    line not starting with one of their first words cannot be one: checked first, at C speed)."""
    if not lines:
        return text, 0
    first = _first_words(lines)
    kept, removed = [], 0
    for ln in text.split("\n"):
        if ln.lstrip().startswith(first) and _boilerplate_candidate(ln, code) in lines:
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


# A phone match starts with "+", "(" or a digit and consumes only digits and " ().+-", so it lies inside
# a match of this (greedy) run pattern; a run with fewer than 7 digits never holds a phone number.
_PHONE_RUN_RE = re.compile(r"[\d(+][\d ().+-]{6,}")


def _phone_windows(text: str) -> list[tuple[int, int]]:
    """Slices of ``text`` outside which ``_PHONE_RE.sub(_phone_or_not, ...)`` changes nothing: runs
    holding >= 7 digits, with one character of context before (the look-behind; it cannot start a
    match) and two after (the look-ahead)."""
    windows: list[tuple[int, int]] = []
    for m in _PHONE_RUN_RE.finditer(text):
        if sum(ch.isdigit() for ch in m.group()) < 7:
            continue
        a, b = max(m.start() - 1, 0), min(m.end() + 2, len(text))
        if windows and a <= windows[-1][1]:
            windows[-1] = (windows[-1][0], b)
        else:
            windows.append((a, b))
    return windows


def scrub_pii(text: str, phones: bool = True) -> tuple[str, int, int]:
    """Replace e-mail addresses and phone numbers with placeholders; returns (text, n_emails, n_phones)."""
    n_email = 0
    if "@" in text:  # every e-mail match has one
        text, n_email = _EMAIL_RE.subn(EMAIL, text)
    n_phone = 0
    if phones:
        windows = _phone_windows(text)
        if windows:
            parts, pos = [], 0
            for a, b in windows:
                parts += [text[pos:a], _PHONE_RE.sub(_phone_or_not, text[a:b])]
                pos = b
            parts.append(text[pos:])
            out = "".join(parts)
        else:
            out = text
        if out is not text:
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


@functools.lru_cache(maxsize=8192)
def _char_classes(code: int) -> tuple[int, int, int, int]:
    """(letter, digit, space, symbol) flags of one character, by the same rules as the regexes."""
    ch = chr(code)
    symbol = not ch.isalnum() and not ch.isspace() and _is_symbol(ch)
    return (int(bool(_LETTER_RE.match(ch))), int(bool(_DIGIT_RE.match(ch))), int(bool(_SPACE_RE.match(ch))), int(symbol))


_ASCII_CLASSES = np.array([_char_classes(i) for i in range(128)], dtype=np.int64).T  # 4 x 128


def char_counts(text: str) -> tuple[int, int, int, int]:
    """Numbers of letters, digits, whitespace and symbol characters: a histogram of the ASCII code
    points, and the distinct non-ASCII characters classified one by one."""
    cp = code_points(text)
    hist = np.bincount(np.minimum(cp, 128), minlength=129)
    counts = _ASCII_CLASSES @ hist[:128]
    if hist[128]:
        codes, n = np.unique(cp[cp > 127], return_counts=True)
        counts = counts + np.array([_char_classes(x) for x in codes.tolist()], dtype=np.int64).T @ n
    return tuple(int(x) for x in counts)  # type: ignore[return-value]


def quality_reject(text: str, category: str, c: CleanConfig) -> tuple[str, str] | None:
    """(reason, detail) if the cleaned text fails the heuristics for its category, else None."""
    if not text.strip():
        return "empty", "no text left after cleaning"
    if len(text) < c.min_chars:
        return "too_short", f"{len(text)} chars < min_chars={c.min_chars}"
    if category in CODE:
        return None
    letters, digits, spaces, symbols = char_counts(text)
    non_space = len(text) - spaces
    denom = non_space - (digits if category in STRUCTURED else 0)
    alpha = letters / max(denom, 1)
    if alpha < c.min_alpha_ratio:
        return "low_alpha", f"alpha ratio {alpha:.3f} < {c.min_alpha_ratio}"
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
def exact_key(text: str) -> bytes:
    return hashlib.sha256(" ".join(text.split()).encode()).digest()[:16]


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


def clean_text(text: str, category: str, boilerplate: frozenset[str], c: CleanConfig) -> tuple[str, dict[str, int]]:
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

        # ---- dedup over the whole corpus, on disk (see tasks/dedup.py)
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
                        out = pa.Table.from_batches([batch]).drop_columns([INPUT_KEY_COL]).take(pa.array(take, pa.int64()))
                        out = out.set_column(COLUMNS.index("doc_id"), "doc_id", pa.array(out_ids, pa.string()))
                        out = out.set_column(COLUMNS.index("text"), "text", pa.array(out_texts, pa.string()))
                        out = out.append_column("n_chars", pa.array([len(x) for x in out_texts], pa.int64()))
                        out = out.append_column("dup_cluster", pa.array(clusters_col, pa.string()))
                        final.write(cat, out)
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
