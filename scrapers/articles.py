"""Articles and other prose: trafilatura's main-content extraction, BeautifulSoup <main> fallback."""

from __future__ import annotations

import trafilatura

from scrapers.common import (
    Page,
    Parsed,
    ParseReject,
    clean,
    join_blocks,
    main_element,
    page_title,
    reject_navigation,
    render_blocks,
)


def parse(page: Page) -> Parsed:
    reject_navigation(page)
    body = ""
    method = "trafilatura"
    # Give trafilatura the page's declared main content when there is one: on short pages its
    # boilerplate detection otherwise keeps site navigation as if it were text.
    main = page.soup.select_one("main, [role=main]")
    source = f"<html><body>{main}</body></html>" if main is not None else page.html
    try:
        body = trafilatura.extract(source, url=page.url, include_comments=False, include_tables=True,
                                   include_links=False, include_images=False, deduplicate=False,
                                   favor_recall=main is not None) or ""
    except Exception:  # noqa: BLE001 - trafilatura on hostile markup: use the plain fallback
        body = ""
    if not body.strip():
        method = "html"
        main = main_element(page.soup)
        body = render_blocks(main, skip=main.find_all(["nav", "script", "style", "header", "footer"]))
    body = clean(body)
    if not body:
        raise ParseReject("empty", "no main content")
    meta_title = None
    try:
        md = trafilatura.extract_metadata(page.html, default_url=page.url)
        meta_title = md.title if md is not None else None
    except Exception:  # noqa: BLE001
        pass
    h1 = page.soup.find("h1")
    title = page_title(page, h1.get_text(" ", strip=True) if h1 else None, meta_title)
    # trafilatura keeps the <h1> as the first line; do not print the title twice
    lines = body.split("\n")
    if lines and clean(lines[0]) == title:
        body = "\n".join(lines[1:]).strip()
    paragraphs = join_blocks([p for p in body.split("\n") if p.strip()])
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
