"""Extract is incremental like clean: on a re-scrape only new or changed pages are parsed."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from scrapers import extract_page
from tests.test_extract import FALLBACK_RECIPE, crawl_and_extract, index, write_site


def test_rescrape_parses_only_new_and_changed_pages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    real = extract_page.PARSERS["recipes"]

    def counting(page):  # type: ignore[no-untyped-def]
        calls.append(page.url.split("/", 3)[3])
        return real(page)

    monkeypatch.setitem(extract_page.PARSERS, "recipes", counting)
    pages = {f"recipes/r{i}.html": FALLBACK_RECIPE.replace("Cinnamon Toast", f"Toast {i}") for i in range(4)}
    site = write_site(tmp_path / "site", {"recipes/index.html": index([f"r{i}.html" for i in range(4)]), **pages})
    root, first = crawl_and_extract(tmp_path, site)
    assert sorted(calls) == ["recipes/", *sorted(pages)] and first["counts"]["reused"] == 0
    before = {r["url"].split("/", 3)[3]: r for r in pq.read_table(root / "extracted" / "recipes.parquet").to_pylist()}

    calls.clear()  # change one page, add one (the index changes with it)
    write_site(site, {"recipes/r1.html": FALLBACK_RECIPE.replace("Cinnamon Toast", "Changed Toast"),
                      "recipes/r4.html": FALLBACK_RECIPE.replace("Cinnamon Toast", "New Toast"),
                      "recipes/index.html": index([f"r{i}.html" for i in range(5)])})
    root, second = crawl_and_extract(tmp_path, site)
    assert sorted(calls) == ["recipes/", "recipes/r1.html", "recipes/r4.html"]
    c = second["counts"]
    assert c["reused"] == 3 and c["parsed"] == 3 and c["documents_in"] == 6
    after = {r["url"].split("/", 3)[3]: r for r in pq.read_table(root / "extracted" / "recipes.parquet").to_pylist()}
    assert after["recipes/r1.html"]["title"] == "Changed Toast" and after["recipes/r4.html"]["title"] == "New Toast"
    same = "recipes/r2.html"
    assert after[same]["fetched_at"] != before[same]["fetched_at"] or after[same]["url"] != before[same]["url"]
    assert {k: after[same][k] for k in ("doc_id", "title", "text", "fields")} == \
        {k: before[same][k] for k in ("doc_id", "title", "text", "fields")}
    rejects = pq.read_table(root / "extracted" / "rejects.parquet").to_pylist()
    assert [r["reason"] for r in rejects] == ["navigation_page"]
    assert json.loads(after[same]["fields"])["source_format"] == "html"


def test_config_change_parses_everything_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import yaml

    from tasks.core.config import PipelineConfig
    from tasks.extract import run_extract

    site = write_site(tmp_path / "site", {"recipes/index.html": index(["a.html"]), "recipes/a.html": FALLBACK_RECIPE})
    root, _ = crawl_and_extract(tmp_path, site)
    data = yaml.safe_load((root / "raw" / "config.yaml").read_text())
    data["extract"]["min_text_chars"] = 5
    calls: list[str] = []
    real = extract_page.PARSERS["recipes"]
    monkeypatch.setitem(extract_page.PARSERS, "recipes", lambda p: calls.append(p.url) or real(p))
    m = run_extract(PipelineConfig.model_validate(data))
    assert len(calls) == 2 and m["counts"]["reused"] == 0
