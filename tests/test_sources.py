"""Dataset sources: JSONL, CSV, Parquet and a saved `datasets` dataset imported into raw/ beside a crawled
site, with their licence, bad records kept aside, and the records flowing through extract."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from scrapers.schema import REPO_ROOT as REPO
from scrapers.testsite import serve_site
from tasks.core.config import PipelineConfig, load_sources
from tasks.extract import run_extract
from tasks.scrape import run_scrape

PROSE = "Oats are a whole grain rich in beta-glucan fibre, which slows digestion. "


def perm(lic: str) -> dict[str, str]:
    return {"evidence_url": "https://example.org/dataset-card", "license": lic, "note": "test dataset"}


def make_cfg(root: Path, sources: list[dict[str, Any]], **extract: Any) -> PipelineConfig:
    (root / "sources.yaml").parent.mkdir(parents=True, exist_ok=True)
    (root / "sources.yaml").write_text(yaml.safe_dump({"sources": sources}))
    return PipelineConfig.model_validate({
        "data_root": str(root / "data"),
        "scrape": {"sources": str(root / "sources.yaml"), "min_delay_s": 0.0, "timeout_s": 5.0,
                   "allow_private_addresses": ["127.0.0.1"]},
        "extract": {"min_text_chars": 20, **extract}, "model": {"name": "unused"}})


def write_inputs(d: Path) -> dict[str, Path]:
    d.mkdir(parents=True, exist_ok=True)
    jsonl = d / "recipes.jsonl.gz"
    lines = [json.dumps({"id": "r1", "title": "Oat porridge", "text": "Simmer oats in milk. " + PROSE,
                         "ingredients": ["oats", "milk"], "url": "https://example.org/r1"}).encode(),
             b'{"id": "r2", "title": "Broken", "text": "cut off mid-',            # malformed JSON
             "{\"id\": \"r3\", \"text\": \"caf\xe9 au lait\"}".encode("latin-1"),  # not UTF-8
             b"[1, 2, 3]",                                                         # not an object
             json.dumps({"id": "r5", "title": "No text"}).encode(),               # missing text field
             json.dumps({"id": "r6", "text": "   "}).encode(),                      # empty text
             json.dumps({"id": "r7", "text": 42}).encode(),                         # not text
             b"",
             json.dumps({"id": "r8", "title": "Lentil dal", "text": ["Rinse lentils.", PROSE],
                         "ingredients": ["lentils"]}).encode()]
    with gzip.open(jsonl, "wb") as f:
        f.write(b"\n".join(lines) + b"\n")
    csv_path = d / "articles.csv"
    csv_path.write_bytes(("title,body\n"
                          f"Fibre,\"{PROSE}Line two, with a comma.\"\n"
                          "Too,many,fields\n").encode() + "Cr\xe8me,caf\xe9 cr\xe8me\n".encode("latin-1")
                         + f"Grains,\"{PROSE}\"\n".encode())
    parquet = d / "additives.parquet"
    pq.write_table(pa.table({"e_number": ["E300", "E330"], "name": ["Ascorbic acid", "Citric acid"],
                             "description": ["Vitamin C, an antioxidant. " + PROSE, "An acidity regulator. " + PROSE]}),
                   parquet)
    return {"jsonl": jsonl, "csv": csv_path, "parquet": parquet}


def test_dataset_imports_flow_through_raw_and_extract_with_their_licence(tmp_path: Path) -> None:
    import datasets

    paths = write_inputs(tmp_path / "in")
    hf_dir = tmp_path / "in" / "hf"
    datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"content": ["def kcal(p, c, f):\n    return 4*p + 4*c + 9*f  # " + PROSE],
                                             "lang": ["python"]}),
        "test": datasets.Dataset.from_dict({"content": ["never imported"], "lang": ["x"]}),
    }).save_to_disk(str(hf_dir))
    site = tmp_path / "site"
    site.mkdir()
    (site / "robots.txt").write_text("User-agent: *\nAllow: /\n")
    (site / "index.html").write_text(f"<html><head><title>Soup</title></head><body><main><h1>Soup</h1><p>{PROSE}</p>"
                                     "</main></body></html>")
    with serve_site(site) as srv:
        sources = [
            {"id": "web", "category": "articles", "start_urls": [srv.url + "/"], "include": ["/"],
             "permission": perm("CC-BY-4.0")},
            {"id": "ds-recipes", "kind": "dataset", "category": "recipes", "path": str(paths["jsonl"]),
             "id_field": "id", "title_field": "title", "url_field": "url", "field_map": {"ingredients": "ingredients"},
             "permission": perm("CC0-1.0")},
            {"id": "ds-articles", "kind": "dataset", "category": "articles", "path": str(paths["csv"]),
             "text_field": "body", "title_field": "title", "permission": perm("CC-BY-SA-4.0")},
            {"id": "ds-additives", "kind": "dataset", "category": "chemical_additives", "path": str(paths["parquet"]),
             "text_field": "description", "title_field": "name", "id_field": "e_number",
             "field_map": {"e_number": "e_number", "name": "name"}, "permission": perm("ODbL-1.0")},
            {"id": "ds-code", "kind": "dataset", "category": "code", "path": str(hf_dir), "split": "train",
             "text_field": "content", "field_map": {"language": "lang"}, "permission": perm("MIT")},
        ]
        cfg = make_cfg(tmp_path, sources)
        raw = run_scrape(cfg)
    c = raw["counts"]
    assert c["imported_per_source"]["ds-recipes"]["rows"] == 2
    assert c["imported_per_source"]["ds-recipes"]["by_reason"] == {
        "malformed_json": 1, "decode_error": 1, "not_an_object": 1, "missing_field": 1, "empty": 1, "bad_type": 1}
    assert c["imported_per_source"]["ds-articles"] == {"rows": 2, "rejected": 2,
                                                        "by_reason": {"malformed_row": 1, "decode_error": 1}}
    assert c["imported_per_source"]["ds-additives"]["rows"] == 2 and c["imported_per_source"]["ds-code"]["rows"] == 1
    assert c["imported"] == 7 and c["web_pages"] == 1 and c["pages"] == 8 and c["import_rejects"] == 8
    rejects = [json.loads(ln) for ln in (cfg.root / "raw" / "import_rejects.jsonl").read_text().splitlines()]
    assert {"source_id": "ds-recipes", "position": "line 2", "reason": "malformed_json"}.items() <= rejects[0].items()
    assert rejects[0]["file"].endswith("recipes.jsonl.gz")
    assert any(r["position"] == "line 4" and r["reason"] == "decode_error" for r in rejects)  # CSV line, 1-based

    rows = pq.read_table(cfg.root / "raw" / "recipes" / "pages.parquet").to_pylist()
    assert [r["url"] for r in rows] == ["dataset://ds-recipes/r1", "dataset://ds-recipes/r8"]
    assert rows[0]["final_url"] == "https://example.org/r1" and rows[0]["license"] == "CC0-1.0"
    assert rows[0]["decision"] == "imported"
    arts = pq.read_table(cfg.root / "raw" / "articles" / "pages.parquet").to_pylist()
    assert {r["source_id"] for r in arts} == {"web", "ds-articles"}  # same raw file as the crawled pages

    ex = run_extract(cfg)
    assert ex["counts"]["documents_in"] == c["pages"] == ex["counts"]["kept"] + ex["counts"]["rejected"]
    docs = {d["url"]: d for cat in ("recipes", "articles", "chemical_additives", "code")
            for d in pq.read_table(cfg.root / "extracted" / f"{cat}.parquet").to_pylist()}
    r1 = docs["dataset://ds-recipes/r1"]
    assert r1["title"] == "Oat porridge" and r1["text"].startswith("Simmer oats in milk.")
    assert r1["license"] == "CC0-1.0" and r1["final_url"] == "https://example.org/r1"
    f1 = json.loads(r1["fields"])
    assert f1["ingredients"] == ["oats", "milk"] and f1["source_format"] == "dataset"
    assert f1["dataset_position"] == "line 1"
    assert docs["dataset://ds-recipes/r8"]["text"].startswith("Rinse lentils.\n")
    e300 = docs["dataset://ds-additives/E300"]
    assert e300["license"] == "ODbL-1.0" and json.loads(e300["fields"])["name"] == "Ascorbic acid"
    code = [d for u, d in docs.items() if u.startswith("dataset://ds-code/")]
    assert len(code) == 1 and json.loads(code[0]["fields"])["language"] == "python" and code[0]["license"] == "MIT"
    assert "Line two, with a comma." in docs["dataset://ds-articles/2"]["text"]
    assert docs[srv.url + "/"]["license"] == "CC-BY-4.0"

    # unchanged files: same pages fingerprint, extract skipped; a changed file changes it
    with serve_site(site) as srv2:
        sources[0]["start_urls"] = [srv2.url + "/"]
        cfg = make_cfg(tmp_path, sources)
        again = run_scrape(cfg)
        assert again["inputs"] == raw["inputs"]
        assert run_extract(cfg)["created_at"] == ex["created_at"]
        with open(paths["csv"], "ab") as f:
            f.write(f"Barley,\"{PROSE}\"\n".encode())
        changed = run_scrape(cfg)
    assert changed["inputs"] != raw["inputs"] and changed["counts"]["imported_per_source"]["ds-articles"]["rows"] == 3


def test_dataset_source_refusals_name_the_source_and_the_rest_goes_on(tmp_path: Path) -> None:
    paths = write_inputs(tmp_path / "in")
    sources = [
        {"id": "ok", "kind": "dataset", "category": "chemical_additives", "path": str(paths["parquet"]),
         "text_field": "description", "permission": perm("ODbL-1.0")},
        {"id": "no-permission", "kind": "dataset", "category": "recipes", "path": str(paths["jsonl"])},
        {"id": "no-file", "kind": "dataset", "category": "recipes", "path": str(tmp_path / "missing.jsonl"),
         "permission": perm("CC0-1.0")},
        {"id": "bad-column", "kind": "dataset", "category": "code", "path": str(paths["parquet"]),
         "text_field": "nope", "permission": perm("CC0-1.0")},
        {"id": "unknown-format", "kind": "dataset", "category": "code", "path": str(tmp_path / "in"),
         "format": "hf_disk", "permission": perm("CC0-1.0")},
    ]
    cfg = make_cfg(tmp_path, sources)
    m = run_scrape(cfg)
    reasons = {r["id"]: r["reason"] for r in m["refused_sources"]}
    assert set(reasons) == {"no-permission", "no-file", "bad-column", "unknown-format"}
    assert "no evidence of permission" in reasons["no-permission"]
    assert "not found" in reasons["no-file"] and "'nope'" in reasons["bad-column"]
    assert m["counts"]["imported"] == 2 and m["counts"]["pages_per_category"] == {"chemical_additives": 2}


def test_html_datasets_use_the_category_parser_and_max_pages_bounds_rows(tmp_path: Path) -> None:
    recs = [{"html": f"<html><body><main><h1>E10{i}: Colour {i}</h1><table><tr><th>Function</th><td>Colour</td></tr>"
                     f"</table><p>{PROSE}</p></main></body></html>"} for i in range(5)]
    p = tmp_path / "in" / "add.jsonl"
    p.parent.mkdir(parents=True)
    p.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    cfg = make_cfg(tmp_path, [{"id": "h", "kind": "dataset", "category": "chemical_additives", "path": str(p),
                               "text_field": "html", "text_format": "html", "max_pages": 3,
                               "permission": perm("CC0-1.0")}])
    m = run_scrape(cfg)
    assert m["counts"]["imported"] == 3 and m["counts"]["imported_per_source"]["h"]["over_max_rows"] == 2
    run_extract(cfg)
    docs = pq.read_table(cfg.root / "extracted" / "chemical_additives.parquet").to_pylist()
    assert [json.loads(d["fields"])["e_number"] for d in docs] == ["E100", "E101", "E102"]


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "configs" / "sources").glob("*.yaml")))
def test_every_sources_file_loads_and_every_source_has_permission(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEMO_SITE", "http://127.0.0.1:8765")
    sources = load_sources(REPO / "configs" / "sources" / name)
    assert sources and all(s.permission is not None and s.permission.license for s in sources)
    assert all((s.kind == "dataset") == bool(s.path) for s in sources)
