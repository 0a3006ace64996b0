"""Products: compositions (ingredients, allergens, nutrition table) and shop descriptions (prose).

Both read schema.org Product (JSON-LD/microdata, ``additionalProperty`` name/value pairs) and then
the HTML: an element marked 'ingredient', one marked 'allergen', a nutrition table (marked
'nutrition', else the first two-column table). Compositions lead with the facts, descriptions
with the prose; both keep the facts as fields.
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
    el_marked,
    el_render_blocks,
    el_table_rows,
    el_text,
    el_title,
    join_blocks,
    main_node,
    reject_navigation,
)


def _props(item: dict[str, Any]) -> dict[str, str]:
    out = {}
    for p in as_list(item.get("additionalProperty")):
        if isinstance(p, dict) and clean(p.get("name")):
            out[clean(p["name"]).lower()] = clean(p.get("value"))
    return out


def _strip_label(text: str, *labels: str) -> str:
    for label in labels:
        text = re.sub(rf"^\s*{label}\s*[:\-]\s*", "", text, flags=re.I)
    return text.strip()


def _nutrition_table(main: Any) -> tuple[str, list[tuple[str, str]], Any]:
    tables = el_marked(main, "nutrition", "nutrient", names=("table",))
    if not tables:
        tables = [t for t in main.iter("table") if any(len(r) >= 2 for r in el_table_rows(t))]
    if not tables:
        return "", [], None
    table = tables[0]
    caption = el_text(table.find(".//caption"))
    rows = el_table_rows(table)
    header = ""
    first = table.find(".//tr")
    if rows and first is not None and first.find(".//td") is None:  # header row of <th>
        header = rows[0][1] if len(rows[0]) > 1 else ""
        rows = rows[1:]
    pairs = [(r[0], " / ".join(r[1:])) for r in rows if len(r) >= 2]
    basis = caption or header
    return basis, pairs, table


def _open_graph(page: Page) -> dict[str, str]:
    """og:* and product:* meta values when the page says it is a product (og:type product, product.item)."""
    meta = {m.get("property").lower(): clean(m.get("content")) for m in page.tree.xpath(
        "//meta[@property and @content][starts-with(@property, 'og:') or starts-with(@property, 'product:')]")}
    return meta if meta.get("og:type", "").split(".")[0] in ("product", "og:product") else {}


def _price(offer: dict[str, Any]) -> str:
    """Offer price, or an AggregateOffer's low-high range, with its currency."""
    low, high = clean(offer.get("lowPrice")), clean(offer.get("highPrice"))
    price = clean(offer.get("price")) or (f"{low}-{high}" if low and high and low != high else low or high)
    return f"{price} {clean(offer.get('priceCurrency'))}".strip() if price else ""


def facts(page: Page) -> dict[str, Any]:
    """Structured product facts from Product markup (JSON-LD, microdata, RDFa), Open Graph product tags where
    the markup leaves a fact out, plus HTML rules."""
    items = page.of_type("Product", "IndividualProduct", "ProductModel", "FoodProduct")
    item = max(items, key=lambda i: len(i), default={})
    og = _open_graph(page)
    props = _props(item)
    main = main_node(page.tree)
    brand = item.get("brand")
    ingredients_el = next(iter(el_marked(main, "ingredient", names=("p", "div", "section", "span", "ul"))), None)
    allergens_el = next(iter(el_marked(main, "allergen", names=("p", "div", "span", "ul"))), None)
    basis, nutrition, table = _nutrition_table(main)
    if not nutrition:  # fall back to additionalProperty entries such as "fat (g) per 100 g"
        nutrition = [(k, v) for k, v in props.items() if " per " in k]
    offers = as_list(item.get("offers"))
    offer = offers[0] if offers and isinstance(offers[0], dict) else {}
    og_price = f"{og.get('product:price:amount', '')} {og.get('product:price:currency', '')}".strip()
    f = {
        "name": el_title(page, item.get("name")),
        "brand": clean(brand.get("name") if isinstance(brand, dict) else brand) or og.get("product:brand", ""),
        "description": clean(item.get("description")) or og.get("og:description", ""),
        "category": clean(item.get("category")),
        "size": clean(item.get("size") or props.get("size") or props.get("net quantity")),
        "gtin": clean(item.get("gtin13") or item.get("gtin") or item.get("gtin8") or item.get("gtin12")
                      or item.get("gtin14")) or og.get("product:gtin", ""),
        "ingredients": props.get("ingredients") or _strip_label(el_text(ingredients_el), "ingredients"),
        "allergens": props.get("allergens") or _strip_label(el_text(allergens_el), "allergy advice", "allergens"),
        "serving_size": props.get("serving size", ""),
        "nutrition_basis": basis,
        "nutrition": dict(nutrition),
        "price": _price(offer) or og_price,
        "has_schema": bool(item),
        "open_graph": bool(og),
    }
    f["_consumed"] = [e for e in (ingredients_el, allergens_el, table) if e is not None]
    return f


def _fact_blocks(f: dict[str, Any]) -> list[str]:
    head = [f"Brand: {f['brand']}" if f["brand"] else "", f"Category: {f['category']}" if f["category"] else "",
            f"Size: {f['size']}" if f["size"] else ""]
    blocks = ["\n".join(h for h in head if h)]
    if f["ingredients"]:
        blocks.append(f"Ingredients: {f['ingredients']}")
    if f["allergens"]:
        blocks.append(f"Allergens: {f['allergens']}")
    if f["nutrition"]:
        basis = f" ({f['nutrition_basis']})" if f["nutrition_basis"] else ""
        blocks.append(f"Nutrition{basis}:\n" + "\n".join(f"- {k}: {v}" for k, v in f["nutrition"].items()))
    if f["serving_size"]:
        blocks.append(f"Serving size: {f['serving_size']}")
    return blocks


def _prose(page: Page, f: dict[str, Any]) -> str:
    main = main_node(page.tree)
    skip = [*f["_consumed"], *main.iter("h1", "script", "style", "nav", "table")]
    prose = el_render_blocks(main, skip=skip, seen={f["name"], f["description"]})
    drop = {"ingredients", "nutrition", "nutrition information", "allergens"}
    return "\n\n".join(b for b in prose.split("\n\n") if b.strip().lower().rstrip(":") not in drop)


def _finish(f: dict[str, Any], text_blocks: list[str]) -> Parsed:
    f = {k: v for k, v in f.items() if not k.startswith("_")}
    return Parsed(title=f["name"], text=join_blocks([b for b in text_blocks if b]), fields=f)


def parse_composition(page: Page) -> Parsed:
    f = facts(page)
    if not (f["has_schema"] or f["open_graph"]):
        reject_navigation(page)
    if not f["ingredients"] and not f["nutrition"]:
        raise ParseReject("no_product", "no ingredients and no nutrition table")
    return _finish(f, [f["name"], *_fact_blocks(f)[:1], f["description"], *_fact_blocks(f)[1:], _prose(page, f)])


def parse_description(page: Page) -> Parsed:
    f = facts(page)
    if not (f["has_schema"] or f["open_graph"]):
        reject_navigation(page)
    prose = _prose(page, f)
    if not f["description"] and not prose:
        raise ParseReject("no_product", "no product description")
    # the description from markup is often a prefix of the page's prose: keep the longer, not both
    desc = f["description"]
    if desc and prose and desc.split(". ")[0] in prose:
        desc = ""
    return _finish(f, [f["name"], *_fact_blocks(f)[:1], desc, prose, *_fact_blocks(f)[1:]])
