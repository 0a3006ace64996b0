"""Every data stage on bad and huge input: documents in = kept + quarantined (with reasons naming file and
line), peak memory bounded, never a crash.

Scaled: one JSONL dataset of 2,000 lines with 1% garbage lines of six kinds, a 5 MB document (clean
splits it into ~650 parts of clean.max_chars=8000: one take of all of them overflowed Arrow's 2 GiB
string capacity before), a 12 MB row over max_record_bytes=8 MB (quarantined as too_large), blank
lines, and a folder dataset with an empty file. Each stage runs in its own process (benchmarks/
bench_robustness.py, the same code) so its peak RSS is its own. Full size (1,000,000 lines, 25 MB
document, 200 MB row): ``python -m benchmarks.bench_robustness --model DIR`` (numbers in its notes).
"""

from __future__ import annotations

import gzip
import json

import pytest
from conftest import REPO  # noqa: E402

from benchmarks.bench_robustness import STAGES, make_inputs, run_stage, summary_rows, write_config

MAX_RECORD_MB = 8
# peak RSS over the RSS after imports (and, for mix/tokenize, after loading the tokenizer), per stage.
# Measured at this scale: 116-270 MB; the bound is what the configuration allows: batches of at most
# textio.BATCH_BYTES (16 MB) or tokenize.cache_segment_tokens ids, a few copies of the largest record.
PEAK_MB = 256 + 16 * MAX_RECORD_MB


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, tiny_model_dir):
    work = tmp_path_factory.mktemp("robust")
    expect = make_inputs(work / "in", lines=2000, big_mb=5, huge_mb=12)
    config = write_config(work, work / "in", tiny_model_dir, MAX_RECORD_MB, max_chars=8000)
    res = {}
    for name in STAGES:
        res[name] = run_stage(name, config, REPO, timeout=300)
    rows = {r["stage"]: r for r in summary_rows(res)}
    print("\n" + "\n".join(json.dumps(r) for r in rows.values()))
    return {"work": work, "expect": expect, "res": res, "rows": rows, "root": work / "root"}


def _identity(row):
    assert row["in"] == row["kept"] + row["quarantined"], row
    assert row["peak_delta_mb"] < PEAK_MB, row


def test_import_quarantines_every_bad_line_by_file_and_line(pipeline):
    row, expect = pipeline["rows"]["scrape"], pipeline["expect"]
    _identity(row)
    assert row["kept"] == expect["good"]
    assert row["by_reason"] == expect["rejects"]
    rejects = [json.loads(x) for x in (pipeline["root"] / "raw" / "import_rejects.jsonl").read_text().splitlines()]
    got: dict[str, list[int]] = {}
    for r in rejects:
        assert r["file"].endswith("recipes.jsonl") and r["position"].startswith("line ")
        got.setdefault(r["reason"], []).append(int(r["position"].split()[1]))
    assert got == expect["reject_lines"]  # the line each bad record was written on
    assert "over max_record_bytes" in next(r["detail"] for r in rejects if r["reason"] == "too_large")


def test_extract_keeps_or_rejects_every_record(pipeline):
    row = pipeline["rows"]["extract"]
    _identity(row)
    assert row["in"] == pipeline["rows"]["scrape"]["kept"]


def test_clean_splits_the_big_document_instead_of_crashing(pipeline):
    row, c = pipeline["rows"]["clean"], pipeline["res"]["clean"]["counts"]
    _identity(row)
    assert row["in"] == pipeline["rows"]["extract"]["kept"]
    assert c["split_documents"] >= 1 and c["rows_out"] > c["kept"] + 600  # the 5 MB document in ~650 parts
    from collections import Counter

    import pyarrow.parquet as pq

    t = pq.read_table(pipeline["root"] / "clean" / "recipes.parquet", columns=["n_chars", "dup_cluster"])
    big_id, n_parts = Counter(t.column("dup_cluster").to_pylist()).most_common(1)[0]
    big = [n for d, n in zip(t.column("dup_cluster").to_pylist(), t.column("n_chars").to_pylist()) if d == big_id]
    assert n_parts > 600 and max(big) <= 8000 and sum(big) > 4_900_000  # nothing lost but separators


def test_split_sends_every_row_to_one_side(pipeline):
    _identity(pipeline["rows"]["split"])


def test_mix_counts_every_row_available_or_quarantined(pipeline):
    row = pipeline["rows"]["mix"]
    _identity(row)
    assert row["in"] == pipeline["res"]["split"]["counts"]["train"]["total"]["docs"]


def test_tokenize_packs_or_quarantines_every_document(pipeline):
    row = pipeline["rows"]["tokenize"]
    _identity(row)
    assert row["kept"] > 0


# ------------------------------------------------------------------------------ the import, in detail
def _import(tmp_path, lines: list[bytes], trace: bool = False, **src):
    import tracemalloc

    from scrapers.dataset_import import ImportStats, import_rows
    from tasks.core.config import SourceConfig

    p = tmp_path / "d.jsonl.gz"
    with gzip.open(p, "wb") as f:
        for line in lines:
            f.write(line + b"\n")
    del lines
    s = SourceConfig(id="t", category="recipes", kind="dataset", path=str(p), id_field="id",
                     permission={"evidence_url": "https://e.org", "license": "CC0-1.0"}, **src)
    stats = ImportStats()
    if trace:
        tracemalloc.start()
    out = list(import_rows(s, stats))
    peak = tracemalloc.get_traced_memory()[1] if trace else None
    tracemalloc.stop()
    return [r for r, _ in out if r], [j for _, j in out if j], peak


def test_a_lone_surrogate_is_one_reject_and_the_rest_of_the_file_is_imported(tmp_path):
    rows, rej, _ = _import(tmp_path, [b'{"id": "a", "text": "ok"}', b'{"id": "b", "text": "x \\udc80 y"}',
                                      b'{"id": "c", "text": "also ok"}'])
    assert [r["url"] for r in rows] == ["dataset://t/a", "dataset://t/c"]
    assert [(j["position"], j["reason"]) for j in rej] == [("line 2", "invalid_unicode")]


def test_a_row_over_the_cap_is_read_in_bounded_memory_and_quarantined(tmp_path):
    big = b'{"id": "big", "text": "' + b"a" * (30 << 20) + b'"}'
    rows, rej, peak = _import(tmp_path, [big, b'{"id": "s", "text": "small"}'], trace=True, max_record_bytes=1 << 20)
    assert [r["url"] for r in rows] == ["dataset://t/s"]
    assert rej[0]["position"] == "line 1" and rej[0]["reason"] == "too_large" and rej[0]["detail"].startswith("31,457,3")
    assert peak < 8 << 20, peak  # the 30 MB line is never held (it is read in 1 MiB pieces)
