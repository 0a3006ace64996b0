"""Articles and other prose: trafilatura's main-content extraction on the page's one lxml tree.

trafilatura already beats hand-written rules on real pages; on top of it this removes the consent,
newsletter, share and "read also" lines it keeps (``drop_boilerplate``), decodes double-escaped
entities, and falls back to the page's paragraphs when it finds nothing. A page is rejected as
navigation only when trafilatura found no real text and the main content is mostly linked list items.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from scrapers.common import (
    Page,
    Parsed,
    ParseReject,
    clean,
    join_blocks,
    main_node,
    nav_ratio,
    tree_title,
)

_BLOCK_TAGS = {"h1", "h2", "h3", "h4", "h5", "h6", "p", "li", "pre", "blockquote", "dt", "dd", "figcaption"}
SHORT_TEXT = 200  # below this, trafilatura's result may be navigation it took for text
INDEX_RATIO = 0.9


def _fallback(main: Any) -> str:
    """Paragraph-level text of the main element, without nav/header/footer/script."""
    blocks: list[str] = []
    for el in main.iter(*_BLOCK_TAGS):
        if any(a.tag in ("nav", "header", "footer", "script", "style", "aside") or a.tag in _BLOCK_TAGS
               for a in el.iterancestors()):
            continue
        t = clean(" ".join(el.text_content().split()))
        if t:
            blocks.append(("- " + t) if el.tag == "li" else t)
    return join_blocks(blocks)


def parse(page: Page) -> Parsed:
    body = page.main_text()
    method = "trafilatura"
    main = main_node(page.tree)
    # navigation: mostly linked list items. A short text is judged by that alone; a long one only where
    # the URL is a directory index too (link-heavy real articles exist: judged by the ratio alone, 9
    # pages of trafilatura's evaluation set were lost)
    ratio = nav_ratio(main)
    path = urlsplit(page.url).path
    is_index = path.endswith("/") or path.rsplit("/", 1)[-1].startswith(("index.", "default."))
    if ratio >= 0.6 and (len(body) < SHORT_TEXT or (is_index and ratio >= INDEX_RATIO)):
        raise ParseReject("navigation_page", f"{ratio:.0%} of the main text is linked list items")
    if not body.strip():
        method = "html"
        body = _fallback(main)
    if not body.strip():
        raise ParseReject("empty", "no main content")
    title = tree_title(page)
    # trafilatura may keep the <h1> as the first line; do not print the title twice
    lines = [ln for ln in body.split("\n") if ln.strip()]
    if lines and clean(lines[0]) == title:
        lines = lines[1:]
    paragraphs = join_blocks(lines)
    text = join_blocks([title, paragraphs])
    return Parsed(title=title, text=text, fields={"title": title, "method": method,
                                                  "words": len(paragraphs.split())})


def parse_plain(url: str, text: str) -> Parsed:
    """A text/plain document: the first non-empty line is the title."""
    text = clean(text)
    if not text:
        raise ParseReject("empty", "empty text document")
    title = text.split("\n", 1)[0][:200]
    return Parsed(title=title, text=text, fields={"title": title, "method": "plain"})
