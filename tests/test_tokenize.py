"""Packing round-trips, document boundaries, loader determinism and O(1) resume."""

import json

import numpy as np
import pyarrow as pa
import pytest

from tasks.core.manifest import sha256_file
from tasks.tokenize.loader import DataPosition, PackedShards, check_tokenizer, collate
from tasks.tokenize.pack import Packer, ShardWriter, id_dtype


def _pack(tmp_path, docs, seq_len=16, rows_per_shard=4, vocab=1000, eos=0, pad=1):
    w = ShardWriter(tmp_path / "shards", seq_len, vocab, rows_per_shard)
    p = Packer(w, eos_id=eos, pad_id=pad)
    for d in docs:
        p.add(d, cat=2)
    p.close()
    return w, p


def _unpack(shards: PackedShards):
    """Reassemble the token stream and split it at EOS back into documents."""
    rows = shards.rows(range(len(shards)))
    stream = []
    for ids, n in zip(rows["input_ids"], rows["length"]):
        stream.extend(ids[:n].tolist())
    return stream


def test_pack_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    docs = [rng.integers(2, 1000, size=int(rng.integers(1, 40))).tolist() for _ in range(50)]
    w, p = _pack(tmp_path, docs)
    shards = PackedShards(tmp_path / "shards")
    stream = _unpack(shards)
    assert p.tokens == sum(len(d) + 1 for d in docs) == len(stream)  # tokens in == tokens out
    assert stream == [t for d in docs for t in d + [0]]  # every document ends in EOS, order kept
    assert len(w.shards) == -(-w.rows // 4)
    rows = shards.rows(range(len(shards)))
    assert all(n == 16 for n in rows["length"][:-1])  # only the last row is padded
    assert rows["input_ids"].shape[1] == 16


def test_segment_starts_mark_documents(tmp_path):
    _pack(tmp_path, [[5, 6, 7], [8, 9], list(range(10, 40))], seq_len=8)
    rows = PackedShards(tmp_path / "shards").rows([0, 1])
    assert rows["seg_starts"][0] == [0, 4, 7]  # [5,6,7,EOS][8,9,EOS][10...
    assert rows["seg_starts"][1] == [0]  # a long document continues as a new segment


def test_id_width_follows_vocab():
    assert id_dtype(49152) == pa.uint16()
    assert id_dtype(131072) == pa.uint32()


def test_uint32_round_trip(tmp_path):
    docs = [[70000, 131071, 5], [99999]]
    _pack(tmp_path, docs, vocab=131072)
    assert _unpack(PackedShards(tmp_path / "shards")) == [70000, 131071, 5, 0, 99999, 0]


def test_collate_keeps_attention_and_labels_inside_documents(tmp_path):
    _pack(tmp_path, [[5, 6, 7], [8, 9]], seq_len=8)
    b = collate(PackedShards(tmp_path / "shards").rows([0]))
    assert b["position_ids"][0].tolist() == [0, 1, 2, 3, 0, 1, 2, 0]
    assert b["labels"][0].tolist() == [5, 6, 7, 0, -100, 9, 0, -100]  # boundary and padding masked


def test_loader_resume_is_exact_and_O1(tmp_path):
    rng = np.random.default_rng(1)
    _pack(tmp_path, [rng.integers(2, 1000, size=30).tolist() for _ in range(40)], rows_per_shard=8)
    shards = PackedShards(tmp_path / "shards")
    full = []
    it = shards.batches(seed=3, micro_batch=2, start=DataPosition())
    for _ in range(60):  # crosses epoch boundaries
        pos, rows = next(it)
        full.append((pos, rows["input_ids"].copy()))
    k = 23
    resumed = shards.batches(seed=3, micro_batch=2, start=full[k - 1][0])
    for j in range(k, 60):
        pos, rows = next(resumed)
        assert pos == full[j][0]
        np.testing.assert_array_equal(rows["input_ids"], full[j][1])


def test_epoch_covers_every_row_once_and_ranks_are_disjoint(tmp_path):
    _pack(tmp_path, [[i + 2] * 15 for i in range(33)], rows_per_shard=5)
    shards = PackedShards(tmp_path / "shards")
    orders = [shards.order(seed=0, epoch=0, rank=r, world=2) for r in range(2)]
    assert len(orders[0]) == len(orders[1]) == len(shards) // 2
    assert not set(orders[0]) & set(orders[1])
    assert sorted(shards.order(0, 0)) == list(range(len(shards)))
    assert not np.array_equal(shards.order(0, 0), shards.order(0, 1))  # a new shuffle each epoch


def test_tokenizer_mismatch_refused(tmp_path):
    with pytest.raises(ValueError, match="re-run the tokenize stage"):
        check_tokenizer({"tokenizer_fingerprint": "a" * 64}, "b" * 64, tmp_path)


def test_run_tokenize_manifest(tmp_path, tiny_model_dir):
    import pyarrow.parquet as pq
    from conftest import tiny_config_dict

    from tasks.core.config import config_from_dict
    from tasks.core.manifest import write_json_atomic
    from tasks.core.model import load_tokenizer, tokenizer_fingerprint
    from tasks.tokenize.stage import run_tokenize

    cfg = config_from_dict(tiny_config_dict(tmp_path, tiny_model_dir))
    texts = {"recipes": ["Red lentil soup with cumin and lemon."] * 5, "code": ["def f(x):\n    return x"] * 3}
    for _split, d in (("train", tmp_path / "mix" / "train"), ("eval", tmp_path / "split" / "eval")):
        d.mkdir(parents=True)
        for cat, ts in texts.items():
            pq.write_table(pa.table({"doc_id": [f"{cat}{i}" for i in range(len(ts))], "text": ts,
                                     "repeat": [2] * len(ts)}), d / f"{cat}.parquet")
    write_json_atomic(tmp_path / "mix" / "manifest.json", {"fingerprint": "m"})
    write_json_atomic(tmp_path / "split" / "manifest.json", {"fingerprint": "s"})
    tok = load_tokenizer(str(tiny_model_dir), cfg.model)
    m = run_tokenize(cfg)
    n_tok = {c: sum(len(tok(t, add_special_tokens=False)["input_ids"]) + 1 for t in ts) for c, ts in texts.items()}
    assert m["counts"]["train"]["tokens_per_category"]["recipes"] == 2 * n_tok["recipes"]  # repeat honoured
    assert m["counts"]["train"]["documents"] == 16
    assert set(m["counts"]["eval"]) == {"recipes", "code"}
    assert m["tokenizer_fingerprint"] == tokenizer_fingerprint(tok)
    out = tmp_path / "tokenized" / m["tokenizer_fingerprint"][:16]
    for rel, digest in m["files"].items():
        assert sha256_file(out / rel) == digest
    assert run_tokenize(cfg)["fingerprint"] == m["fingerprint"]  # unchanged inputs: skipped
    assert json.loads((out / "manifest.json").read_text())["created_at"] == m["created_at"]


# ------------------------------------------------------------------------------ token cache
WORDS = "red lentil soup rinse onion carrot olive oil cumin stock simmer lemon salt oat flour water kcal acid".split()


def _write_split(root, n_train: int, n_eval: int, seed: int = 0, fingerprint: str = "s1", start: int = 0):
    """split/{train,eval}/<category>.parquet with random food sentences, plus a stand-in split manifest."""
    import random
    import shutil

    import pyarrow.parquet as pq

    from tasks.core.manifest import write_json_atomic

    rng = random.Random(seed)
    texts = {}
    for side, n in (("train", n_train), ("eval", n_eval)):
        d = root / "split" / side
        for cat in ("recipes", "code"):
            ts = [" ".join(rng.choices(WORDS, k=rng.randint(3, 40))) for _ in range(n)]
            old = pq.read_table(d / f"{cat}.parquet").to_pylist() if (d / f"{cat}.parquet").is_file() else []
            rows = old + [{"doc_id": f"{side}-{cat}-{start + i}", "text": t, "dup_cluster": f"{side}-{cat}-{start + i}"}
                          for i, t in enumerate(ts)]
            d.mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.Table.from_pylist(rows), d / f"{cat}.parquet")
            texts[side, cat] = [r["text"] for r in rows]
    shutil.rmtree(root / "mix", ignore_errors=True)
    write_json_atomic(root / "split" / "manifest.json", {"stage": "split", "fingerprint": fingerprint})
    return texts


def _prepare(root, model_dir, **tokenize):
    from conftest import tiny_config_dict

    from tasks.core.config import config_from_dict
    from tasks.mix import run_mix
    from tasks.tokenize.cache import Encoder
    from tasks.tokenize.stage import run_tokenize

    cfg = config_from_dict(tiny_config_dict(root, model_dir, mix={"ratios": {"recipes": 0.7, "code": 0.3}},
                                            tokenize={"seq_len": 32, "rows_per_shard": 8, "batch_docs": 16,
                                                      "shuffle_bucket_rows": 16, **tokenize}))
    n0 = Encoder.texts_encoded
    mix_m = run_mix(cfg)
    n1 = Encoder.texts_encoded
    tok_m = run_tokenize(cfg)
    return mix_m, tok_m, (n1 - n0, Encoder.texts_encoded - n1)


def _outputs(m):
    return {k: v for k, v in m["files"].items() if k != "config.yaml"}  # config.yaml holds the data root


def test_shards_identical_with_and_without_cache(tmp_path, tiny_model_dir):
    """No cache, cold cache (small segments), warm cache: the same bytes; a warm re-run encodes
    nothing; the shards hold exactly the tokenizer's ids of every document (+ EOS)."""
    import shutil

    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    roots = {k: tmp_path / k for k in ("plain", "cached")}
    texts = {k: _write_split(r, 60, 12) for k, r in roots.items()}
    plain_mix, plain_tok, (mix_n, tok_n) = _prepare(roots["plain"], tiny_model_dir, token_cache=False)
    assert not (roots["plain"] / "tokcache").exists()
    assert (mix_n, tok_n) == (120, plain_tok["counts"]["train"]["documents"] + 24)  # the old way: twice
    cold_mix, cold_tok, (mix_n, tok_n) = _prepare(roots["cached"], tiny_model_dir, cache_segment_tokens=64)
    assert (mix_n, tok_n) == (120, 24)  # each text once: train in mix, eval in tokenize
    assert len(list((roots["cached"] / "tokcache").glob("*/train/recipes/*.arrow"))) > 2
    shutil.rmtree(roots["cached"] / "mix")
    shutil.rmtree(roots["cached"] / "tokenized")
    warm_mix, warm_tok, (mix_n, tok_n) = _prepare(roots["cached"], tiny_model_dir, cache_segment_tokens=64)
    assert (mix_n, tok_n) == (0, 0)
    assert warm_tok["token_cache"]["cached"] == 24 + warm_tok["counts"]["train"]["documents"]
    assert _outputs(plain_mix) == _outputs(cold_mix) == _outputs(warm_mix)
    assert _outputs(plain_tok) == _outputs(cold_tok) == _outputs(warm_tok)
    assert plain_tok["counts"] == warm_tok["counts"]
    # from scratch: the tokenizer's own ids
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)  # the model's tokenizer as transformers loads it
    out = roots["cached"] / "tokenized" / warm_tok["tokenizer_fingerprint"][:16]
    for cat in ("recipes", "code"):
        shards = PackedShards(out / "eval" / cat)
        rows = shards.rows(range(len(shards)))
        stream = [t for ids, n in zip(rows["input_ids"], rows["length"]) for t in ids[:n].tolist()]
        assert stream == [t for s in texts["cached"]["eval", cat]
                          for t in tok(s, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]
    want = []
    for cat in ("recipes", "code"):
        for r in pq.read_table(roots["cached"] / "mix" / "train" / f"{cat}.parquet").to_pylist():
            want += (tok(r["text"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]) * r["repeat"]
    tr = PackedShards(out / "train")
    trows = tr.rows(range(len(tr)))
    assert sorted(t for ids, n in zip(trows["input_ids"], trows["length"]) for t in ids[:n].tolist()) == sorted(want)


def test_rescrape_and_lost_segments(tmp_path, tiny_model_dir, caplog):
    """Added documents: mix encodes only the new training ones, tokenize only the new held-out ones.
    Training segments lost between mix and tokenize: tokenize says so, encodes those documents
    again and writes the same bytes."""
    import logging
    import shutil

    root = tmp_path / "r"
    _write_split(root, 40, 10)
    _prepare(root, tiny_model_dir)
    _write_split(root, 7, 3, seed=1, fingerprint="s2", start=1000)  # a re-scrape: 7 + 3 new docs per category
    mix_m, tok_m, (mix_n, tok_n) = _prepare(root, tiny_model_dir)
    assert (mix_n, tok_n) == (14, 6)
    # the same corpus from scratch, without the cache
    ref = tmp_path / "ref"
    _write_split(ref, 40, 10)
    _write_split(ref, 7, 3, seed=1, fingerprint="s2", start=1000)
    ref_mix, ref_tok, _ = _prepare(ref, tiny_model_dir, token_cache=False)
    assert _outputs(mix_m) == _outputs(ref_mix) and _outputs(tok_m) == _outputs(ref_tok)
    # lose every training segment of one category after mix: tokenize rebuilds it, with a warning
    shutil.rmtree(root / "tokenized")
    lost = list((root / "tokcache").glob("*/train/code/*.arrow"))
    assert lost
    for p in lost:
        p.unlink()
    from conftest import tiny_config_dict

    from tasks.core.config import config_from_dict
    from tasks.tokenize.cache import Encoder
    from tasks.tokenize.stage import run_tokenize

    cfg = config_from_dict(tiny_config_dict(root, tiny_model_dir, mix={"ratios": {"recipes": 0.7, "code": 0.3}},
                                            tokenize={"seq_len": 32, "rows_per_shard": 8, "batch_docs": 16,
                                                      "shuffle_bucket_rows": 16}))
    n0 = Encoder.texts_encoded
    with caplog.at_level(logging.WARNING, logger="tasks.tokenize"):
        again = run_tokenize(cfg)
    import pyarrow.parquet as pq

    code_docs = pq.read_table(root / "mix" / "train" / "code.parquet").num_rows
    assert 0 < Encoder.texts_encoded - n0 <= code_docs * 4  # once per copy (repeat passes), never the others
    assert "were not in the token cache" in caplog.text
    assert _outputs(again) == _outputs(ref_tok)
    assert list((root / "tokcache").glob("*/train/code/*.arrow"))  # cached again


def test_worker_processes_give_the_same_bytes(tmp_path, tiny_model_dir):
    """count_job and encode_job in a local spawn pool (2 workers), cold cache: same output as in-process."""
    a, b = tmp_path / "a", tmp_path / "b"
    _write_split(a, 30, 6)
    _write_split(b, 30, 6)
    mix_a, tok_a, _ = _prepare(a, tiny_model_dir)
    mix_b, tok_b, _ = _prepare(b, tiny_model_dir, workers=2)
    assert mix_b["token_cache"]["encoded"] == 60 and tok_b["token_cache"]["encoded"] == 12
    assert _outputs(mix_a) == _outputs(mix_b) and _outputs(tok_a) == _outputs(tok_b)


def test_key_index_finds_exact_keys_only():
    """Lookups compare all 16 bytes: keys sharing their first 8 bytes stay apart; a duplicated key
    resolves to its first occurrence; absent keys are -1."""
    from tasks.tokenize.cache import KeyIndex

    rng = np.random.default_rng(0)
    keys = rng.integers(0, 256, (500, 16), dtype=np.uint8)
    keys[10, :8] = keys[20, :8]
    keys[30] = keys[40]
    near = keys[[10]].copy()
    near[0, 15] ^= 1
    pos = KeyIndex(keys).find(np.concatenate([keys, rng.integers(0, 256, (20, 16), dtype=np.uint8), near]))
    want = np.arange(500)
    want[40] = 30
    assert (pos[:500] == want).all() and (pos[500:] == -1).all()
