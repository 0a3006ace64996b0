"""Helpers shared by the fetcher and the category parsers: URLs, ids and charset decoding."""

from __future__ import annotations

import codecs
import hashlib
import re
from urllib.parse import urlsplit

from charset_normalizer import from_bytes

from scrapers.urls import canonical_url


def normalize_url(url: str, base: str | None = None) -> str | None:
    """The one URL form that is checked and requested (scrapers/urls.py); None if unusable."""
    return canonical_url(url, base)


def origin(url: str) -> str:
    p = urlsplit(url)
    return f"{p.scheme}://{p.netloc}"


def path_query(url: str) -> str:
    """The part of a URL that identifies a page on its site (independent of host and port)."""
    p = urlsplit(url)
    return (p.path or "/") + (f"?{p.query}" if p.query else "")


def doc_id(source_id: str, url: str) -> str:
    """Stable document id: the source and the page's path+query, so a moved host/port keeps ids."""
    return hashlib.sha256(f"{source_id}\n{path_query(url)}".encode()).hexdigest()[:32]


# ----------------------------------------------------------------------------------- charset
_META_CHARSET = re.compile(rb"""<meta[^>]+charset\s*=\s*["']?\s*([A-Za-z0-9_.:-]+)""", re.I)
_BOMS = ((codecs.BOM_UTF8, "utf-8"), (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))
# WHATWG: pages labelled latin-1/ascii are decoded as windows-1252 by every browser.
_ALIASES = {"iso-8859-1": "cp1252", "latin-1": "cp1252", "latin1": "cp1252", "l1": "cp1252",
            "us-ascii": "cp1252", "ascii": "cp1252", "iso8859-1": "cp1252"}


def charset_from_content_type(content_type: str | None) -> str | None:
    if not content_type:
        return None
    m = re.search(r"charset\s*=\s*[\"']?([A-Za-z0-9_.:-]+)", content_type, re.I)
    return m.group(1) if m else None


def _codec(label: str | None) -> str | None:
    if not label:
        return None
    label = label.strip().lower()
    label = _ALIASES.get(label, label)
    try:
        return codecs.lookup(label).name
    except LookupError:
        return None


def looks_binary(body: bytes) -> bool:
    """NUL bytes or many control bytes in the head of a body that claims to be text."""
    head = body[:4096]
    if not head:
        return False
    if b"\x00" in head and not head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return True
    ctrl = sum(1 for b in head if b < 9 or 13 < b < 32)
    return ctrl / len(head) > 0.05


def decode_body(body: bytes, content_type: str | None = None) -> tuple[str, str]:
    """Decode an HTML/text body: HTTP charset, then BOM, then <meta charset>, then detection.

    Returns (text, codec used). Undecodable bytes become U+FFFD rather than failing the page.
    """
    for bom, enc in _BOMS:
        if body.startswith(bom):
            return body[len(bom):].decode(enc, errors="replace"), enc
    candidates = [_codec(charset_from_content_type(content_type))]
    m = _META_CHARSET.search(body[:8192])
    candidates.append(_codec(m.group(1).decode("ascii", "ignore")) if m else None)
    for enc in candidates:
        if not enc:
            continue
        try:
            return body.decode(enc), enc
        except UnicodeDecodeError:
            continue  # a wrong declaration: try the next evidence
    try:
        return body.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        pass
    best = from_bytes(body[:200_000]).best()
    enc = best.encoding if best is not None else "cp1252"
    return body.decode(enc, errors="replace"), enc


# ------------------------------------------------------------------------------ parsing helpers
import json  # noqa: E402 - helpers for the category parsers below
import logging  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import Any  # noqa: E402

from bs4 import BeautifulSoup, Tag  # noqa: E402

_log = logging.getLogger("scrapers.parse")


@dataclass
class Parsed:
    """One extracted document: a title, the training text, and structured fields (JSON-able)."""

    title: str
    text: str
    fields: dict[str, Any] = field(default_factory=dict)


class ParseReject(Exception):
    """The page holds no usable document of its category; ``reason`` is a short counted label."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass
class Page:
    """What a parser receives: the decoded HTML, its URL, a soup, and the structured data on it."""

    url: str
    html: str
    soup: BeautifulSoup
    license: str | None = None
    _items: list[dict[str, Any]] | None = None

    @property
    def items(self) -> list[dict[str, Any]]:
        """schema.org items from JSON-LD and microdata (extruct, uniform), flattened (@graph, lists)."""
        if self._items is None:
            self._items = structured_items(self.html, self.url)
        return self._items

    def of_type(self, *types: str) -> list[dict[str, Any]]:
        wanted = {t.lower() for t in types}
        out = []
        for it in self.items:
            t = it.get("@type")
            ts = t if isinstance(t, list) else [t]
            if any(isinstance(x, str) and x.split("/")[-1].lower() in wanted for x in ts):
                out.append(it)
        return out


def make_page(url: str, html: str, license: str | None = None) -> Page:
    return Page(url=url, html=html, soup=BeautifulSoup(html, "lxml"), license=license)


def structured_items(html: str, url: str) -> list[dict[str, Any]]:
    import extruct

    try:
        data = extruct.extract(html, base_url=url, syntaxes=["json-ld", "microdata"], uniform=True)
    except Exception as e:  # noqa: BLE001 - malformed JSON-LD/markup: fall back to the HTML itself
        _log.debug("%s: structured data unreadable (%s); falling back to HTML", url, e)
        data = {}
        try:  # one broken JSON-LD block must not hide valid microdata
            data = extruct.extract(html, base_url=url, syntaxes=["microdata"], uniform=True)
        except Exception:  # noqa: BLE001
            pass
    out: list[dict[str, Any]] = []

    def walk(obj: Any) -> None:
        if isinstance(obj, list):
            for o in obj:
                walk(o)
        elif isinstance(obj, dict):
            if "@graph" in obj:
                walk(obj["@graph"])
            if "@type" in obj:
                out.append(obj)

    for syntax in ("json-ld", "microdata"):
        walk(data.get(syntax, []))
    return out


_WS = re.compile(r"[ \t\r\f\v\u00a0]+")


def clean(text: Any) -> str:
    """Collapse whitespace (keeping paragraph breaks) of a string-ish value."""
    if text is None:
        return ""
    if isinstance(text, dict):
        text = text.get("name") or text.get("text") or text.get("@value") or ""
    if isinstance(text, list):
        text = ", ".join(clean(t) for t in text)
    text = _WS.sub(" ", str(text))
    text = re.sub(r" *\n[ \n]*", "\n", text)
    return text.strip()


def node_text(el: Tag | None) -> str:
    return clean(el.get_text(" ", strip=True)) if el is not None else ""


def main_element(soup: BeautifulSoup) -> Tag:
    """The page's main content: <main>, else role=main, else the largest <article>, else <body>."""
    for sel in ("main", "[role=main]"):
        el = soup.select_one(sel)
        if el is not None:
            return el
    arts = soup.find_all("article")
    if arts:
        return max(arts, key=lambda a: len(a.get_text()))
    return soup.body or soup


def page_title(page: Page, *candidates: Any) -> str:
    for c in candidates:
        if clean(c):
            return clean(c)
    h1 = page.soup.find("h1")
    if h1 is not None and node_text(h1):
        return node_text(h1)
    t = page.soup.title
    return clean(t.get_text()).split(" | ")[0] if t is not None else ""


def has_class(el: Tag, *words: str) -> bool:
    """Class, id or itemprop of ``el`` contains one of ``words`` (case-insensitive substring)."""
    hay = " ".join([*(el.get("class") or []), el.get("id") or "", el.get("itemprop") or ""]).lower()
    return any(w in hay for w in words)


def find_marked(root: Tag, *words: str, names: tuple[str, ...] | None = None) -> list[Tag]:
    return [el for el in root.find_all(names or True) if isinstance(el, Tag) and has_class(el, *words)]


def nav_ratio(root: Tag) -> float:
    """Share of the text in list items that start with a link: high on index and navigation pages."""
    total = len(root.get_text(" ", strip=True)) or 1
    linked = 0
    for li in root.find_all("li"):
        first = next((c for c in li.children if not (isinstance(c, str) and not c.strip())), None)
        if isinstance(first, Tag) and first.name == "a":
            linked += len(li.get_text(" ", strip=True))
    return linked / total


def reject_navigation(page: Page, threshold: float = 0.6) -> None:
    ratio = nav_ratio(main_element(page.soup))
    if ratio >= threshold:
        raise ParseReject("navigation_page", f"{ratio:.0%} of the main text is linked list items")


def table_rows(table: Tag) -> list[list[str]]:
    rows = []
    for tr in table.find_all("tr"):
        cells = [node_text(c) for c in tr.find_all(["th", "td"])]
        if any(cells):
            rows.append(cells)
    return rows


def code_language(pre: Tag) -> str:
    """Language of a <pre>/<code> block from language-x / lang-x / highlight-x classes or data-lang."""
    for el in [pre, *pre.find_all("code")]:
        if el.get("data-lang"):
            return str(el["data-lang"]).lower()
        for c in el.get("class") or []:
            m = re.match(r"^(?:language|lang|highlight|brush)[-:](.+)$", c, re.I)
            if m:
                return m.group(1).lower()
    return ""


BLOCKS = ("h1", "h2", "h3", "h4", "h5", "h6", "p", "li", "pre", "blockquote", "dt", "dd", "tr", "figcaption")


def render_blocks(root: Tag, skip: list[Tag] | None = None, seen: set[str] | None = None) -> str:
    """Readable text of ``root``: headings, paragraphs, '- ' list items, fenced code; ``skip`` subtrees left out.

    ``seen`` holds texts already emitted elsewhere (e.g. from JSON-LD), which are not repeated.
    """
    skip_ids = {id(s) for s in skip or []}
    seen = seen if seen is not None else set()
    out: list[str] = []
    for el in root.find_all(BLOCKS):
        if any(id(a) in skip_ids for a in [el, *el.parents]):
            continue
        if any(p.name in BLOCKS for p in el.parents):
            continue  # nested block: its text is part of the outer one
        if el.name == "pre":
            code = el.get_text().strip("\n")
            if code.strip():
                out.append(f"```{code_language(el)}\n{code}\n```")
            continue
        text = node_text(el)
        if not text or text in seen:
            continue
        seen.add(text)
        if el.name == "li":
            text = "- " + text
        elif el.name == "tr":
            text = " | ".join(node_text(c) for c in el.find_all(["th", "td"]))
        out.append(text)
    return join_blocks(out)


def join_blocks(blocks: list[str]) -> str:
    """Blank lines between blocks, single newlines between consecutive list items."""
    text = ""
    for b in blocks:
        if not b:
            continue
        if text:
            text += "\n" if b.startswith("- ") and text.rsplit("\n", 1)[-1].startswith("- ") else "\n\n"
        text += b
    return text


_DUR = re.compile(r"^P(?:(\d+)D)?(?:T(?:(\d+)H)?(?:(\d+)M)?(?:(\d+)S)?)?$", re.I)


def human_duration(value: Any) -> str:
    """ISO 8601 durations (PT1H30M) as '1 h 30 min'; other strings pass through."""
    s = clean(value)
    m = _DUR.match(s)
    if not m or not any(m.groups()):
        return s
    d, h, mi, sec = (int(x) if x else 0 for x in m.groups())
    parts = [f"{d} d" if d else "", f"{h} h" if h else "", f"{mi} min" if mi else "", f"{sec} s" if sec else ""]
    return " ".join(p for p in parts if p)


def as_list(v: Any) -> list[Any]:
    if v is None:
        return []
    return v if isinstance(v, list) else [v]


def to_json(fields: dict[str, Any]) -> str:
    return json.dumps(fields, ensure_ascii=False, sort_keys=True, default=str)
