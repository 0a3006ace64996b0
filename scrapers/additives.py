"""Chemical additives: E-number, name, function, origin, ADI and notes.

Facts come from definition lists (dt/dd), two-column tables and 'Label: value' lines in the main
content; the E-number is also found in the title (E330, E160a, E472e, E160a(ii)).
"""

from __future__ import annotations

import re

from scrapers.common import (
    Page,
    Parsed,
    ParseReject,
    el_render_blocks,
    el_table_rows,
    el_text,
    el_title,
    join_blocks,
    main_node,
    reject_navigation,
)

E_NUMBER = re.compile(r"\bE\s?-?(\d{3,4}[a-z]?(?:\s?\([ivx]+\))?)", re.I)
_KEYS = {
    "e_number": ("e-number", "e number", "enumber", "e no", "code", "ins"),
    "name": ("name", "chemical name", "common name"),
    "other_names": ("other names", "synonyms", "also known as", "aliases"),
    "function": ("function", "functions", "class", "category", "technological function", "used as"),
    "origin": ("origin", "source", "sources", "produced from"),
    "adi": ("adi", "acceptable daily intake"),
}


def _key(label: str) -> str | None:
    label = label.strip().strip(":").lower()
    for key, names in _KEYS.items():
        if label in names:
            return key
    return None


def parse(page: Page) -> Parsed:
    main = main_node(page.tree)
    pairs: list[tuple[str, str]] = []
    consumed = []
    for dl in main.iter("dl"):
        for dt in dl.iter("dt"):
            dd = next(dt.itersiblings("dd"), None)
            if dd is not None:
                pairs.append((el_text(dt), el_text(dd)))
        consumed.append(dl)
    for table in main.iter("table"):
        rows = [r for r in el_table_rows(table) if len(r) == 2]
        if rows and any(_key(r[0]) for r in rows):
            pairs.extend((r[0], r[1]) for r in rows)
            consumed.append(table)
    for el in main.iter("p", "li"):
        m = re.match(r"^([A-Za-z][A-Za-z \-]{1,30}):\s+(.+)$", el_text(el))
        if m and _key(m.group(1)):
            pairs.append((m.group(1), m.group(2)))
            consumed.append(el)
    facts = {}
    for label, value in pairs:
        k = _key(label)
        if k and k not in facts and value:
            facts[k] = value
    title = el_title(page)
    if "e_number" not in facts:
        m = E_NUMBER.search(title) or E_NUMBER.search(facts.get("name", ""))
        if m:
            facts["e_number"] = "E" + m.group(1).replace(" ", "")
    if "e_number" not in facts and not ("name" in facts and "function" in facts):
        reject_navigation(page)
        raise ParseReject("no_additive", "no E-number and no name/function facts")
    e = facts.get("e_number", "")
    m = E_NUMBER.search(e)
    facts["e_number"] = ("E" + m.group(1).replace(" ", "")).upper() if m else e
    facts.setdefault("name", re.sub(rf"^\s*{re.escape(facts['e_number'])}\s*[:\-–]\s*", "", title, flags=re.I))
    lines = [f"{label}: {value}" for label, value in pairs if value]
    notes = el_render_blocks(main, skip=[*consumed, *main.iter("h1", "nav", "script", "style")], seen={title})
    facts["notes"] = notes
    text = join_blocks([title, "\n".join(lines), notes])
    return Parsed(title=title, text=text, fields=facts)
