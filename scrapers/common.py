"""Helpers shared by the fetcher and the category parsers: URLs, ids, charset decoding, the parsed page,
structured data, text hygiene (entities, boilerplate) and element helpers on the page's lxml tree."""

from __future__ import annotations

import codecs
import hashlib
import html as html_lib
import json
import logging
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from bs4 import BeautifulSoup, Tag
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
_META_CHARSET = re.compile(rb"""<meta[^>]+charset\s*=\s*["']?\s*([A-Za-z0-9_.:-]+)""", re.IGNORECASE)
_BOMS = ((codecs.BOM_UTF8, "utf-8"), (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))
# WHATWG: pages labelled latin-1/ascii are decoded as windows-1252 by every browser.
_ALIASES = {"iso-8859-1": "cp1252", "latin-1": "cp1252", "latin1": "cp1252", "l1": "cp1252",
            "us-ascii": "cp1252", "ascii": "cp1252", "iso8859-1": "cp1252"}


def charset_from_content_type(content_type: str | None) -> str | None:
    if not content_type:
        return None
    m = re.search(r"charset\s*=\s*[\"']?([A-Za-z0-9_.:-]+)", content_type, re.IGNORECASE)
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


class Page:
    """What a parser receives: the decoded HTML, its URL, one lxml tree, and the structured data on it.

    The HTML is parsed once (lxml); structured data and trafilatura read that tree. A BeautifulSoup view
    is built only for the parsers that still walk one (products, additives, code), on first use.
    """

    def __init__(self, url: str, html: str, license: str | None = None) -> None:
        self.url, self.html, self.license = url, html, license
        self.tree = parse_tree(html)
        self._soup: BeautifulSoup | None = None
        self._items: dict[str, list[dict[str, Any]]] = {}  # per syntax, read on first use
        self._main_text: str | None = None

    @property
    def soup(self) -> BeautifulSoup:
        if self._soup is None:
            self._soup = BeautifulSoup(self.html, "lxml")
        return self._soup

    def items_of(self, syntax: str) -> list[dict[str, Any]]:
        """schema.org items of one syntax (json-ld, microdata, rdfa), flattened (@graph, lists, nested items)."""
        if syntax not in self._items:
            self._items[syntax] = structured_items(self.tree, self.url, self.html, syntaxes=(syntax,))
        return self._items[syntax]

    @property
    def items(self) -> list[dict[str, Any]]:
        """Every schema.org item on the page: JSON-LD, microdata and RDFa."""
        return [it for syntax in SYNTAXES for it in self.items_of(syntax)]

    def of_type(self, *types: str) -> list[dict[str, Any]]:
        """Items of these types from the first syntax that has any, in the order JSON-LD, microdata, RDFa:
        microdata and RDFa (extruct; RDFa is slow) are read only when JSON-LD has no such item."""
        wanted = {t.lower() for t in types}
        for syntax in SYNTAXES:
            out = [it for it in self.items_of(syntax) if _is_type(it, wanted)]
            if out:
                return out
        return []

    def main_text(self) -> str:
        """The page's main text by trafilatura (tables kept, comments and boilerplate dropped), cleaned."""
        if self._main_text is None:
            self._main_text = main_text(self.tree, self.url)
        return self._main_text


def _is_type(item: dict[str, Any], wanted: set[str]) -> bool:
    t = item.get("@type")
    return any(isinstance(x, str) and x.split("/")[-1].split("#")[-1].lower() in wanted
               for x in (t if isinstance(t, list) else [t]))


def make_page(url: str, html: str, license: str | None = None) -> Page:
    return Page(url, html, license)


_XML_DECL = re.compile(r"^\s*<\?xml[^>]*>", re.IGNORECASE)
# "<script .../>" opens a script in a browser (HTML has no self-closing script or style), but libxml2 closes
# it, and the code after it would become page text
_SELF_CLOSED = re.compile(r"<(script|style)\b([^<>]*?)/>", re.IGNORECASE)


CONTROL_MAX_CHARS = 200


def parse_tree(html: str) -> Any:
    """lxml tree of a decoded page (an XML declaration with an encoding would make lxml refuse the str)."""
    import lxml.html

    html = _XML_DECL.sub("", html, count=1)
    if "/>" in html:
        html = _SELF_CLOSED.sub(r"<\1\2>", html)
    try:
        tree = lxml.html.fromstring(html.encode("utf-8", "replace"),
                                    parser=lxml.html.HTMLParser(encoding="utf-8", remove_comments=True))
    except Exception:  # noqa: BLE001 - empty or hopeless markup: an empty document, the parser decides
        tree = lxml.html.fromstring("<html><body></body></html>")
    # form controls' labels are furniture in every category (servings toggles "1x 2x 3x", unit switches,
    # "Jump to recipe" buttons); drop_tree keeps the text that follows them. Only short ones: on broken
    # markup an unclosed <button> or <select> swallows the rest of the page (seen on real recipe sites)
    for el in tree.xpath("//button|//select|//textarea"):
        if el.getparent() is not None and len(el.text_content()) <= CONTROL_MAX_CHARS:
            el.drop_tree()
    return tree


def main_text(tree: Any, url: str) -> str:
    import trafilatura

    try:  # trafilatura copies a tree it is given, so the shared tree stays intact
        text = trafilatura.extract(tree, url=url, include_comments=False, include_tables=True,
                                   include_formatting=False, include_links=False, include_images=False,
                                   deduplicate=False) or ""
    except Exception:  # noqa: BLE001 - trafilatura on hostile markup: the caller falls back
        text = ""
    return drop_boilerplate(fix_text(text))


def _read_jsonld(raw: str) -> Any:
    raw = raw.strip()
    for attempt in range(3):
        try:
            return json.loads(raw, strict=False)
        except json.JSONDecodeError:
            if attempt == 0:  # CMS wrappers: <!-- -->, //<![CDATA[ ... //]]>
                raw = re.sub(r"^\s*(?://)?\s*(?:<!--|<!\[CDATA\[)|(?://)?\s*(?:-->|\]\]>)\s*$", "", raw).strip()
            elif attempt == 1:  # trailing commas
                raw = re.sub(r",\s*([}\]])", r"\1", raw)
    return None


def _rdfa_plain(v: Any) -> Any:
    """RDFa items as extruct gives them ({"https://schema.org/name": [{"@value": x}]}) in JSON-LD's shape."""
    if isinstance(v, list):
        vs = [_rdfa_plain(x) for x in v]
        return vs[0] if len(vs) == 1 else vs
    if isinstance(v, dict):
        if set(v) == {"@value"} or (set(v) <= {"@value", "@language", "@type"} and "@value" in v):
            return v["@value"]
        out = {k.rsplit("/", 1)[-1].split("#")[-1] if k.startswith("http") else k: _rdfa_plain(x) for k, x in v.items()}
        if isinstance(out.get("@type"), list) and len(out["@type"]) == 1:
            out["@type"] = out["@type"][0]
        return out
    return v


SYNTAXES = ("json-ld", "microdata", "rdfa")


def structured_items(tree: Any, url: str, html: str | None = None,
                     syntaxes: tuple[str, ...] = SYNTAXES) -> list[dict[str, Any]]:
    """Every typed schema.org item of ``syntaxes`` on the page: JSON-LD (each block on its own, so one broken
    block hides nothing else), then microdata and RDFa (extruct, on the same tree) only when the page has such markup."""
    data: list[Any] = []
    if "json-ld" in syntaxes:
        for script in tree.xpath('//script[contains(translate(@type, "LDJSON", "ldjson"), "ld+json")]'):
            obj = _read_jsonld(script.text or "")
            if obj is not None:
                data.append(obj)
            else:
                _log.debug("%s: a JSON-LD block is unreadable; skipped", url)
    markup = [x for x, probe in (("microdata", "//*[@itemscope]"), ("rdfa", "//*[@typeof]"))
              if x in syntaxes and tree.xpath(probe)]
    if markup:
        import extruct

        for syntax in markup:
            try:
                # RDFa needs extruct's own DOM-flavoured parse of the string; microdata reads the shared tree
                src = html if syntax == "rdfa" and html is not None else tree
                got = extruct.extract(src, base_url=url, syntaxes=[syntax], uniform=True)
                data.extend(_rdfa_plain(x) for x in got.get(syntax, [])) if syntax == "rdfa" else \
                    data.extend(got.get(syntax, []))
            except Exception as e:  # noqa: BLE001 - malformed markup: the HTML is still read
                _log.debug("%s: %s unreadable (%s)", url, syntax, e)
    out: list[dict[str, Any]] = []

    def walk(obj: Any, depth: int = 0) -> None:
        if depth > 12:
            return
        if isinstance(obj, list):
            for o in obj:
                walk(o, depth + 1)
        elif isinstance(obj, dict):
            if "@type" in obj:
                out.append(obj)
            for k, v in obj.items():  # @graph, mainEntity, nested items (a Recipe inside a WebPage)
                if isinstance(v, (dict, list)) and k not in ("@context",):
                    walk(v, depth + 1)

    walk(data)
    return out


# ------------------------------------------------------------------------ text hygiene
# An entity left after parsing means the source escaped twice (JSON-LD strings are never HTML-decoded,
# and "&amp;amp;" decodes to "&amp;"): decode until none is left (bounded), then drop markup fragments.
_ENTITY = re.compile(r"&(?:#\d{1,7}|#x[0-9a-f]{1,6}|[a-z][a-z0-9]{1,31});", re.IGNORECASE)
_TAG = re.compile(r"</?[a-zA-Z][a-zA-Z0-9:-]*(?:\s+[^<>]*)?/?>|<!--.*?-->", re.DOTALL)


def fix_text(text: str) -> str:
    """Decode HTML entities (also double-escaped ones) and remove markup fragments from a text value."""
    if "&" in text:
        for _ in range(3):
            if not _ENTITY.search(text):
                break
            text = html_lib.unescape(text)
    if "<" in text:
        text = _TAG.sub(" ", text)
    return text.replace("\u00ad", "").replace("\ufeff", "")


# Lines that are consent, cookie, newsletter, share, comment-form or "read also" furniture, in the
# languages of the corpora we measured on. A line is dropped only when it is short (furniture is).
_BOILERPLATE = re.compile(r"""(?ix)
    \b(?:we\ use\ cookies|(?:this|our)\ (?:web)?site\ uses\ cookies|cookie\ (?:policy|settings|preferences|consent|notice)
    |accept\ (?:all\ )?cookies|(?:manage|change)\ (?:your\ )?(?:cookie|consent|privacy)\ (?:settings|preferences|choices)
    |by\ (?:continuing|clicking|using)\ .{0,40}(?:agree|consent|accept)|privacy\ (?:policy|settings)\ and\ cookie
    |(?:sign\ up|subscribe)\ (?:for|to)\ (?:our|the|my)\ (?:free\ )?(?:newsletter|mailing\ list|emails?)
    |(?:join|get)\ (?:our|the)\ newsletter|never\ miss\ a\ (?:recipe|post|story)|delivered\ (?:straight\ )?to\ your\ inbox
    |share\ on\ (?:facebook|twitter|pinterest|whatsapp|email)|share\ (?:it|them|your\ \w+)\ (?:with\ us\ )?on\ (?:instagram|facebook)
    |rate\ (?:this|the)\ recipe|leave\ a\ (?:rating|review)|(?:tag|follow)\ (?:me|us)\ on\ (?:instagram|facebook|pinterest)
    |(?:pin|save)\ (?:it|this\ recipe)\ (?:on|to|for\ later)|click\ to\ share|share\ via
    |leave\ a\ (?:comment|reply)|your\ email\ address\ will\ not\ be\ published|required\ fields\ are\ marked
    |save\ my\ name,?\ email|notify\ me\ of\ (?:follow-up|new)\ (?:comments|posts)|you\ must\ be\ logged\ in\ to
    |this\ site\ uses\ akismet|log\ in\ to\ (?:leave|post)\ a\ comment|if\ you\ enjoyed\ reading\ this
    |durch\ die\ nutzung\ eines\ buttons|wir\ verwenden\ cookies|diese\ (?:web)?seite\ verwendet\ cookies
    |cookie-einstellungen|datenschutzeinstellungen|zum\ newsletter\ anmelden|newsletter\ abonnieren
    |melde\ dich\ .{0,40}newsletter|um\ kommentare\ zu\ schreiben|kommentar\ (?:schreiben|verfassen|hinterlassen)
    |sie\ sind\ aktuell\ nicht\ eingeloggt|klicken\ sie\ auf\ den\ .{0,30}button,?\ um\ den\ inhalt
    |inhalt\ von\ .{0,40}\ (?:zu\ )?laden|nous\ utilisons\ des\ cookies|ce\ site\ utilise\ des\ cookies
    |utilizamos\ cookies|este\ sitio\ (?:web\ )?utiliza\ cookies|utilizziamo\ i?\ ?cookie|używamy\ (?:plików\ )?cookies
    |pour\ (?:lire\ la\ suite|accéder\ en\ illimité)|abonnez-vous\ à\ (?:notre|la)\ newsletter|suscr[ií]bete\ a
    |síguenos\ en|siguenos\ en|folge\ uns\ auf|follow\ us\ on)""")
# Every phrase above (and _SHARE below) holds one of these lower-case words. The big pattern costs ~15 us
# per line even where nothing matches; a substring test over the whole text first lets most texts, and
# most lines of the others, skip it.
_HINTS = ("cookie", "consent", "privacy", "agree", "accept", "newsletter", "mailing list", "mail", "inbox",
          "never miss", "share", "pin it", "pin this", "save it", "save this", "save my", "rate th", "leave a",
          "instagram", "facebook", "pinterest", "comment", "required fields", "notify", "logged in", "akismet",
          "enjoyed reading", "button", "datenschutz", "kommentar", "eingeloggt", "inhalt von", "pour lire",
          "pour accéder", "suscr", "guenos en", "folge uns", "follow us")


def _boilerplate(s: str, short: bool, hints: tuple[str, ...] = _HINTS) -> bool:
    low = s.lower()
    return any(h in low for h in hints) and (
        _BOILERPLATE.search(s) is not None or (short and _SHARE.search(s) is not None))


# "share this recipe" is a button label on a line of its own, but also a phrase of real prose
# ("I wanted to share this recipe today"): it counts only on short lines
_SHARE = re.compile(r"(?i)\bshare\ (?:this|on)\ (?:facebook|twitter|pinterest|whatsapp|email|recipe|article|post|page)\b")
_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'“‘(])")
# "Read also:"-style headings: the line, and the short teaser lines that follow it, are other articles
_READ_ALSO = re.compile(r"""(?ix)^\s*(?:
    (?:lesen\ sie\ (?:auch|mehr)|auch\ (?:lesen|interessant)|das\ könnte\ (?:sie|dich)\ (?:auch\ )?interessieren
    |das\ thema\ könnte\ (?:sie|dich)\ auch\ interessieren|schon\ gelesen|mehr\ (?:zum\ thema|themen)|weitere\ artikel
    |empfohlene\ beiträge|weitere\ aktuelle\ themen|related\ (?:posts|articles|stories|recipes)|you\ (?:may|might)\ also\ like
    |read\ (?:also|more|next)|see\ also|more\ from|czytaj\ (?:też|także|więcej)|zobacz\ (?:też|także)
    |le\ puede\ interesar|puedes\ ver|lee\ también|lire\ aussi|à\ lire\ aussi|leggi\ anche)\b[^.!]{0,60}[:?!]?\s*$)""")
# one-line furniture: button labels that trafilatura keeps as text
_FURNITURE = re.compile(r"""(?ix)^\s*(?:share|share\ this(?:\ recipe|\ article|\ post)?|teilen(?:\ mit)?|bewerten|tweet|pin\ (?:it|this)
    |print(?:\ recipe)?|jump\ to\ recipe|wird\ geladen|loading|bild\ anzeigen|email|facebook|twitter|pinterest|whatsapp
    |reddit|linkedin|flipboard|yummly|mix)\s*[.:…]*\s*$""")


def drop_boilerplate(text: str) -> str:
    """Remove consent/cookie/newsletter/share/comment-form lines and 'read also' teaser blocks."""
    if not text:
        return text
    out: list[str] = []
    teaser = False
    low = text.lower()
    hints = tuple(h for h in _HINTS if h in low)
    for line in text.split("\n"):
        s = line.strip()
        if teaser:  # teaser titles after a "read also" heading: short lines without a full stop
            if s and len(s) <= 120 and not s.endswith((".", ":")) and not s.startswith(("- ", "* ")):
                continue
            teaser = False
        if _READ_ALSO.match(s):
            teaser = True
            continue
        if _FURNITURE.match(s):
            continue
        short = len(s) <= 300
        if hints and _boilerplate(s, short, hints):
            # drop the furniture sentences ("... be sure to leave a comment!" closing a paragraph); the line
            # goes when what is left is too short to be prose of its own ("Accept", "OK")
            rest = " ".join(x for x in _SENTENCE.split(s)
                            if not _boilerplate(x, short, hints))
            if len(rest) < 120:
                continue
            line = rest
        out.append(line)
    return "\n".join(out).strip()


_WS = re.compile(r"[ \t\r\f\v\u00a0]+")


def clean(text: Any) -> str:
    """Collapse whitespace (keeping paragraph breaks) of a string-ish value."""
    if text is None:
        return ""
    if isinstance(text, dict):
        text = text.get("name") or text.get("text") or text.get("@value") or ""
    if isinstance(text, list):
        text = ", ".join(clean(t) for t in text)
    text = _WS.sub(" ", fix_text(str(text)))
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


def main_node(tree: Any) -> Any:
    """lxml: <main>, else role=main, else the largest <article>, else <body>."""
    found = tree.xpath("//main | //*[@role='main']")
    if found:
        return found[0]
    arts = tree.xpath("//article")
    if arts:
        return max(arts, key=lambda a: len(a.text_content()))
    body = tree.find(".//body")
    return body if body is not None else tree


def nav_ratio(root: Any) -> float:
    """Share of the text in list items that start with a link: high on index and navigation pages."""
    if isinstance(root, Tag):  # a BeautifulSoup element (parsers that still walk soup)
        total = len(root.get_text(" ", strip=True)) or 1
        linked = 0
        for li in root.find_all("li"):
            first = next((c for c in li.children if not (isinstance(c, str) and not c.strip())), None)
            if isinstance(first, Tag) and first.name == "a":
                linked += len(li.get_text(" ", strip=True))
        return linked / total
    total = len(" ".join(root.text_content().split())) or 1
    linked = 0
    for li in root.iter("li"):
        if (li.text or "").strip():
            continue
        kids = [k for k in li if isinstance(k.tag, str)]
        if kids and kids[0].tag == "a":
            linked += len(" ".join(li.text_content().split()))
    return linked / total


def reject_navigation(page: Page, threshold: float = 0.6) -> None:
    ratio = nav_ratio(main_node(page.tree))
    if ratio >= threshold:
        raise ParseReject("navigation_page", f"{ratio:.0%} of the main text is linked list items")


def tree_title(page: Page, *candidates: Any) -> str:
    """First non-empty candidate, else og:title, the first <h1>, the <title> before ' | '."""
    for c in candidates:
        if clean(c):
            return clean(c)
    t = page.tree
    for xp in ("//meta[@property='og:title']/@content", "//h1"):
        for v in t.xpath(xp)[:1]:
            v = clean(v if isinstance(v, str) else v.text_content())
            if v:
                return v
    title = t.find(".//title")
    return clean(title.text_content()).split(" | ")[0] if title is not None else ""


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
            m = re.match(r"^(?:language|lang|highlight|brush)[-:](.+)$", c, re.IGNORECASE)
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


# --------------------------------------------------- the same helpers on the shared lxml tree
# (products and additives read the page's one lxml parse; BeautifulSoup stays for code pages)
_LOWER_ATTRS = ("translate(concat(@class, ' ', @id, ' ', @itemprop), 'ABCDEFGHIJKLMNOPQRSTUVWXYZ', "
                "'abcdefghijklmnopqrstuvwxyz')")


def el_text(el: Any) -> str:
    """Text of an lxml element, text nodes joined by spaces, without script/style code (as soup's get_text)."""
    if el is None:
        return ""
    parts = el.xpath(".//text()[not(ancestor::script or ancestor::style)]") if isinstance(el.tag, str) else []
    return clean(" ".join(" ".join(parts).split()))


def el_marked(root: Any, *words: str, names: tuple[str, ...] | None = None) -> list[Any]:
    """Elements under ``root`` whose class, id or itemprop contains one of ``words`` (case-insensitive)."""
    cond = " or ".join(f"contains({_LOWER_ATTRS}, '{w.lower()}')" for w in words)
    tags = " or ".join(f"self::{n}" for n in names) if names else "true()"
    return root.xpath(f".//*[({tags}) and ({cond})]")


def el_title(page: Page, *candidates: Any) -> str:
    """First non-empty candidate, else the first <h1>, else the <title> before ' | '."""
    for c in candidates:
        if clean(c):
            return clean(c)
    for h1 in page.tree.iter("h1"):
        if el_text(h1):
            return el_text(h1)
        break
    t = page.tree.find(".//title")
    return clean(t.text_content()).split(" | ")[0] if t is not None else ""


def el_table_rows(table: Any) -> list[list[str]]:
    rows = []
    for tr in table.iter("tr"):
        cells = [el_text(c) for c in tr.iter("th", "td")]
        if any(cells):
            rows.append(cells)
    return rows


def el_code_language(pre: Any) -> str:
    for el in [pre, *pre.iter("code")]:
        if el.get("data-lang"):
            return el.get("data-lang").lower()
        for c in (el.get("class") or "").split():
            m = re.match(r"^(?:language|lang|highlight|brush)[-:](.+)$", c, re.IGNORECASE)
            if m:
                return m.group(1).lower()
    return ""


def el_render_blocks(root: Any, skip: list[Any] | None = None, seen: set[str] | None = None) -> str:
    """``render_blocks`` on an lxml element: headings, paragraphs, '- ' list items, fenced code, table rows."""
    skip = list(skip or [])  # held, so the ids below stay those of these elements
    skip_ids = {id(s) for s in skip}
    seen = seen if seen is not None else set()
    out: list[str] = []
    for el in root.iter(*BLOCKS):
        if id(el) in skip_ids or any(id(a) in skip_ids or a.tag in BLOCKS for a in el.iterancestors()):
            continue  # left out, or nested in a block whose text already holds it
        if el.tag == "pre":
            code = el.text_content().strip("\n")
            if code.strip():
                out.append(f"```{el_code_language(el)}\n{code}\n```")
            continue
        text = el_text(el)
        if not text or text in seen:
            continue
        seen.add(text)
        if el.tag == "li":
            text = "- " + text
        elif el.tag == "tr":
            text = " | ".join(el_text(c) for c in el.iter("th", "td"))
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


_DUR = re.compile(r"^P(?:(\d+)D)?(?:T(?:(\d+)H)?(?:(\d+)M)?(?:(\d+)S)?)?$", re.IGNORECASE)


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
