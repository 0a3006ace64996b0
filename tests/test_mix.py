"""Mix by tokens: ratios met within 1%, up-sampling capped, shortfall reported (seconds).

A tiny word-level tokenizer is built in memory, so a document's token count is its word count (+1
for the EOS the packer adds) and the tests need no model download.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks.config import CATEGORIES, config_from_dict
from tasks.mix import plan_total, run_mix, select

VOCAB = [f"w{i}" for i in range(500)]


def make_cfg(root: Path, **sections):
    return config_from_dict({"data_root": str(root), "scrape": {"sources": "configs/sources/demo.yaml"},
                             "model": {"name": "tiny"}, **sections})


@pytest.fixture(scope="module")
def tok():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "[EOS]": 1, **{w: i + 2 for i, w in enumerate(VOCAB)}}
    t = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=t, eos_token="[EOS]", unk_token="[UNK]", pad_token="[EOS]")


def write_train(root: Path, tokens_per_cat: dict[str, int], seed: int = 0, fingerprint: str = "split-1",
                words=(10, 90)) -> dict[str, int]:
    """Write split/train with about ``tokens`` words per category; returns exact n_tokens per category."""
    rng = random.Random(seed)
    out = root / "split" / "train"
    out.mkdir(parents=True, exist_ok=True)
    exact = {}
    for cat, tokens in tokens_per_cat.items():
        rows, total = [], 0
        while total < tokens:
            n = rng.randint(*words)
            rows.append({"doc_id": f"{cat}-{len(rows):05d}", "category": cat, "text": " ".join(rng.choices(VOCAB, k=n)),
                         "dup_cluster": f"{cat}-{len(rows):05d}"})
            total += n + 1
        pq.write_table(pa.Table.from_pylist(rows), out / f"{cat}.parquet")
        exact[cat] = total
    (root / "split" / "manifest.json").write_text(json.dumps({"stage": "split", "fingerprint": fingerprint}))
    return exact


def read_mix(root: Path) -> dict[str, list[dict]]:
    return {p.stem: pq.read_table(p).to_pylist() for p in sorted((root / "mix" / "train").glob("*.parquet"))}


def test_mixture_within_one_percent(tmp_path, tok):
    # some categories are over-supplied (sub-sampled), some under-supplied (up-sampled)
    avail = write_train(tmp_path, {"recipes": 300_000, "product_compositions": 150_000, "articles": 120_000,
                                   "code": 60_000, "product_descriptions": 20_000, "chemical_additives": 8_000})
    cfg = make_cfg(tmp_path)
    m = run_mix(cfg, tokenizer=tok)
    cats, total = m["counts"]["categories"], m["counts"]["total"]
    assert total["target_tokens"] == sum(avail.values())  # auto budget = corpus size here
    for cat, ratio in cfg.mix.ratios.items():
        c = cats[cat]
        assert c["available_tokens"] == avail[cat]
        assert abs(c["selected_tokens"] - c["target_tokens"]) <= 0.01 * c["target_tokens"], (cat, c)
        assert abs(c["achieved_share"] - ratio) <= 0.01 * ratio, (cat, c)
        assert c["repeat_factor"] <= cfg.mix.max_repeat and c["shortfall_tokens"] <= 0.01 * c["target_tokens"]
    assert cats["product_compositions"]["repeat_factor"] > 1 and cats["recipes"]["repeat_factor"] < 1
    rows = read_mix(tmp_path)
    for cat, rs in rows.items():
        assert all(r["repeat"] >= 1 and r["category"] == cat for r in rs)
        assert all(r["n_tokens"] == len(r["text"].split()) + 1 for r in rs)
        assert sum(r["n_tokens"] * r["repeat"] for r in rs) == cats[cat]["selected_tokens"]
        assert len({r["doc_id"] for r in rs}) == len(rs)
    assert m["inputs"]["tokenizer"] and m["inputs"]["split"] == "split-1"


def test_upsampling_capped_and_shortfall_reported(tmp_path, tok, caplog):
    avail = write_train(tmp_path, {"recipes": 40_000, "chemical_additives": 1_000})
    cfg = make_cfg(tmp_path, mix={"ratios": {"recipes": 0.9, "chemical_additives": 0.1}, "total_tokens": 30_000,
                                  "max_repeat": 2})
    with caplog.at_level(logging.WARNING, logger="tasks.mix"):
        m = run_mix(cfg, tokenizer=tok)
    add = m["counts"]["categories"]["chemical_additives"]
    assert add["target_tokens"] == 3_000
    assert add["selected_tokens"] == 2 * avail["chemical_additives"]  # capped at max_repeat
    assert add["repeat_factor"] == 2.0
    assert add["shortfall_tokens"] == 3_000 - 2 * avail["chemical_additives"] > 0
    assert m["counts"]["total"]["shortfall_tokens"] >= add["shortfall_tokens"]
    assert "chemical_additives" in caplog.text
    assert {r["repeat"] for r in read_mix(tmp_path)["chemical_additives"]} == {2}


def test_fractional_cap_and_missing_category(tmp_path, tok):
    # 'code' has ratio > 0 but no documents: it cannot bind the auto budget to zero
    avail = write_train(tmp_path, {"recipes": 50_000, "articles": 2_000})
    cfg = make_cfg(tmp_path, mix={"ratios": {"recipes": 0.5, "articles": 0.3, "code": 0.2}, "max_repeat": 2.5})
    m = run_mix(cfg, tokenizer=tok)
    cats, total = m["counts"]["categories"], m["counts"]["total"]
    assert total["target_tokens"] == int(avail["articles"] * 2.5 / 0.3)
    assert "articles" in total["budget_from"]
    assert cats["articles"]["selected_tokens"] <= 2.5 * avail["articles"]
    assert cats["articles"]["selected_tokens"] >= 2.5 * avail["articles"] - 100  # within one doc of the cap
    assert cats["code"]["available_tokens"] == 0 and cats["code"]["shortfall_tokens"] == cats["code"]["target_tokens"] > 0
    assert abs(cats["recipes"]["selected_tokens"] - cats["recipes"]["target_tokens"]) <= 100
    assert set(read_mix(tmp_path)) == {"recipes", "articles"}


def test_rerun_skipped_and_tokenizer_is_an_input(tmp_path, tok, caplog):
    write_train(tmp_path, {"recipes": 5_000, "articles": 3_000})
    cfg = make_cfg(tmp_path, mix={"ratios": {"recipes": 0.6, "articles": 0.4}})
    m1 = run_mix(cfg, tokenizer=tok)
    with caplog.at_level(logging.INFO, logger="tasks.mix"):
        m2 = run_mix(cfg, tokenizer=tok)
    assert m2["created_at"] == m1["created_at"] and "mix: up to date" in caplog.text
    other = type(tok)(tokenizer_object=tok.backend_tokenizer, eos_token="[UNK]", unk_token="[UNK]")
    assert run_mix(cfg, tokenizer=other)["inputs"]["tokenizer"] != m1["inputs"]["tokenizer"]


def test_selection_is_stable_and_seeded():
    rng = np.random.default_rng(0)
    n = rng.integers(10, 100, 1000)
    keys = rng.integers(0, 2**63, 1000).astype(np.uint64)
    a = select(n, keys, 20_000, 4.0)
    assert (a == select(n, keys, 20_000, 4.0)).all() and set(np.unique(a)) <= {0, 1}
    assert abs(int((n * a).sum()) - 20_000) <= 50
    up = select(n, keys, int(n.sum() * 2.5), 4.0)
    assert set(np.unique(up)) == {2, 3} and abs(int((n * up).sum()) - n.sum() * 2.5) <= 50
    assert plan_total({c: 0 for c in CATEGORIES}, {"recipes": 1.0}, None, 4.0)[0] == 0
