"""Extract stage: per-category fields from fixture pages served on loopback, charsets, rejects, counts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import yaml

from scrapers.common import decode_body, doc_id
from scrapers.schema import REPO_ROOT as REPO
from scrapers.testsite import serve_site
from tasks.core.config import PipelineConfig
from tasks.extract import run_extract
from tasks.scrape import run_scrape

DEMO_ROOT = REPO / "data" / "demo_site"
PERMISSION = {"evidence_url": "https://example.org/terms", "license": "CC-BY-4.0", "note": "test fixture"}
SOURCES = {"recipes": "/recipes/", "product_compositions": "/products/", "articles": "/articles/", "code": "/code/",
           "product_descriptions": "/shop/", "chemical_additives": "/additives/"}
PROSE = "Fermented vegetables keep for months in a cool cellar and taste sharper every week. " * 4

MICRODATA_RECIPE = """<!doctype html><html><head><meta charset="utf-8"><title>Porridge</title></head><body><main>
<div itemscope itemtype="https://schema.org/Recipe"><h1 itemprop="name">Porridge</h1>
<span itemprop="recipeYield">2 bowls</span><meta itemprop="cookTime" content="PT5M">
<ul><li itemprop="recipeIngredient">80 g oats</li><li itemprop="recipeIngredient">500 ml milk</li></ul>
<div itemprop="recipeInstructions">Bring the milk to a simmer.</div></div></main></body></html>"""
FALLBACK_RECIPE = """<!doctype html><html><head><meta charset="utf-8"><title>Toast | Site</title></head><body><main>
<h1>Cinnamon Toast</h1><p>Serves: 1</p><ul class="ingredients"><li>1 slice bread</li><li>1 tsp butter</li></ul>
<ol class="method"><li>Toast the bread.</li><li>Spread butter and dust with cinnamon.</li></ol></main></body></html>"""
LATIN1 = ("<!doctype html><html><head><meta charset=\"iso-8859-1\"><title>Glossaire</title></head><body><main>"
          "<h1>Glossaire</h1><p>La crème brûlée est une crème cuite au four. " + PROSE + "</p>"
          "<p>Une purée de pommes de terre, un jalapeño.</p></main></body></html>").encode("latin-1")
CODE = """<!doctype html><html><head><meta charset="utf-8"><title>Kcal</title>
<link rel="license" href="https://opensource.org/licenses/MIT"></head><body><main><h1>Energy in Python</h1>
<p>Atwater factors turn grams into kilocalories.</p>
<pre><code class="language-python">def kcal(p, c, f):\n    return 4 * p + 4 * c + 9 * f</code></pre>
<p>Fat counts more than twice as much as protein.</p></main></body></html>"""
ADDITIVE = """<!doctype html><html><head><meta charset="utf-8"><title>E300</title></head><body><main>
<h1>E300: Ascorbic acid</h1><table><tr><th>Function</th><td>Antioxidant</td></tr>
<tr><th>Origin</th><td>Synthetic or from fruit</td></tr><tr><th>ADI</th><td>Not specified</td></tr></table>
<p>Vitamin C, added to cured meat to speed curing.</p></main></body></html>"""
PRODUCT = """<!doctype html><html><head><meta charset="utf-8"><title>Oat bar</title>
<script type="application/ld+json">{"@context":"https://schema.org","@type":"Product","name":"Oat Bar",
"brand":{"@type":"Brand","name":"Crunch"},"description":"A chewy oat bar."}</script></head><body><main>
<h1>Oat Bar</h1><p class="ingredients">Ingredients: oats (60%), honey, sunflower oil.</p>
<table class="nutrition"><caption>Per 100 g</caption><tr><th>Typical values</th><th>Per 100 g</th></tr>
<tr><td>Energy</td><td>1800 kJ</td></tr><tr><td>Fat</td><td>15 g</td></tr></table></main></body></html>"""
BROKEN_JSONLD = """<!doctype html><html><head><meta charset="utf-8"><title>Broken</title>
<script type="application/ld+json">{"@type": "Recipe", "name": "Broken", </script></head><body><main>
<h1>Half a page</h1><ul class="ingredients"><li>1 egg</li></ul><ol class="steps"><li>Boil the egg
</ol><p>unclosed <b>bold"""


def write_site(root: Path, files: dict[str, str | bytes]) -> Path:
    for rel, content in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    return root


def crawl_and_extract(tmp_path: Path, site_root: Path, min_text_chars: int = 1) -> tuple[Path, dict[str, Any]]:
    (site_root / "robots.txt").write_text("User-agent: *\nAllow: /\n")
    with serve_site(site_root) as site:
        sources = [{"id": f"t-{cat}", "category": cat, "start_urls": [site.url + prefix], "include": [prefix],
                    "permission": PERMISSION} for cat, prefix in SOURCES.items()]
        src = tmp_path / "sources.yaml"
        src.write_text(yaml.safe_dump({"sources": sources}))
        cfg = PipelineConfig.model_validate({
            "data_root": str(tmp_path / "data"),
            "scrape": {"sources": str(src), "min_delay_s": 0.0, "allow_private_addresses": ["127.0.0.1"]},
            "extract": {"min_text_chars": min_text_chars}, "model": {"name": "unused"}})
        run_scrape(cfg)
    return cfg.root, run_extract(cfg)


def docs(root: Path, category: str) -> dict[str, dict[str, Any]]:
    rows = pq.read_table(root / "extracted" / f"{category}.parquet").to_pylist()
    return {r["url"].split("/", 3)[3]: r for r in rows}


def index(links: list[str]) -> str:
    items = "".join(f'<li><a href="{u}">{u}</a></li>' for u in links)
    return f"<html><body><main><ul>{items}</ul></main></body></html>"


def test_fixture_pages_every_category(tmp_path: Path) -> None:
    site = write_site(tmp_path / "site", {
        "recipes/index.html": index(["micro.html", "fallback.html", "broken.html", "binary.html"]),
        "recipes/micro.html": MICRODATA_RECIPE, "recipes/fallback.html": FALLBACK_RECIPE,
        "recipes/broken.html": BROKEN_JSONLD, "recipes/binary.html": b"\x00\x01\x02PK\x03\x04" * 50,
        "articles/index.html": index(["latin1.html", "short.html"]), "articles/latin1.html": LATIN1,
        "articles/short.html": "<html><body><main><p>Soon.</p></main></body></html>",
        "code/index.html": index(["kcal.html"]), "code/kcal.html": CODE,
        "additives/index.html": index(["e300.html"]), "additives/e300.html": ADDITIVE,
        "products/index.html": index(["bar.html"]), "products/bar.html": PRODUCT,
        "shop/index.html": index(["bar.html"]), "shop/bar.html": PRODUCT,
    })
    root, m = crawl_and_extract(tmp_path, site, min_text_chars=20)
    c = m["counts"]
    assert c["documents_in"] == c["kept"] + c["rejected"]
    assert sum(v["documents_in"] for v in c["per_category"].values()) == c["documents_in"]

    rec = docs(root, "recipes")
    micro = json.loads(rec["recipes/micro.html"]["fields"])
    assert micro["ingredients"] == ["80 g oats", "500 ml milk"] and micro["cook_time"] == "5 min"
    fb = json.loads(rec["recipes/fallback.html"]["fields"])
    assert fb["source_format"] == "html"
    assert fb["steps"] == ["Toast the bread.", "Spread butter and dust with cinnamon."]
    assert "Ingredients:\n- 1 slice bread" in rec["recipes/fallback.html"]["text"]
    assert "1 egg" in rec["recipes/broken.html"]["text"]  # broken JSON-LD and markup: HTML fallback

    art = docs(root, "articles")["articles/latin1.html"]
    assert "crème brûlée" in art["text"] and "jalapeño" in art["text"]
    code = docs(root, "code")["code/kcal.html"]
    assert "```python\ndef kcal(p, c, f):" in code["text"]
    assert "License: https://opensource.org/licenses/MIT" in code["text"]
    add = json.loads(docs(root, "chemical_additives")["additives/e300.html"]["fields"])
    facts = (add["e_number"], add["name"], add["function"], add["adi"])
    assert facts == ("E300", "Ascorbic acid", "Antioxidant", "Not specified")
    prod = json.loads(docs(root, "product_compositions")["products/bar.html"]["fields"])
    assert prod["brand"] == "Crunch" and prod["ingredients"].startswith("oats (60%)")
    assert prod["nutrition"]["Fat"] == "15 g"
    assert "A chewy oat bar." in docs(root, "product_descriptions")["shop/bar.html"]["text"]

    rejects = {r["url"].split("/", 3)[3]: r["reason"]
               for r in pq.read_table(root / "extracted" / "rejects.parquet").to_pylist()}
    assert "recipes/binary.html" not in rejects  # refused by the fetcher: never stored in raw/
    fetched = {json.loads(ln)["url"].split("/", 3)[3]: json.loads(ln) for ln in
               (root / "raw" / "fetch_log.jsonl").read_text().splitlines()}
    assert fetched["recipes/binary.html"]["decision"] == "refused_type"
    assert "binary body" in fetched["recipes/binary.html"]["reason"]
    assert rejects["articles/short.html"] == "too_short"
    assert rejects["recipes/"] == "navigation_page"


def test_skips_when_raw_unchanged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    site = write_site(tmp_path / "site", {"code/index.html": CODE})
    root, first = crawl_and_extract(tmp_path, site)
    caplog.set_level("INFO", logger="tasks.extract")
    _, second = crawl_and_extract(tmp_path, site)  # re-scrape: 304s, same pages fingerprint
    assert second["fingerprint"] == first["fingerprint"] and second["created_at"] == first["created_at"]
    assert "skipped: up to date" in caplog.text


def test_demo_fixture_pages(tmp_path: Path) -> None:
    """The demo site's fixtures: recipe fields, Latin-1 page, exact and near duplicates (dedup comes later)."""
    if not (DEMO_ROOT / "recipes" / "lentil-soup-v2.html").is_file():
        pytest.fail(f"{DEMO_ROOT} is tracked in git and missing from this checkout", pytrace=False)
    picks = ["recipes/lentil-soup.html", "recipes/lentil-soup-v2.html", "articles/fibre-basics.html",
             "articles/fibre-basics-reprint.html", "articles/latin1-page.html", "articles/broken-markup.html"]
    site = tmp_path / "site"  # a copy without the demo's crawl delay, so the test stays fast
    for rel in picks:
        (site / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(DEMO_ROOT / rel, site / rel)
    for d in ("recipes", "articles"):
        (site / d / "index.html").write_text(index([Path(p).name for p in picks if p.startswith(d)]))
    root, m = crawl_and_extract(tmp_path, site)
    rec = docs(root, "recipes")
    soup = json.loads(rec["recipes/lentil-soup.html"]["fields"])
    assert soup["title"] == "Turkish Red Lentil Soup" and len(soup["ingredients"]) > 5 and len(soup["steps"]) > 3
    assert rec["recipes/lentil-soup.html"]["text"].startswith("Turkish Red Lentil Soup\n\n")
    text = rec["recipes/lentil-soup.html"]["text"]
    assert "Ingredients:\n- " in text and "\nSteps:\n1. " in text
    assert "recipes/lentil-soup-v2.html" in rec  # near duplicate kept here
    art = docs(root, "articles")
    assert "crème brûlée" in art["articles/latin1-page.html"]["text"].lower()
    assert "articles/fibre-basics-reprint.html" in art and "articles/broken-markup.html" in art
    c = m["counts"]
    assert c["documents_in"] == c["kept"] + c["rejected"] and c["kept"] == 6  # the index pages are rejected
    assert set(c["rejects_by_reason"]) == {"navigation_page"}


def test_doc_id_stable_across_hosts_and_charset_order() -> None:
    assert doc_id("s", "http://127.0.0.1:1/a/b.html?x=1") == doc_id("s", "https://example.org/a/b.html?x=1")
    assert doc_id("s", "http://h/a") != doc_id("t", "http://h/a")
    body = "<meta charset='utf-8'>café".encode("latin-1")  # header wins over a wrong meta
    assert decode_body(body, "text/html; charset=iso-8859-1")[0].endswith("café")
    assert decode_body("<p>café</p>".encode(), None)[0] == "<p>café</p>"


def test_parallel_extraction_matches_serial(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tasks.extract as ex

    pages = {f"recipes/r{i}.html": FALLBACK_RECIPE.replace("Cinnamon Toast", f"Toast {i}") for i in range(150)}
    site = write_site(tmp_path / "site", {"recipes/index.html": index([f"r{i}.html" for i in range(150)]), **pages})
    root, serial = crawl_and_extract(tmp_path, site)
    before = pq.read_table(root / "extracted" / "recipes.parquet").to_pylist()
    monkeypatch.setattr(ex, "READ_BATCH", 16)
    data = yaml.safe_load((root / "raw" / "config.yaml").read_text())
    data["extract"]["workers"] = 2
    cfg = PipelineConfig.model_validate(data)
    assert ex.extract_workers(150, cfg.extract.workers) == 2 and ex.extract_workers(150) == 1
    # the worker count is not part of the fingerprint: the same output is up to date
    assert run_extract(cfg)["created_at"] == serial["created_at"]
    import shutil as sh
    sh.rmtree(root / "extracted")
    parallel = run_extract(cfg)
    after = pq.read_table(root / "extracted" / "recipes.parquet").to_pylist()
    assert parallel["counts"] == serial["counts"] and after == before
