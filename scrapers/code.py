"""Code pages: the prose with fenced code blocks (```python ...```), and the licence of the page.

Licence, most specific first: rel=license link, <meta name=license|dc.rights|dcterms.license>, an
element marked 'license'/'licence' inside the main content, then the source's licence from the
allow-list (recorded on every raw page).
"""

from __future__ import annotations

import re

from scrapers.common import (
    Page,
    Parsed,
    ParseReject,
    clean,
    code_language,
    join_blocks,
    main_element,
    node_text,
    page_title,
    reject_navigation,
    render_blocks,
)


def page_license(page: Page) -> tuple[str, str]:
    """(licence, where it came from)."""
    soup = page.soup
    link = soup.find(["link", "a"], rel=lambda r: r and "license" in (r if isinstance(r, list) else [r]))
    if link is not None:
        return clean(link.get_text() or link.get("href")) or clean(link.get("href")), "rel=license"
    for name in ("license", "dc.rights", "dcterms.license", "dcterms.rights"):
        meta = soup.find("meta", attrs={"name": re.compile(rf"^{re.escape(name)}$", re.I)})
        if meta is not None and clean(meta.get("content")):
            return clean(meta["content"]), f"meta {name}"
    main = main_element(soup)
    for el in main.find_all(True):
        cls = " ".join([*(el.get("class") or []), el.get("id") or ""]).lower()
        if "license" in cls or "licence" in cls:
            return node_text(el), "page element"
    return page.license or "", "source allow-list"


def parse(page: Page) -> Parsed:
    main = main_element(page.soup)
    blocks = main.find_all("pre")
    if not blocks:
        reject_navigation(page)
        raise ParseReject("no_code", "no <pre> code block in the main content")
    title = page_title(page)
    skip = main.find_all(["h1", "nav", "script", "style"])
    body = render_blocks(main, skip=skip, seen={title})
    lic, lic_from = page_license(page)
    langs = [code_language(b) or "text" for b in blocks]
    text = join_blocks([title, body, f"License: {lic}" if lic else ""])
    fields = {"title": title, "languages": sorted(set(langs)), "code_blocks": len(blocks),
              "code_lines": sum(len(b.get_text().strip("\n").splitlines()) for b in blocks),
              "license": lic, "license_from": lic_from}
    return Parsed(title=title, text=text, fields=fields)
