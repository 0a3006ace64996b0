"""One raw row -> one extracted document or one reject: the per-row half of the extract stage.

Kept free of Prefect (and of anything slow to import): extract's spawned worker processes unpickle
their work function from here, so they do not pay Prefect's import on top of the parsers'.
The stage itself (reading raw/, writing extracted/, the manifest) is ``tasks/extract.py``.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from typing import Any

from scrapers import additives, articles, code, products, recipes
from scrapers.common import (
    Page,
    Parsed,
    ParseReject,
    decode_body,
    doc_id,
    drop_boilerplate,
    fix_text,
    looks_binary,
    make_page,
    to_json,
)
from scrapers.dataset_import import RECORD_TYPE

log = logging.getLogger("tasks.extract")

PARSERS: dict[str, Callable[[Page], Parsed]] = {
    "recipes": recipes.parse,
    "product_compositions": products.parse_composition,
    "articles": articles.parse,
    "code": code.parse,
    "product_descriptions": products.parse_description,
    "chemical_additives": additives.parse,
}
TEXT_TYPES = ("text/html", "application/xhtml+xml", "text/plain")


def extract_page(row: dict[str, Any], min_text_chars: int) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """One raw row -> (document, None) or (None, reject). Never raises for bad input."""
    url, category = row["url"], row["category"]
    body: bytes = row["body"] or b""

    def reject(reason: str, detail: str) -> tuple[None, dict[str, Any]]:
        return None, {"url": url, "category": category, "reason": reason, "detail": detail,
                      "source_id": row.get("source_id"), "sha256": row.get("sha256"),
                      "final_url": row.get("final_url") or url, "license": row.get("license")}

    ctype = (row.get("content_type") or "").split(";")[0].strip().lower()
    if not body.strip():
        return reject("empty", "empty body")
    if ctype == RECORD_TYPE:
        return _extract_record(row, body, min_text_chars, reject)
    if ctype and ctype not in TEXT_TYPES:
        return reject("binary", f"content type {ctype}")
    if looks_binary(body):
        return reject("binary", "body has NUL/control bytes")
    try:
        html, encoding = decode_body(body, row.get("content_type"))
    except (LookupError, UnicodeError) as e:
        return reject("decode_error", str(e))
    parser = PARSERS.get(category)
    if parser is None:
        return reject("unknown_category", category)
    try:
        if ctype == "text/plain":
            parsed = articles.parse_plain(url, html)
        else:
            parsed = parser(make_page(row.get("final_url") or url, html, row.get("license")))
    except ParseReject as e:
        return reject(e.reason, e.detail)
    except Exception as e:  # noqa: BLE001 - a parser bug on one page is a counted reject, not a crash
        log.warning("%s: unparseable (%s: %s)", url, type(e).__name__, e)
        return reject("unparseable", f"{type(e).__name__}: {e}")
    parsed = sanitize(parsed)
    text = parsed.text.strip()
    if not text:
        return reject("empty", "no text extracted")
    if len(text) < min_text_chars:
        return reject("too_short", f"{len(text)} chars < min_text_chars {min_text_chars}")
    fields = {**parsed.fields, "encoding": encoding}
    return {
        "doc_id": doc_id(row["source_id"], url), "url": url, "final_url": row.get("final_url") or url,
        "fetched_at": row.get("fetched_at"), "sha256": row.get("sha256"), "source_id": row["source_id"],
        "category": category, "license": row.get("license"), "title": parsed.title, "text": text,
        "fields": to_json(fields),
    }, None


_FENCE = re.compile(r"(```[^\n]*\n.*?\n```)", re.DOTALL)


def _fix_fields(v: Any) -> Any:
    if isinstance(v, str):
        return drop_boilerplate(fix_text(v)).strip()
    if isinstance(v, list):
        return [_fix_fields(x) for x in v]
    if isinstance(v, dict):
        return {k: _fix_fields(x) for k, x in v.items()}
    return v


def sanitize(parsed: Parsed) -> Parsed:
    """The last word on every category's output: no HTML entity or markup fragment in the title, text or a
    field, and no consent/cookie/newsletter/share/comment-form line in the text. Fenced code is left as is
    (code may hold '&amp;' or '<div>' on purpose)."""
    parts = _FENCE.split(parsed.text)
    text = "".join(p if p.startswith("```") else drop_boilerplate(fix_text(p)) if p.strip() else p for p in parts)
    fields = {k: (v if k == "notes" and "```" in str(v) else _fix_fields(v)) for k, v in parsed.fields.items()}
    return Parsed(title=" ".join(fix_text(parsed.title).split()), text=text, fields=fields)


def _extract_record(row: dict[str, Any], body: bytes, min_text_chars: int,
                    reject: Callable[[str, str], tuple[None, dict[str, Any]]]
                    ) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """An imported dataset record: the text is taken as is (no HTML parsing), fields from the field map."""
    try:
        rec = json.loads(body.decode("utf-8"))
        text, title, fields = str(rec["text"]).strip(), str(rec.get("title") or ""), dict(rec.get("fields") or {})
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        return reject("unparseable", f"dataset record: {type(e).__name__}: {e}")
    if not text:
        return reject("empty", "no text in the dataset record")
    if len(text) < min_text_chars:
        return reject("too_short", f"{len(text)} chars < min_text_chars {min_text_chars}")
    fields = {**fields, "source_format": "dataset", "dataset_format": rec.get("format"),
              "dataset_file": rec.get("file"), "dataset_position": rec.get("position")}
    url = row["url"]
    return {
        "doc_id": doc_id(row["source_id"], url), "url": url, "final_url": row.get("final_url") or url,
        "fetched_at": row.get("fetched_at"), "sha256": row.get("sha256"), "source_id": row["source_id"],
        "category": row["category"], "license": row.get("license"), "title": title, "text": text,
        "fields": to_json(fields),
    }, None


def extract_batch(rows: list[dict[str, Any]], min_text_chars: int) -> list[tuple[Any, Any]]:
    return [extract_page(r, min_text_chars) for r in rows]


def extract_job(job: tuple[list[dict[str, Any]], int]) -> list[tuple[Any, Any]]:
    """One batch as a single picklable argument (process pools, Dask); lives here so a worker imports
    the parsers only, not the stage (and Prefect)."""
    rows, min_text_chars = job
    return extract_batch(rows, min_text_chars) if rows else []
