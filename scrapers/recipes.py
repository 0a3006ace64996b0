"""Recipes: schema.org Recipe (JSON-LD or microdata via extruct), BeautifulSoup fallback.

Training text layout:
    Title / description / "Serves ..., Prep ..., Cook ..." / Ingredients: - ... / Steps: 1. ... /
    Nutrition (per ...): ... / remaining prose of the page (intro, notes).
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
    find_marked,
    human_duration,
    join_blocks,
    main_element,
    node_text,
    page_title,
    reject_navigation,
    render_blocks,
    table_rows,
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
            if item.get("itemListElement"):
                steps.extend(_instructions(item["itemListElement"]))
            else:
                t = clean(item.get("text") or item.get("name"))
                if t:
                    steps.append(t)
    return steps


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
        "ingredients": [clean(i) for i in as_list(item.get("recipeIngredient") or item.get("ingredients"))
                        if clean(i)],
        "steps": _instructions(item.get("recipeInstructions")),
        "nutrition": _nutrition(item.get("nutrition")),
    }


def _from_html(page: Page) -> dict[str, Any]:
    """Fallback for pages without Recipe data: lists marked 'ingredient' and 'instruction/step/method'."""
    main = main_element(page.soup)
    ingredients: list[str] = []
    for el in find_marked(main, "ingredient", names=("ul", "ol", "div", "section")):
        items = [node_text(li) for li in el.find_all("li")] or [node_text(el)]
        ingredients.extend(i for i in items if i)
    steps: list[str] = []
    for el in find_marked(main, "instruction", "step", "method", "direction", names=("ol", "ul", "div", "section")):
        items = [node_text(li) for li in el.find_all("li")] or [node_text(p) for p in el.find_all("p")]
        steps.extend(s for s in items if s)
    nutrition: dict[str, str] = {}
    for table in find_marked(main, "nutrition", names=("table",)):
        for row in table_rows(table)[1:]:
            if len(row) >= 2:
                nutrition[row[0]] = row[1]
    desc = main.find(lambda t: t.name == "p" and "description" in " ".join(t.get("class") or []))
    meta = node_text(main)
    serves = re.search(r"\b(?:Serves|Yield|Makes)\s*:?\s*([^.\n]+)", meta)
    return {
        "title": page_title(page), "description": node_text(desc), "yield": clean(serves.group(1)) if serves else "",
        "prep_time": "", "cook_time": "", "total_time": "", "cuisine": "", "category": "",
        "ingredients": list(dict.fromkeys(ingredients)), "steps": list(dict.fromkeys(steps)), "nutrition": nutrition,
    }


def parse(page: Page) -> Parsed:
    recipes = page.of_type("Recipe")
    if recipes:
        f = _from_schema(max(recipes, key=lambda r: len(r.get("recipeIngredient") or [])))
        f["source_format"] = "schema.org"
        if not f["ingredients"] or not f["steps"]:  # partial markup: complete it from the HTML
            h = _from_html(page)
            f["ingredients"] = f["ingredients"] or h["ingredients"]
            f["steps"] = f["steps"] or h["steps"]
    else:
        reject_navigation(page)
        f = _from_html(page)
        f["source_format"] = "html"
    if not f["ingredients"] and not f["steps"]:
        raise ParseReject("no_recipe", "no Recipe markup and no ingredient/step lists")
    f["title"] = f["title"] or page_title(page)

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
    # the rest of the page's prose (introduction, notes), without what is already above
    main = main_element(page.soup)
    skip = [*find_marked(main, "ingredient", "instruction", "step", "method", "direction", "nutrition"),
            *main.find_all(["h1", "table", "script", "nav"])]
    seen = {f["title"], f["description"]}
    prose = render_blocks(main, skip=skip, seen=seen)
    headings = ("ingredients", "method", "steps", "instructions", "directions")  # their content is above
    prose = "\n\n".join(b for b in prose.split("\n\n")
                        if b.strip().lower().rstrip(":") not in headings and not b.lower().startswith("nutrition"))
    if prose:
        blocks.append(prose)
    return Parsed(title=f["title"], text=join_blocks([b for b in blocks if b]), fields=f)
