"""Packing round-trips, document boundaries, loader determinism and O(1) resume."""

import json

import numpy as np
import pyarrow as pa
import pytest

from tasks.manifest import sha256_file
from tasks.tokenize import DataPosition, PackedShards, Packer, ShardWriter, check_tokenizer, collate, id_dtype


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
    from tasks.config import config_from_dict
    from tasks.manifest import write_json_atomic
    from tasks.model import load_tokenizer, tokenizer_fingerprint
    from tasks.tokenize import run_tokenize

    cfg = config_from_dict(tiny_config_dict(tmp_path, tiny_model_dir))
    texts = {"recipes": ["Red lentil soup with cumin and lemon."] * 5, "code": ["def f(x):\n    return x"] * 3}
    for split, d in (("train", tmp_path / "mix" / "train"), ("eval", tmp_path / "split" / "eval")):
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
