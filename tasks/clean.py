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

Memory: texts stream batch by batch (pass 1 writes cleaned survivors to a staging file; pass 2
re-reads it, applies the dedup verdicts and writes the output). Only per-document hashes and MinHash
signatures (num_perm x 4 bytes) stay in memory, plus the LSH index.
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
import pyarrow.parquet as pq
from prefect import task

from tasks.config import CATEGORIES, CleanConfig, PipelineConfig, config_from_dict, dump_resolved, load_config
from tasks.manifest import Stage, require_manifest
from tasks.textio import CategoryWriters, Progress, category_files, iter_batches, num_rows, ordered_map

log = logging.getLogger("tasks.clean")  # stable name also under python -m

# Bumped when the cleaning rules change, so existing outputs are rebuilt.
RULES_VERSION = 1
BOILERPLATE_MIN_FRACTION = 0.30  # of a source's (sampled) documents
BOILERPLATE_MIN_DOCS = 3
BOILERPLATE_SAMPLE_DOCS = 5000  # per source: bounded memory for the line counts
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
    symbols = sum(1 for ch in text if not ch.isalnum() and not ch.isspace() and _is_symbol(ch))
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


class Signer:
    """MinHash signatures of word shingles; permutations are drawn once from the seed and shared."""

    def __init__(self, num_perm: int, shingle_words: int, seed: int):
        from datasketch import MinHash

        self._MinHash = MinHash
        self.template = MinHash(num_perm=num_perm, seed=seed)
        self.num_perm, self.k, self.seed = num_perm, shingle_words, seed

    def shingles(self, text: str) -> list[bytes]:
        words = _WORD_RE.findall(text.casefold())
        if len(words) <= self.k:
            return [" ".join(words).encode() or text.encode()]
        return [" ".join(words[i : i + self.k]).encode() for i in range(len(words) - self.k + 1)]

    def signature(self, text: str) -> np.ndarray:
        m = self._MinHash(
            num_perm=self.num_perm, seed=self.seed, permutations=self.template.permutations, scheme=self.template.scheme
        )
        m.update_batch(self.shingles(text))
        return m.hashvalues.copy()


@dataclass
class DedupResult:
    removed: dict[int, tuple[str, str]] = field(default_factory=dict)  # index -> (reason, detail)
    representative: dict[int, int] = field(default_factory=dict)  # near-dup index -> kept index


def dedup(doc_ids: list[str], keys: list[bytes], sigs: np.ndarray, threshold: float, seed: int, scheme: str) -> DedupResult:
    """Exact then near-duplicate removal, visiting documents in doc_id order (deterministic, and the
    kept member of each cluster is the smallest doc_id). A near-duplicate joins the kept document
    with the highest estimated Jaccard >= threshold (ties: the smaller doc_id)."""
    from datasketch import LeanMinHash, MinHashLSH

    res = DedupResult()
    order = sorted(range(len(doc_ids)), key=doc_ids.__getitem__)
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
    """Per source: keys of lines found in >= BOILERPLATE_MIN_FRACTION of its (sampled) documents."""
    cols = [x for x in ("source_id", "text") if x in pq.ParquetFile(path).schema_arrow.names]
    counts: dict[str, Counter[bytes]] = defaultdict(Counter)
    docs: Counter[str] = Counter()
    for batch in iter_batches(path, cols):
        d = batch.to_pydict()
        for src, text in zip(d.get("source_id") or [None] * batch.num_rows, d["text"]):
            src = src or ""
            if not isinstance(text, str) or docs[src] >= BOILERPLATE_SAMPLE_DOCS:
                continue
            docs[src] += 1
            lines = normalize_text(text, c.unicode_form, code).split("\n")
            counts[src].update({_line_key(ln) for ln in lines if _boilerplate_candidate(ln, code)})
        if docs and all(n >= BOILERPLATE_SAMPLE_DOCS for n in docs.values()):
            break
    out = {}
    for src, ctr in counts.items():
        need = max(BOILERPLATE_MIN_DOCS, math.ceil(BOILERPLATE_MIN_FRACTION * docs[src]))
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


def stage_for(cfg: PipelineConfig) -> Stage:
    extracted = require_manifest(cfg.root / "extracted", "extract")
    rules = {"version": RULES_VERSION, "boilerplate": [BOILERPLATE_MIN_FRACTION, BOILERPLATE_MIN_DOCS,
             BOILERPLATE_SAMPLE_DOCS, BOILERPLATE_MIN_LINE_CHARS]}
    return Stage("clean", cfg.root / "clean", {"clean": cfg.section("clean"), "seed": cfg.seed, "rules": rules},
                 {"extracted": extracted["fingerprint"]})


def run_clean(cfg: PipelineConfig, workers: int = 1) -> dict[str, Any]:
    """Clean + dedup ``<root>/extracted`` into ``<root>/clean``; returns the manifest.

    ``workers`` > 1 cleans and signs batches in that many processes; the output is identical.
    """
    c = cfg.clean
    stage = stage_for(cfg)
    if (m := stage.up_to_date()) is not None:
        log.info("clean: up to date (%s)", stage.out_dir)
        return m
    in_dir = cfg.root / "extracted"
    files = category_files(in_dir, include_unknown=True)
    if not files:
        log.warning("clean: no category files in %s", in_dir)
    scheme = Signer(c.num_perm, c.shingle_words, cfg.seed).template.scheme

    per_cat: dict[str, Counter[str]] = defaultdict(Counter)
    totals: Counter[str] = Counter()
    # survivors of pass 1, in staging order: what dedup needs and nothing more
    ids: list[str] = []
    keys: list[bytes] = []
    sigs: list[np.ndarray] = []
    cats: list[str] = []
    seen_ids: set[str] = set()
    warned: set[str] = set()

    with stage.building() as work:
        rejects = _Rejects(work / "rejects.parquet")
        staging = work / STAGING
        # ---- pass 1: validate (here: needs the global doc_id set), then clean, score and sign each
        # batch (in worker processes when workers > 1; results come back in order), stage survivors
        def prepared():
            for file_cat, path in files.items():
                missing = [x for x in REQUIRED if x not in _schema_names(path)]
                if missing:
                    raise ValueError(f"{path}: missing required column(s) {missing}; cannot clean this file")
                boiler = _sample_boilerplate(path, c, file_cat in CODE) if file_cat in CATEGORIES else {}
                prog = Progress(log, f"clean {file_cat}", num_rows(path))
                row0 = 0
                for batch in iter_batches(path):
                    t = _conform(batch, path, warned)
                    d = t.to_pydict()
                    cand: list[int] = []
                    for i in range(t.num_rows):
                        where = f"{path} row {row0 + i}"
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
                            cand.append(i)
                    srcs = [d["source_id"][i] or "" for i in cand]
                    job = ([d["text"][i] for i in cand], file_cat, srcs,
                           {s_: boiler[s_] for s_ in set(srcs) if s_ in boiler}, c.model_dump(), cfg.seed)
                    yield (file_cat, t, d, cand), job
                    row0 += t.num_rows
                    prog.update(t.num_rows)

        with CategoryWriters(staging) as stage_out:
            for (file_cat, t, d, cand), results in ordered_map(_clean_batch, prepared(), workers):
                keep_idx: list[int] = []
                texts: list[str] = []
                for i, (cleaned, stats, q, key, sig) in zip(cand, results):
                    totals.update(stats)
                    if q is not None:
                        rejects.add(d["doc_id"][i], d["url"][i], file_cat, *q, cleaned)
                        per_cat[file_cat]["rejected"] += 1
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
        sig_arr = np.stack(sigs) if sigs else np.zeros((0, c.num_perm), np.uint32)
        res = dedup(ids, keys, sig_arr, c.near_dup_threshold, cfg.seed, scheme)
        del sigs, keys
        clusters: dict[str, set[int]] = defaultdict(set)
        for i, rep in res.representative.items():
            clusters[cats[i]].add(rep)
        for cat, reps in clusters.items():
            per_cat[cat]["near_dup_clusters"] = len(reps)

        # ---- pass 2: apply verdicts, split long documents, write the output
        idx = 0
        with CategoryWriters(work) as final:
            for cat in CATEGORIES:
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
                            for p, part in enumerate(parts):
                                take.append(i)
                                out_ids.append(doc_id if len(parts) == 1 else f"{doc_id}-p{p}")
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
        assert idx == len(ids), f"clean: staging has {idx} rows, pass 1 kept {len(ids)}"
        rejects.close()
        _remove_tree(staging)

        # ---- counts: every input row is kept or rejected
        fields = ("documents_in", "kept", "rejected", "rows_out", "chars_out", "split_documents",
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
            "rows_out": sum(v["rows_out"] for v in per_cat.values()),
            "split_documents": sum(v["split_documents"] for v in per_cat.values()),
            "rejects_by_reason": dict(sorted(rejects.by_reason.items())),
            "near_dup_clusters_removed": {k: v["near_dup_clusters"] for k, v in by_cat.items() if k in CATEGORIES},
            "by_category": by_cat, **dict(totals),
        }
        dump_resolved(cfg, work / "config.yaml")
        m = stage.manifest(work, counts, categories=written)
    log.info("clean: %d in, %d kept (%d rows), %d rejected %s", n_in, n_kept, counts["rows_out"], n_rej, counts["rejects_by_reason"])
    return m


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
def clean(cfg_dict: dict, workers: int = 1) -> dict:
    return run_clean(config_from_dict(cfg_dict), workers=workers)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Clean and deduplicate the extracted corpus.")
    ap.add_argument("--config", required=True)
    ap.add_argument("--workers", type=int, default=1, help="processes for cleaning and MinHash (default 1)")
    ap.add_argument("overrides", nargs="*", help="section.key=value")
    a = ap.parse_args(argv)
    # force: importing prefect already configured the root logger at WARNING, which would hide progress
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    m = run_clean(load_config(a.config, a.overrides), workers=a.workers)
    k = m["counts"]
    print(f"clean: {k['documents_in']} in, {k['kept']} kept, {k['rejected']} rejected {k['rejects_by_reason']}")


if __name__ == "__main__":
    main()
