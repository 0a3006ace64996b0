"""Mix by tokens: ratios met within 1%, up-sampling capped, shortfall reported (seconds).

A tiny word-level tokenizer is built in memory, so a document's token count is its word count (+1
for the EOS the packer adds) and the tests need no model download.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks.core.config import CATEGORIES, config_from_dict
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


# ------------------------------------------------------------------------------- token cache
def _write_rows(root: Path, rows_per_cat: dict[str, list[dict]], fingerprint: str) -> None:
    out = root / "split" / "train"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for cat, rows in rows_per_cat.items():
        pq.write_table(pa.Table.from_pylist(rows), out / f"{cat}.parquet")
    (root / "split" / "manifest.json").write_text(json.dumps({"stage": "split", "fingerprint": fingerprint}))


def _docs(cat: str, n: int, seed: int, start: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"doc_id": f"{cat}-{i:05d}", "category": cat, "text": " ".join(rng.choices(VOCAB, k=rng.randint(5, 60)))}
            for i in range(start, start + n)]


def _cached_keys(root: Path, split: str = "train") -> dict[str, set[bytes]]:
    """Every key held by the token cache, per category (read from the segment files themselves)."""
    out: dict[str, set[bytes]] = {}
    for seg in (root / "tokcache").glob(f"*/{split}/*/*.arrow"):
        keys = pa.ipc.open_file(str(seg)).read_all().column("key").to_pylist()
        out.setdefault(seg.parent.name, set()).update(keys)
    return out


def test_rescrape_encodes_only_new_and_changed_documents(tmp_path, tok):
    """The encoder sees each text once: a re-run with added documents and one edited document
    encodes exactly those; n_tokens stays exact; text_hash names the text."""
    from tasks.tokenize.cache import Encoder, text_keys

    rows = {"recipes": _docs("recipes", 300, 1), "articles": _docs("articles", 120, 2)}
    _write_rows(tmp_path, rows, "split-1")
    cfg = make_cfg(tmp_path, mix={"ratios": {"recipes": 0.6, "articles": 0.4}})
    n0 = Encoder.texts_encoded
    m1 = run_mix(cfg, tokenizer=tok)
    assert Encoder.texts_encoded - n0 == 420  # cold: every document once
    assert m1["token_cache"]["encoded"] == 420 and m1["token_cache"]["cached"] == 0
    # re-scrape: 40 new recipes, 10 new articles, and one recipe whose text changed (same doc_id)
    rows["recipes"] += _docs("recipes", 40, 3, start=300)
    rows["articles"] += _docs("articles", 10, 4, start=120)
    rows["recipes"][7]["text"] += " w1 w2 w3"
    _write_rows(tmp_path, rows, "split-2")
    n1 = Encoder.texts_encoded
    m2 = run_mix(cfg, tokenizer=tok)
    assert Encoder.texts_encoded - n1 == 40 + 10 + 1
    assert m2["token_cache"]["encoded"] == 51 and m2["token_cache"]["cached"] == 470 - 51
    got = read_mix(tmp_path)
    by_id = {r["doc_id"]: r for rs in rows.values() for r in rs}
    for rs in got.values():
        for r in rs:
            assert r["text"] == by_id[r["doc_id"]]["text"]
            assert r["n_tokens"] == len(r["text"].split()) + 1
            assert r["text_hash"] == bytes(text_keys([r["text"]])[0])
    # the same plan as a run without the cache, byte for byte
    other = tmp_path / "nocache"
    _write_rows(other, rows, "split-2")
    m3 = run_mix(make_cfg(other, mix={"ratios": {"recipes": 0.6, "articles": 0.4}}, tokenize={"token_cache": False}),
                 tokenizer=tok)
    assert not (other / "tokcache").exists() and m3["token_cache"]["encoded"] == 470
    assert {k: v for k, v in m3["files"].items() if k != "config.yaml"} == \
        {k: v for k, v in m2["files"].items() if k != "config.yaml"}


def test_cache_is_collected_when_documents_leave_the_split(tmp_path, tok):
    """Entries the current split no longer has are dropped (segments deleted or compacted), and a
    category that left the split loses its whole cache directory."""
    rows = {"recipes": _docs("recipes", 200, 5), "code": _docs("code", 30, 6)}
    _write_rows(tmp_path, rows, "split-1")
    cfg = make_cfg(tmp_path, mix={"ratios": {"recipes": 0.5, "code": 0.5}}, tokenize={"cache_segment_tokens": 500})
    run_mix(cfg, tokenizer=tok)
    before = _cached_keys(tmp_path)
    assert len(before["recipes"]) == 200 and len(list((tmp_path / "tokcache").glob("*/train/recipes/*.arrow"))) > 3
    # kept whole / all gone / a third kept (segments kept, deleted, rewritten); code is gone entirely
    kept = {"recipes": rows["recipes"][:60] + rows["recipes"][120::3]}
    _write_rows(tmp_path, kept, "split-2")
    m = run_mix(make_cfg(tmp_path, mix={"ratios": {"recipes": 1.0}}, tokenize={"cache_segment_tokens": 500}), tokenizer=tok)
    from tasks.tokenize.cache import text_keys

    live = {bytes(k) for k in text_keys([r["text"] for r in kept["recipes"]])}
    after = _cached_keys(tmp_path)
    assert set(after) == {"recipes"} and not list((tmp_path / "tokcache").glob("*/train/code"))
    assert live <= after["recipes"] and len(after["recipes"]) < len(before["recipes"])
    assert m["token_cache"]["encoded"] == 0  # collecting re-encodes nothing
    assert m["token_cache"]["segments_dropped"] > 0 and m["token_cache"]["segments_compacted"] > 0
    for seg in (tmp_path / "tokcache").glob("*/train/recipes/*.arrow"):  # what stays is at least half live
        keys = pa.ipc.open_file(str(seg)).read_all().column("key").to_pylist()
        assert 2 * sum(k in live for k in keys) >= len(keys), seg


def test_corrupt_or_truncated_segment_is_detected_and_rebuilt(tmp_path, tok, caplog):
    from tasks.tokenize.cache import Encoder

    rows = {"recipes": _docs("recipes", 80, 7)}
    _write_rows(tmp_path, rows, "split-1")
    cfg = make_cfg(tmp_path, mix={"ratios": {"recipes": 1.0}}, tokenize={"cache_segment_tokens": 400})
    want = run_mix(cfg, tokenizer=tok)["files"]
    segs = sorted((tmp_path / "tokcache").glob("*/train/recipes/*.arrow"))
    assert len(segs) >= 3
    flipped, truncated = segs[0], segs[1]
    n_flipped = pa.ipc.open_file(str(flipped)).read_all().num_rows
    n_trunc = pa.ipc.open_file(str(truncated)).read_all().num_rows
    data = bytearray(flipped.read_bytes())
    ids = pa.ipc.open_file(str(flipped)).read_all().column("ids").combine_chunks().values
    needle = ids.buffers()[1].to_pybytes()[:8]  # a token id in the file: still parses, wrong content
    at = bytes(data).index(needle)
    data[at] ^= 0x01
    flipped.write_bytes(bytes(data))
    truncated.write_bytes(truncated.read_bytes()[:-100])
    (tmp_path / "mix" / "manifest.json").unlink()  # force the stage to run again
    n0 = Encoder.texts_encoded
    with caplog.at_level(logging.WARNING, logger="tasks.tokenize"):
        m = run_mix(cfg, tokenizer=tok)
    assert Encoder.texts_encoded - n0 == n_flipped + n_trunc  # exactly the lost documents, no more
    assert m["token_cache"]["segments_corrupt"] == 2
    assert str(flipped) in caplog.text and str(truncated) in caplog.text and "corrupt" in caplog.text
    from tasks.core.manifest import sha256_file

    for seg in (tmp_path / "tokcache").glob("*/train/recipes/*.arrow"):  # rebuilt (content-addressed: maybe same names)
        assert sha256_file(seg) == seg.stem
    assert {k: v for k, v in m["files"].items() if k != "config.yaml"} == \
        {k: v for k, v in want.items() if k != "config.yaml"}
    assert _cached_keys(tmp_path)["recipes"] and len(_cached_keys(tmp_path)["recipes"]) == 80  # rebuilt


def test_warm_cache_starts_no_worker():
    """A batch with nothing to encode is never submitted: a fully cached run starts no process pool."""
    import tasks.tokenize.cache as T

    ref = T.TokenizerRef("hf", "/nonexistent.json", "f" * 64)
    out = list(T.ordered_encode(T.encode_job, ref, ((i, []) for i in range(5)), workers=4))
    assert out == [(i, None) for i in range(5)]
