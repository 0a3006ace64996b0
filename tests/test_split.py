"""Split: stable as the corpus grows, clusters never straddle, nothing forced (seconds)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from tasks.core.config import config_from_dict
from tasks.split import is_eval, run_split

CLEAN_COLUMNS = ("doc_id", "url", "final_url", "fetched_at", "sha256", "source_id", "category", "license", "title",
                 "text", "fields")


def make_cfg(root: Path, **sections):
    return config_from_dict({"data_root": str(root), "scrape": {"sources": "configs/sources/demo.yaml"},
                             "model": {"name": "tiny"}, **sections})


def write_clean(root: Path, docs: dict[str, list[tuple[str, str]]], fingerprint: str) -> None:
    """docs: category -> [(doc_id, dup_cluster)]; writes clean/ as the clean stage would."""
    out = root / "clean"
    out.mkdir(parents=True, exist_ok=True)
    for cat, items in docs.items():
        rows = [{**{c: None for c in CLEAN_COLUMNS}, "doc_id": d, "category": cat, "text": f"text of {d}",
                 "n_chars": len(f"text of {d}"), "dup_cluster": cl} for d, cl in items]
        schema = pa.schema([(c, pa.string()) for c in CLEAN_COLUMNS] + [("n_chars", pa.int64()), ("dup_cluster", pa.string())])
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), out / f"{cat}.parquet")
    (out / "manifest.json").write_text(json.dumps({"stage": "clean", "fingerprint": fingerprint}))


def sides(root: Path) -> dict[str, str]:
    out = {}
    for side in ("train", "eval"):
        for p in (root / "split" / side).glob("*.parquet"):
            for d in pq.read_table(p, columns=["doc_id"]).column("doc_id").to_pylist():
                assert d not in out, f"{d} in both splits"
                out[d] = side
    return out


def test_split_is_stable_when_documents_are_added(tmp_path):
    first = {"recipes": [(f"r{i}", f"r{i}") for i in range(1500)], "articles": [(f"a{i}", f"a{i}") for i in range(500)]}
    write_clean(tmp_path, first, "clean-1")
    m1 = run_split(make_cfg(tmp_path))
    before = sides(tmp_path)
    assert len(before) == 2000
    share = m1["counts"]["eval"]["total"]["docs"] / 2000
    assert 0.08 < share < 0.12
    grown = {"recipes": first["recipes"] + [(f"new{i}", f"new{i}") for i in range(700)], "articles": first["articles"],
             "code": [(f"c{i}", f"c{i}") for i in range(300)]}
    write_clean(tmp_path, grown, "clean-2")
    m2 = run_split(make_cfg(tmp_path))
    after = sides(tmp_path)
    assert m2["fingerprint"] != m1["fingerprint"]
    assert all(after[d] == side for d, side in before.items())
    assert len(after) == 3000
    total = m2["counts"]["train"]["total"]["docs"] + m2["counts"]["eval"]["total"]["docs"]
    assert total == 3000


def test_cluster_members_land_on_one_side(tmp_path):
    # parts of long documents share their dup_cluster
    items = [(f"doc{i}-p{p}", f"doc{i}") for i in range(300) for p in range(4)]
    write_clean(tmp_path, {"articles": items}, "clean-1")
    run_split(make_cfg(tmp_path))
    got = sides(tmp_path)
    for i in range(300):
        assert len({got[f"doc{i}-p{p}"] for p in range(4)}) == 1
    assert {"train", "eval"} == set(got.values())


def test_eval_missing_is_reported_not_forced(tmp_path, caplog):
    salt = make_cfg(tmp_path).split.salt
    lonely = next(f"x{i}" for i in range(100) if not is_eval(f"x{i}", salt, 0.1))
    write_clean(tmp_path, {"recipes": [(f"r{i}", f"r{i}") for i in range(200)],
                           "chemical_additives": [(lonely, lonely)]}, "clean-1")
    with caplog.at_level(logging.WARNING, logger="tasks.split"):
        m = run_split(make_cfg(tmp_path))
    assert m["eval_missing"] == ["chemical_additives"]
    assert "chemical_additives" in caplog.text
    assert m["counts"]["train"]["chemical_additives"] == {"docs": 1, "chars": len(f"text of {lonely}")}
    assert not (tmp_path / "split" / "eval" / "chemical_additives.parquet").exists()


def test_rerun_skipped_and_salt_matters(tmp_path, caplog):
    write_clean(tmp_path, {"recipes": [(f"r{i}", f"r{i}") for i in range(300)]}, "clean-1")
    m1 = run_split(make_cfg(tmp_path))
    with caplog.at_level(logging.INFO, logger="tasks.split"):
        m2 = run_split(make_cfg(tmp_path))
    assert m2["created_at"] == m1["created_at"] and "split: up to date" in caplog.text
    before = sides(tmp_path)
    run_split(make_cfg(tmp_path, split={"salt": "other"}))
    assert sides(tmp_path) != before
