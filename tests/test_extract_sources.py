"""Sources files: a source that can never receive a page, or shares pages with another, fails at load time."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tasks.core.config import REPO_ROOT, ConfigError, load_sources

PERM = {"evidence_url": "https://example.org/terms", "license": "CC0-1.0", "note": "test"}


def write(tmp_path: Path, sources: list[dict]) -> Path:
    p = tmp_path / "sources.yaml"
    p.write_text(yaml.safe_dump({"sources": [{**s, "permission": PERM} for s in sources]}))
    return p


def test_same_host_and_prefix_is_an_error_naming_both(tmp_path: Path) -> None:
    p = write(tmp_path, [
        {"id": "off-products", "category": "product_compositions", "start_urls": ["https://w.example.org/"],
         "include": ["/product/"]},
        {"id": "off-descriptions", "category": "product_descriptions", "start_urls": ["https://w.example.org/"],
         "include": ["/product/"]}])
    with pytest.raises(ConfigError) as e:
        load_sources(p)
    assert "'off-products'" in str(e.value) and "'off-descriptions'" in str(e.value)
    assert "never receives" in str(e.value)


def test_prefix_ending_inside_a_segment_is_an_error(tmp_path: Path) -> None:
    p = write(tmp_path, [{"id": "wiki-e", "category": "chemical_additives",
                          "start_urls": ["https://en.example.org/wiki/E_number"], "include": ["/wiki/E"]}])
    with pytest.raises(ConfigError, match=r"wiki-e.*'/wiki/E' ends inside a path segment"):
        load_sources(p)


def test_nested_prefixes_other_hosts_and_separators_are_fine(tmp_path: Path) -> None:
    p = write(tmp_path, [
        {"id": "all", "category": "articles", "start_urls": ["https://a.example.org/"], "include": ["/"]},
        {"id": "recipes", "category": "recipes", "start_urls": ["https://a.example.org/r/"], "include": ["/r/"]},
        {"id": "cookbook", "category": "recipes", "start_urls": ["https://b.example.org/wiki/Cookbook:Recipes"],
         "include": ["/wiki/Cookbook:"]},
        {"id": "same-prefix-other-host", "category": "recipes", "start_urls": ["https://c.example.org/r/"],
         "include": ["/r/"]}])
    assert [s.id for s in load_sources(p)] == ["all", "recipes", "cookbook", "same-prefix-other-host"]


@pytest.mark.parametrize("name", ["production.yaml", "demo.yaml"])
def test_shipped_sources_files_load(name: str, monkeypatch) -> None:
    monkeypatch.setenv("DEMO_SITE", "http://127.0.0.1:8765")  # the demo file declares it; a run sets it
    sources = load_sources(REPO_ROOT / "configs" / "sources" / name)
    web = [s for s in sources if s.kind == "web"]
    assert web and all(s.include for s in web)
