"""Recipes: schema.org Recipe (JSON-LD, microdata or RDFa), else lists read from the HTML, else the page's text.

Training text layout:
    Title / description / "Serves ..., Prep ..., Cook ..." / Ingredients: - ... / Steps: 1. ... /
    Nutrition (per ...): ... / the rest of the page's main text (intro, notes, ingredient groups the
    markup flattened), without what is already above.

A page without any recipe structure is kept as text (``source_format: text``, ``structured: false``);
only pages that are clearly not content (navigation, index, empty) are rejected.
"""

from __future__ import annotations

import re
from typing import Any

from scrapers.common import (
    Page,
    Parsed,
    ParseReject,
    as_list,
    clean,
    human_duration,
    join_blocks,
    main_node,
    reject_navigation,
    tree_title,
)

_NUTRIENT_NAMES = {"calories": "Energy", "servingSize": "Serving size"}


def _instructions(value: Any) -> list[str]:
    """recipeInstructions: a string, a list of strings, HowToStep, or HowToSection with steps."""
    steps: list[str] = []
    for item in as_list(value):
        if isinstance(item, str):
            # a single text block: one step per line (or per sentence-numbered chunk)
            parts = [p for p in re.split(r"\n+|(?:^|\s)\d+[.)]\s+", item) if clean(p)]
            steps.extend(clean(p) for p in parts)
        elif isinstance(item, dict):
            if item.get("itemListElement"):  # HowToSection: its name, then its steps
                name = clean(item.get("name"))
                if name:
                    steps.append(name + ":")
                steps.extend(_instructions(item["itemListElement"]))
            else:
                t = clean(item.get("text") or item.get("name"))
                if t:
                    steps.append(t)
    return steps


_FLOAT_ZERO = re.compile(r"\b(\d+)\.0\b")


def _ingredient_lines(value: Any) -> list[str]:
    """recipeIngredient: a list, or one string with a line per ingredient; '500.0 g' written as '500 g'."""
    out = []
    for i in as_list(value):
        for line in (i.split("\n") if isinstance(i, str) else [i]):
            line = _FLOAT_ZERO.sub(r"\1", clean(line))
            if line:
                out.append(line)
    return out


def _richer(html: list[str], schema: list[str]) -> bool:
    """The page's own ingredient list says more than the markup (quantities the markup left out)."""
    if not html or not schema or not 0.8 * len(schema) <= len(html) <= 2 * len(schema):
        return False
    digits = lambda xs: sum(c.isdigit() for x in xs for c in x)
    return digits(html) > digits(schema) and sum(map(len, html)) > sum(map(len, schema))


def _unquantified(lines: list[str]) -> bool:
    """Most markup lines carry no number ("chicken breast"): the quantities are only on the page."""
    return sum(any(c.isnumeric() for c in x) for x in lines) < len(lines) / 2


def _nutrient_label(key: str) -> str:
    if key in _NUTRIENT_NAMES:
        return _NUTRIENT_NAMES[key]
    words = re.sub(r"([a-z])([A-Z])", r"\1 \2", key.replace("Content", "")).lower()
    return words[:1].upper() + words[1:]


def _nutrition(value: Any) -> dict[str, str]:
    if not isinstance(value, dict):
        return {}
    return {_nutrient_label(k): clean(v) for k, v in value.items()
            if not k.startswith("@") and clean(v)}


def _from_schema(item: dict[str, Any]) -> dict[str, Any]:
    return {
        "title": clean(item.get("name")),
        "description": clean(item.get("description")),
        "yield": clean(as_list(item.get("recipeYield"))[0]) if item.get("recipeYield") else "",
        "prep_time": human_duration(item.get("prepTime")),
        "cook_time": human_duration(item.get("cookTime")),
        "total_time": human_duration(item.get("totalTime")),
        "cuisine": clean(item.get("recipeCuisine")),
        "category": clean(item.get("recipeCategory")),
        "ingredients": _ingredient_lines(item.get("recipeIngredient") or item.get("ingredients")),
        "steps": _instructions(item.get("recipeInstructions")),
        "nutrition": _nutrition(item.get("nutrition")),
    }


_LOWER = "translate(concat(@class, ' ', @id, ' ', @itemprop), 'ABCDEFGHIJKLMNOPQRSTUVWXYZ', 'abcdefghijklmnopqrstuvwxyz')"
_ING_HEAD = re.compile(r"^(?:ingredients?|zutaten|ingrédients|ingredientes|ingredienti|składniki|ingrediënten|ingredienser|"
                       r"ainekset|suroviny|hozzávalók|malzemeler|ингредиенты|材料|what you(?:'ll)? need)\b.{0,40}$", re.IGNORECASE)
_STEP_HEAD = re.compile(r"^(?:method|instructions?|directions?|steps?|preparation|how to make.{0,40}|zubereitung|"
                        r"anleitung|préparation|preparación|preparazione|procedimento|przygotowanie|bereiding|"
                        r"fremgangsmåde|valmistus|postup|elkészítés|yapılışı|приготовление|做法)\s*:?$", re.IGNORECASE)


def _text(el: Any) -> str:
    # a space between text nodes: "<span>1½</span><span>cups</span>" is "1½ cups", not "1½cups"
    return clean(" ".join(" ".join(el.itertext()).split()))


def _marked(root: Any, words: tuple[str, ...], tags: str = "self::ul or self::ol or self::div or self::section or "
            "self::table or self::dl") -> list[Any]:
    cond = " or ".join(f"contains({_LOWER}, '{w}')" for w in words)
    return root.xpath(f".//*[({tags}) and ({cond})]")


def _items_of(el: Any) -> list[str]:
    lis = el.xpath(".//li")
    if lis:
        return [t for t in (_text(li) for li in lis) if t]
    ps = el.xpath(".//p")
    return [t for t in (_text(p) for p in ps) if t] or ([_text(el)] if _text(el) else [])


# form controls are page furniture (servings toggles "1x 2x 3x", unit switches), never ingredient lines
_CONTROLS = ("script", "style", "input", "button", "select", "option", "textarea")
_HEADINGS = ("h1", "h2", "h3", "h4", "h5", "h6")
# a line that is only the section's label ("Ingredients", "Zutaten:") or a servings multiplier ("2x")
_LABEL_LINE = re.compile(r"^(?:(?:ingredients?|zutaten|ingrédients|ingredientes|ingredienti|składniki|ingrediënten|"
                         r"ingredienser|ainekset|suroviny|hozzávalók|malzemeler|ингредиенты|材料)\s*:?|"
                         r"\d+(?:[.,]\d+)?\s*[x×]|[½¼¾⅓⅔]\s*[x×])$", re.IGNORECASE)
_STEP_WORDS = ("instruction", "step", "method", "direction", "preparation", "zubereitung")
_ITEM_TAGS = ("li", "dt", "dd", "tr")


def _repeated(el: Any) -> list[Any]:
    """The shallowest group of >= 2 sibling elements of one tag and class under ``el`` (a list drawn with
    <div class="ingredient">: one item per block, its amount and name kept together)."""
    level = [el]
    for _ in range(6):
        nxt = []
        for node in level:
            kids = [k for k in node if isinstance(k.tag, str) and k.tag not in _CONTROLS]
            seen: dict[tuple[str, str], int] = {}
            for k in kids:
                seen[(k.tag, k.get("class") or "")] = seen.get((k.tag, k.get("class") or ""), 0) + 1
            group = [k for k in kids if k.get("class") and seen[(k.tag, k.get("class"))] >= 2]
            if group:
                return group
            nxt.extend(kids)
        level = nxt
    return []


def _ingredient_nodes(main: Any) -> list[Any]:
    """Elements holding one ingredient line each, found from the elements marked 'ingredient':
    the list items (li, dt, table rows) under or around them, else repeated sibling blocks, else paragraphs;
    outermost only, so a line split into amount / unit / name spans stays one line."""
    # lxml makes a new Python proxy per access and id() is reused once one is freed: the lists that the
    # id sets come from are kept alive until the end of the function
    step_els = _marked(main, _STEP_WORDS)
    steps = {id(e) for e in step_els}
    nodes: dict[int, Any] = {}
    for m in _marked(main, ("ingredient", "zutat"), tags="not(self::script or self::style or self::input or "
                                                        "self::select or self::option or self::img)"):
        if any(id(a) in steps for a in m.iterancestors()):
            continue  # an ingredient link inside a step is not an ingredient line
        if m.tag in _HEADINGS and _ING_HEAD.match(_text(m)):
            continue  # the section's own heading ("Ingredients" with its servings toggles), not a line
        if m.tag in _CONTROLS or any(a.tag in _CONTROLS for a in m.iterancestors()):
            continue
        found = m.xpath(".//li") or m.xpath(".//dt")
        if not found:
            up = next((a for a in m.iterancestors(*_ITEM_TAGS)), None)
            found = [up] if up is not None else (m.xpath(".//tr") or _repeated(m) or m.xpath(".//p") or [m])
        for n in found:
            nodes.setdefault(id(n), n)
    ids = set(nodes)
    outer = [n for n in nodes.values() if not any(id(a) in ids for a in n.iterancestors())]
    every = list(main.iter())
    order = {id(e): i for i, e in enumerate(every)}
    return sorted(outer, key=lambda n: order.get(id(n), 0))


def _under_heading(root: Any, pattern: re.Pattern[str]) -> list[str]:
    """Items of the lists that follow a heading such as 'Ingredients' (up to the next heading)."""
    out: list[str] = []
    for h in root.xpath(".//*[self::h1 or self::h2 or self::h3 or self::h4 or self::h5 or self::strong or self::b]"):
        if not pattern.match(_text(h).rstrip(":")):
            continue
        node = h if h.getparent() is None or h.tag not in ("strong", "b") else h.getparent()
        for sib in node.itersiblings():
            if not isinstance(sib.tag, str):
                continue
            if sib.tag in ("h1", "h2", "h3", "h4", "h5") and not (_ING_HEAD.match(_text(sib)) and pattern is _ING_HEAD):
                break
            if sib.tag in ("ul", "ol"):
                out.extend(_items_of(sib))
            elif sib.tag in ("h3", "h4", "h5"):  # a group heading inside the section
                out.append(_text(sib).rstrip(":") + ":")
            elif sib.xpath(".//li"):
                out.extend(_items_of(sib))
    return out


def _from_html(page: Page) -> dict[str, Any]:
    """Pages without Recipe data: lists marked 'ingredient' / 'instruction|step|method|direction', or the
    lists under an 'Ingredients' / 'Method' heading."""
    main = main_node(page.tree)
    ingredients = [t for t in (_text(n) for n in _ingredient_nodes(main)) if t and not _LABEL_LINE.match(t)]
    if not ingredients:
        ingredients = _under_heading(main, _ING_HEAD)
    steps: list[str] = []
    for el in _marked(main, _STEP_WORDS):
        steps.extend(_items_of(el))
    if not steps:
        steps = _under_heading(main, _STEP_HEAD)
    nutrition: dict[str, str] = {}
    for table in main.xpath(f".//table[contains({_LOWER}, 'nutrition')]"):
        for row in table.xpath(".//tr")[1:]:
            cells = [_text(c) for c in row.xpath("./th|./td")]
            if len(cells) >= 2 and cells[0]:
                nutrition[cells[0]] = cells[1]
    desc = next(iter(main.xpath(".//p[contains(@class, 'description')]")), None)
    serves = re.search(r"\b(?:Serves|Yield|Makes)\s*:?\s*([^.\n]+)", " ".join(main.text_content().split()[:400]))
    return {
        "title": tree_title(page), "description": _text(desc) if desc is not None else "",
        "yield": clean(serves.group(1))[:80] if serves else "",
        "prep_time": "", "cook_time": "", "total_time": "", "cuisine": "", "category": "",
        "ingredients": list(dict.fromkeys(ingredients)), "steps": list(dict.fromkeys(steps)), "nutrition": nutrition,
    }


def _key(text: str) -> str:
    return " ".join(re.findall(r"\w+", text.lower()))


_SECTION_WORDS = {"ingredients", "ingredient", "method", "steps", "instructions", "directions", "preparation",
                  "nutrition", "zutaten", "zubereitung", "notes"}


def _without_split_lines(lines: list[str], ingredient_keys: set[str], longest: int = 6) -> list[str]:
    """Drop runs of 2..``longest`` consecutive lines that together spell one ingredient line already
    listed: a recipe card whose amount, unit and name spans the text extractor put on lines of their own
    ("250", "g", "Rhubarbe")."""
    if not ingredient_keys:
        return lines
    out, i = [], 0
    while i < len(lines):
        for j in range(i + 2, min(i + longest, len(lines)) + 1):
            if _key(" ".join(lines[i:j])) in ingredient_keys:
                i = j
                break
        else:
            out.append(lines[i])
            i += 1
    return out


def parse(page: Page) -> Parsed:
    recipes = page.of_type("Recipe")
    if recipes:
        best = max(recipes, key=lambda r: (len(as_list(r.get("recipeIngredient") or r.get("ingredients"))),
                                           bool(r.get("recipeInstructions"))))
        f = _from_schema(best)
        f["source_format"] = "schema.org"
        # partial or thin markup (no ingredients, no steps, lines without quantities): complete it from the
        # page's own lists; markup with quantities is taken as it is (and the page's lists are not read)
        if not f["ingredients"] or not f["steps"] or _unquantified(f["ingredients"]):
            h = _from_html(page)
            if not f["ingredients"] or _richer(h["ingredients"], f["ingredients"]):
                f["ingredients"] = h["ingredients"] or f["ingredients"]
            f["steps"] = f["steps"] or h["steps"]
    else:
        f = _from_html(page)
        f["source_format"] = "html" if f["ingredients"] or f["steps"] else "text"
        if f["source_format"] == "text":
            reject_navigation(page)
    f["structured"] = f["source_format"] != "text"
    # the page's own heading is kept when the markup names the recipe differently
    heading = tree_title(page)
    f["title"] = f["title"] or heading
    if heading and _key(heading) != _key(f["title"]):
        f["page_heading"] = heading

    blocks = [f["title"], f["description"]]
    meta = [(label, f[key]) for label, key in (("Serves", "yield"), ("Prep", "prep_time"), ("Cook", "cook_time"),
                                               ("Total", "total_time"), ("Cuisine", "cuisine"),
                                               ("Course", "category")) if f[key]]
    blocks.append(". ".join(f"{k}: {v}" for k, v in meta) + ("." if meta else ""))
    if f["ingredients"]:
        blocks.append("Ingredients:\n" + "\n".join(f"- {i}" for i in f["ingredients"]))
    if f["steps"]:
        blocks.append("Steps:\n" + "\n".join(f"{n}. {s}" for n, s in enumerate(f["steps"], 1)))
    if f["nutrition"]:
        nut = dict(f["nutrition"])
        per = nut.pop("Serving size", "")
        blocks.append(f"Nutrition{f' (per {per})' if per else ''}: " + ", ".join(f"{k} {v}" for k, v in nut.items()))
    # the rest of the page's main text (introduction, notes, ingredient groups), minus what is above
    seen = {_key(x) for x in [f["title"], f["description"], *f["ingredients"], *f["steps"]] if x}
    lines = _without_split_lines(page.main_text().split("\n"), {_key(x) for x in f["ingredients"] if x})
    prose = []
    for line in lines:
        k = _key(line)
        if not k or k in seen or k in _SECTION_WORDS or _LABEL_LINE.match(line.strip()):
            continue
        seen.add(k)
        prose.append(line.strip())
    if prose:
        blocks.append(join_blocks(prose))
    if not f["structured"] and not prose:
        raise ParseReject("empty", "no recipe markup, no ingredient/step lists and no main text")
    return Parsed(title=f["title"], text=join_blocks([b for b in blocks if b]), fields=f)
