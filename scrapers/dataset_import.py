"""Import free datasets (JSONL, CSV/TSV, Parquet, a `datasets` dataset saved to disk) into the raw format.

A source with ``kind: dataset`` names a local ``path``, its ``format`` and which columns hold the text,
title, id, original URL and structured fields. Each record becomes one row of
``raw/<category>/pages.parquet`` with the source's licence, exactly like a scraped page:

  url           dataset://<source id>/<record id>   (record id = id_field, else [file/]row number)
  final_url     the record's url_field when given, else ``url``
  fetched_at    the file's modification time (deterministic: re-importing the same file changes nothing)
  content_type  application/x-d2a-record+json (body = {"title", "text", "fields", ...} as UTF-8 JSON),
                or text/html when ``text_format: html`` (body = the HTML, parsed by the category parser)
  decision      imported

Bad input (an undecodable or malformed line, a missing or non-text column, an empty text, text that is
not valid Unicode, a record over ``max_record_bytes``) is a reject naming the file and the line/row; it is
counted, kept in ``raw/import_rejects.jsonl``, and the import goes on. A file that cannot be read at all
is one reject for the rest of that file. Memory is bounded by ``max_record_bytes``: a longer JSONL line
is skipped in 1 MiB reads, never held whole.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

from scrapers.schema import SourceConfig, resolve_path

log = logging.getLogger("scrapers.dataset_import")

RECORD_TYPE = "application/x-d2a-record+json"
SUFFIX_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".csv": "csv", ".tsv": "tsv",
                  ".parquet": "parquet", ".pq": "parquet"}
CSV_FIELD_LIMIT = 64 * 1024 * 1024
BATCH = 1024


class DatasetError(ValueError):
    """A dataset source cannot be imported at all (missing path, unknown format, missing column)."""


@dataclass
class ImportStats:
    rows: int = 0  # rows published
    rejected: int = 0
    over_max: int = 0
    by_reason: dict[str, int] = field(default_factory=dict)
    error: str | None = None  # a whole-source failure (counted as a refused source)

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"rows": self.rows, "rejected": self.rejected, "by_reason": dict(sorted(self.by_reason.items()))}
        if self.over_max:
            d["over_max_rows"] = self.over_max
        if self.error:
            d["error"] = self.error
        return d


def _fmt_of(p: Path) -> str | None:
    suffixes = [s.lower() for s in p.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    return SUFFIX_FORMATS.get(suffixes[-1]) if suffixes else None


def resolve(src: SourceConfig) -> tuple[str, list[Path], Path]:
    """(format, data files in a stable order, base path); raises DatasetError naming the source."""
    if not src.path:
        raise DatasetError(f"source {src.id!r}: kind dataset needs a path")
    base = resolve_path(src.path)
    if not base.exists():
        raise DatasetError(f"source {src.id!r}: dataset path not found: {base}")
    fmt = src.format
    if base.is_dir():
        if fmt in ("auto", "hf_disk") and ((base / "dataset_info.json").is_file() or (base / "dataset_dict.json").is_file()):
            return "hf_disk", sorted(p for p in base.rglob("*") if p.is_file()), base
        if fmt == "hf_disk":
            raise DatasetError(f"source {src.id!r}: {base} is not a dataset saved with save_to_disk")
        files = sorted(p for p in base.rglob("*") if p.is_file() and _fmt_of(p)
                       and (fmt == "auto" or _fmt_of(p) == fmt))
        if not files:
            raise DatasetError(f"source {src.id!r}: no .jsonl/.csv/.tsv/.parquet files under {base}")
        fmts = {_fmt_of(p) for p in files}
        if len(fmts) > 1:
            raise DatasetError(f"source {src.id!r}: mixed formats {sorted(fmts)} under {base}; set format")
        return fmts.pop() or "jsonl", files, base
    if fmt == "hf_disk":
        raise DatasetError(f"source {src.id!r}: format hf_disk needs a folder, got {base}")
    fmt = fmt if fmt != "auto" else (_fmt_of(base) or "")
    if not fmt:
        raise DatasetError(f"source {src.id!r}: cannot tell the format of {base.name}; set format")
    return fmt, [base], base


def check(src: SourceConfig) -> str | None:
    """Why a dataset source cannot be used (None when it can)."""
    if src.start_urls or src.sitemaps:
        return f"source {src.id!r} refused: a dataset source has a path, not start_urls/sitemaps"
    try:
        resolve(src)
    except DatasetError as e:
        return f"{e} (source refused)"
    return None


def fingerprint(src: SourceConfig, cache_path: Path | None = None) -> str:
    """Content identity of an import: the files' sha256 plus everything that shapes the rows.

    File hashes are cached by (size, mtime) in ``cache_path`` so a large, unchanged dataset is not
    re-read just to learn that it is unchanged.
    """
    fmt, files, base = resolve(src)
    cache: dict[str, Any] = {}
    if cache_path and cache_path.is_file():
        try:
            cache = json.loads(cache_path.read_text())
        except (OSError, json.JSONDecodeError):
            cache = {}
    hashes = []
    for p in files:
        st = p.stat()
        key = str(p)
        hit = cache.get(key)
        if hit and hit[0] == st.st_size and hit[1] == st.st_mtime_ns:
            sha = hit[2]
        else:
            h = hashlib.sha256()
            with open(p, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            sha = h.hexdigest()
            cache[key] = [st.st_size, st.st_mtime_ns, sha]
        hashes.append([p.relative_to(base).as_posix() if p != base else p.name, sha])
    if cache_path:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_path.with_name(cache_path.name + ".tmp")
        tmp.write_text(json.dumps(cache))
        tmp.replace(cache_path)
    shape = src.model_dump(mode="json", include={"id", "category", "format", "split", "text_field", "text_format",
                                                 "title_field", "id_field", "url_field", "field_map", "encoding",
                                                 "max_pages", "max_record_bytes"})
    shape["license"] = src.permission.license if src.permission else None
    shape["format"] = fmt
    return hashlib.sha256(json.dumps([shape, hashes], sort_keys=True).encode()).hexdigest()


# ----------------------------------------------------------------------------- readers
# Each yields (position, record or None, (reason, detail) or None); position names the line or row.
Item = tuple[str, dict[str, Any] | None, tuple[str, str] | None]


def _open_bytes(p: Path) -> io.BufferedIOBase:
    return gzip.open(p, "rb") if p.suffix.lower() == ".gz" else open(p, "rb")  # noqa: SIM115


def _read_jsonl(p: Path, encoding: str, max_bytes: int) -> Iterator[Item]:
    with _open_bytes(p) as f:
        n = 0
        while raw := f.readline(max_bytes + 1):  # a line is never read past the cap
            n += 1
            pos = f"line {n}"
            if len(raw) > max_bytes and not raw.endswith(b"\n"):
                size = len(raw)
                while raw and not raw.endswith(b"\n"):
                    raw = f.readline(1 << 20)
                    size += len(raw)
                yield pos, None, ("too_large", f"{size:,} bytes, over max_record_bytes={max_bytes:,}")
                continue
            if not raw.strip():
                continue
            try:
                line = raw.decode(encoding)
            except UnicodeDecodeError as e:
                yield pos, None, ("decode_error", f"not {encoding} at byte {e.start}: {e.reason}")
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                yield pos, None, ("malformed_json", f"{e.msg} at column {e.colno}")
                continue
            if not isinstance(rec, dict):
                yield pos, None, ("not_an_object", f"a JSON {type(rec).__name__}, expected an object")
                continue
            yield pos, rec, None


def _read_csv(p: Path, encoding: str, delimiter: str, max_bytes: int = CSV_FIELD_LIMIT) -> Iterator[Item]:
    csv.field_size_limit(max_bytes)  # a longer field is a csv.Error: a reject, not unbounded memory
    with _open_bytes(p) as fb, io.TextIOWrapper(fb, encoding=encoding, errors="surrogateescape", newline="") as f:
        reader = csv.reader(f, delimiter=delimiter)
        try:
            header = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            yield "line 1", None, ("malformed_csv", f"header: {e}")
            return
        while True:
            try:
                cells = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                yield f"line {reader.line_num}", None, ("malformed_csv", str(e))
                continue
            pos = f"line {reader.line_num}"
            if not any(c.strip() for c in cells):
                continue
            if any("\udc80" <= ch <= "\udcff" for c in cells for ch in c):
                yield pos, None, ("decode_error", f"not {encoding}")
                continue
            if len(cells) != len(header):
                yield pos, None, ("malformed_row", f"{len(cells)} fields, header has {len(header)}")
                continue
            yield pos, dict(zip(header, cells)), None


def _columns(src: SourceConfig) -> list[str]:
    cols = [src.text_field, src.title_field, src.id_field, src.url_field, *src.field_map.values()]
    return list(dict.fromkeys(c for c in cols if c))


def _require_columns(src: SourceConfig, have: list[str], where: str) -> None:
    missing = [c for c in _columns(src) if c not in have]
    if missing:
        raise DatasetError(f"source {src.id!r}: column(s) {missing} not in {where} (columns: {have})")


def _read_parquet(p: Path, src: SourceConfig) -> Iterator[Item]:
    import pyarrow.parquet as pq

    # no pre-buffering (it reads whole column chunks), and fewer rows per batch when rows are long
    pf = pq.ParquetFile(p, pre_buffer=False, buffer_size=1 << 20)
    _require_columns(src, pf.schema_arrow.names, p.name)
    md, widest = pf.metadata, 0.0
    for g in range(md.num_row_groups):
        rg = md.row_group(g)
        if rg.num_rows:
            widest = max(widest, sum(rg.column(c).total_uncompressed_size for c in range(rg.num_columns)) / rg.num_rows)
    rows = max(1, min(BATCH, int((16 << 20) // widest))) if widest else BATCH
    n = 0
    for batch in pf.iter_batches(batch_size=rows, columns=_columns(src)):
        for rec in batch.to_pylist():
            yield f"row {n}", rec, None
            n += 1


def _read_hf(base: Path, src: SourceConfig) -> Iterator[Item]:
    import datasets

    ds = datasets.load_from_disk(str(base))
    if isinstance(ds, datasets.DatasetDict):
        if src.split is None and len(ds) == 1:
            ds = next(iter(ds.values()))
        elif src.split in ds:
            ds = ds[src.split]
        else:
            raise DatasetError(f"source {src.id!r}: {base} holds splits {list(ds)}; set split to one of them")
    _require_columns(src, list(ds.column_names), str(base))
    ds = ds.select_columns(_columns(src))
    n = 0
    for batch in ds.iter(batch_size=BATCH):
        keys = list(batch)
        for i in range(len(batch[keys[0]]) if keys else 0):
            yield f"row {n}", {k: batch[k][i] for k in keys}, None
            n += 1


# ------------------------------------------------------------------------------ rows
def _iso_mtime(p: Path) -> str:
    return datetime.fromtimestamp(p.stat().st_mtime, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _as_text(v: Any) -> str | None:
    if isinstance(v, str):
        return v
    if isinstance(v, list) and all(isinstance(x, str) for x in v):
        return "\n".join(v)
    return None


def import_rows(src: SourceConfig, stats: ImportStats) -> Iterator[tuple[dict[str, Any] | None, dict[str, Any] | None]]:
    """(raw row, None) or (None, reject) per record of a dataset source; updates ``stats``.

    Never raises for bad records; a file that fails mid-way ends that file with one reject.
    """
    try:
        fmt, files, base = resolve(src)
    except DatasetError as e:
        stats.error = str(e)
        return
    lic = src.permission.license if src.permission else None
    data_files = [base] if fmt == "hf_disk" else files

    def reject(fname: str, pos: str, reason: str, detail: str) -> tuple[None, dict[str, Any]]:
        stats.rejected += 1
        stats.by_reason[reason] = stats.by_reason.get(reason, 0) + 1
        log.info("%s %s: %s (%s)", fname, pos, reason, detail)
        return None, {"source_id": src.id, "category": src.category, "file": fname, "position": pos,
                      "reason": reason, "detail": detail}

    for p in data_files:
        fname = str(p)
        rel = "" if p == base else p.relative_to(base).as_posix() + "/"
        fetched_at = _iso_mtime(p)
        if fmt == "jsonl":
            items: Iterator[Item] = _read_jsonl(p, src.encoding, src.max_record_bytes)
        elif fmt in ("csv", "tsv"):
            items = _read_csv(p, src.encoding, "\t" if fmt == "tsv" else ",", src.max_record_bytes)
        elif fmt == "parquet":
            items = _read_parquet(p, src)
        else:
            items = _read_hf(p, src)
        try:
            for pos, rec, bad in items:
                if stats.rows >= src.max_pages:
                    stats.over_max += 1
                    continue
                if bad is not None:
                    yield reject(fname, pos, *bad)
                    continue
                assert rec is not None
                if src.text_field not in rec:
                    yield reject(fname, pos, "missing_field", f"no {src.text_field!r}")
                    continue
                text = _as_text(rec.get(src.text_field))
                if text is None:
                    yield reject(fname, pos, "bad_type", f"{src.text_field!r} is "
                                                         f"{type(rec.get(src.text_field)).__name__}, not text")
                    continue
                if not text.strip():
                    yield reject(fname, pos, "empty", f"{src.text_field!r} is empty")
                    continue
                if len(text) > src.max_record_bytes:  # chars <= UTF-8 bytes: a cheap first test
                    yield reject(fname, pos, "too_large", f"{src.text_field!r} has {len(text):,} characters, "
                                                          f"over max_record_bytes={src.max_record_bytes:,}")
                    continue
                rid = rec.get(src.id_field) if src.id_field else None
                if src.id_field and (rid is None or str(rid).strip() == ""):
                    yield reject(fname, pos, "missing_field", f"no id in {src.id_field!r}")
                    continue
                rid = str(rid) if rid is not None else rel + pos.split()[-1]
                url = f"dataset://{quote(src.id, safe='')}/{quote(rid, safe='/')}"
                orig = rec.get(src.url_field) if src.url_field else None
                title = rec.get(src.title_field) if src.title_field else None
                fields = {k: rec.get(c) for k, c in src.field_map.items()}
                try:  # JSON may escape a lone surrogate (\\ud800): valid JSON, not encodable text
                    if src.text_format == "html":
                        body, ctype = text.encode("utf-8"), "text/html; charset=utf-8"
                    else:
                        body = json.dumps({"title": str(title) if title is not None else "", "text": text,
                                           "fields": fields, "file": rel.rstrip("/") or p.name, "position": pos,
                                           "format": fmt}, ensure_ascii=False, default=str).encode("utf-8")
                        ctype = RECORD_TYPE
                except UnicodeEncodeError as e:
                    yield reject(fname, pos, "invalid_unicode", f"{e.reason} ({e.object[e.start:e.end]!r}) at "
                                                                f"character {e.start} of the record")
                    continue
                if len(body) > src.max_record_bytes:
                    yield reject(fname, pos, "too_large", f"record is {len(body):,} bytes, "
                                                          f"over max_record_bytes={src.max_record_bytes:,}")
                    continue
                stats.rows += 1
                yield {"url": url, "final_url": str(orig) if orig else url, "fetched_at": fetched_at,
                       "status": None, "etag": None, "last_modified": None, "content_type": ctype,
                       "sha256": hashlib.sha256(body).hexdigest(), "category": src.category, "source_id": src.id,
                       "license": lic, "decision": "imported", "body": body}, None
        except DatasetError as e:
            stats.error = str(e)
            log.error("%s", e)
            return
        except Exception as e:  # noqa: BLE001 - a corrupt file: keep what was read, note the rest
            yield reject(fname, "rest of file", "unreadable", f"{type(e).__name__}: {e}")

