"""Tokenize and pack documents into fixed-size Arrow shards, and read them back for training.

Writes ``tokenized/<tokenizer-fingerprint[:16]>/``:
  ``train/shard-NNNNN.arrow``             the mixed training stream
  ``eval/<category>/shard-NNNNN.arrow``   one held-out stream per category
Each row is ``seq_len`` token ids (uint16, or uint32 when the vocabulary exceeds 65,535) holding
several documents, each ended by EOS. ``seg_starts`` records where each document segment begins so
training can keep attention inside documents; ``seg_categories`` says which category each segment
came from; ``length`` is the number of real tokens (the rest is padding in the last row only).

The reader (``PackedShards``) memory-maps the shards; its order is a permutation drawn from
(seed, epoch), so a data position is just (epoch, batch index): resuming costs O(1).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
from prefect import task

from tasks.config import CATEGORIES, PipelineConfig, config_from_dict, load_config
from tasks.manifest import Stage, require_manifest

log = logging.getLogger(__name__)


def id_dtype(vocab_size: int) -> pa.DataType:
    return pa.uint16() if vocab_size <= 65_536 else pa.uint32()


def row_schema(seq_len: int, vocab_size: int) -> pa.Schema:
    return pa.schema(
        [
            ("input_ids", pa.list_(id_dtype(vocab_size), seq_len)),
            ("seg_starts", pa.list_(pa.int32())),
            ("seg_categories", pa.list_(pa.int8())),
            ("length", pa.int32()),
        ]
    )


class ShardWriter:
    """Writes packed rows into Arrow IPC files of ``rows_per_shard`` rows each."""

    def __init__(self, out_dir: Path, seq_len: int, vocab_size: int, rows_per_shard: int):
        self.out_dir, self.seq_len, self.rows_per_shard = out_dir, seq_len, rows_per_shard
        self.schema = row_schema(seq_len, vocab_size)
        self.np_dtype = np.uint16 if self.schema.field("input_ids").type.value_type == pa.uint16() else np.uint32
        self.buf: list[tuple[np.ndarray, list[int], list[int], int]] = []
        self.shards: list[str] = []
        self.rows = 0
        out_dir.mkdir(parents=True, exist_ok=True)

    def add(self, ids: np.ndarray, seg_starts: list[int], seg_cats: list[int], length: int) -> None:
        self.buf.append((ids, seg_starts, seg_cats, length))
        if len(self.buf) == self.rows_per_shard:
            self.flush()

    def flush(self) -> None:
        if not self.buf:
            return
        flat = np.concatenate([b[0] for b in self.buf]).astype(self.np_dtype, copy=False)
        ids = pa.FixedSizeListArray.from_arrays(pa.array(flat, type=self.schema.field("input_ids").type.value_type), self.seq_len)
        table = pa.table(
            [
                ids,
                pa.array([b[1] for b in self.buf], type=pa.list_(pa.int32())),
                pa.array([b[2] for b in self.buf], type=pa.list_(pa.int8())),
                pa.array([b[3] for b in self.buf], type=pa.int32()),
            ],
            schema=self.schema,
        )
        path = self.out_dir / f"shard-{len(self.shards):05d}.arrow"
        with pa.OSFile(str(path), "wb") as sink, ipc.new_file(sink, self.schema) as writer:
            writer.write_table(table, max_chunksize=1024)
        self.shards.append(path.name)
        self.rows += len(self.buf)
        self.buf = []


class Packer:
    """Greedy packer: concatenates documents (each + EOS) and cuts rows of exactly seq_len.

    A document longer than the space left continues in the next row as a new segment, so no
    token is dropped; only the final row is padded."""

    def __init__(self, writer: ShardWriter, eos_id: int, pad_id: int):
        self.w, self.eos, self.pad = writer, eos_id, pad_id
        self.cur: list[int] = []
        self.starts: list[int] = []
        self.cats: list[int] = []
        self.tokens = 0
        self.docs = 0

    def add(self, ids: list[int], cat: int) -> None:
        seq = list(ids) + [self.eos]
        self.tokens += len(seq)
        self.docs += 1
        while seq:
            room = self.w.seq_len - len(self.cur)
            self.starts.append(len(self.cur))
            self.cats.append(cat)
            self.cur.extend(seq[:room])
            seq = seq[room:]
            if len(self.cur) == self.w.seq_len:
                self._emit()

    def _emit(self) -> None:
        n = len(self.cur)
        ids = np.full(self.w.seq_len, self.pad, dtype=np.int64)
        ids[:n] = self.cur
        self.w.add(ids, self.starts, self.cats, n)
        self.cur, self.starts, self.cats = [], [], []

    def close(self) -> None:
        if self.cur:
            self._emit()
        self.w.flush()


def _stable_order(doc_ids: Iterable[str], seed: int) -> list[int]:
    keys = [hashlib.sha256(f"{seed}:{d}".encode()).digest() for d in doc_ids]
    return sorted(range(len(keys)), key=keys.__getitem__)


def _encode(tok, texts: list[str]) -> list[list[int]]:
    return tok(texts, add_special_tokens=False)["input_ids"] if texts else []


def _train_stream(mix_dir: Path, seed: int) -> Iterator[tuple[int, list[str]]]:
    """Yield (category id, texts) batches: every selected doc ``repeat`` times, copies of one doc in
    separate passes so they never share a row, categories interleaved batch by batch."""
    tables = {}
    for cat in CATEGORIES:
        p = mix_dir / f"{cat}.parquet"
        if p.is_file():
            t = pq.read_table(p, columns=["doc_id", "text", "repeat"])
            order = _stable_order(t.column("doc_id").to_pylist(), seed)
            tables[cat] = (t.column("text").to_pylist(), t.column("repeat").to_pylist(), order)
    max_rep = max((max(r, default=1) for _, r, _ in tables.values()), default=0)
    for rep in range(max_rep):
        streams = {
            cat: [texts[i] for i in order if reps[i] > rep] for cat, (texts, reps, order) in tables.items()
        }
        # round-robin in small batches so every shard carries every category
        pos = dict.fromkeys(streams, 0)
        while any(pos[c] < len(streams[c]) for c in streams):
            for cat, docs in streams.items():
                if pos[cat] < len(docs):
                    # batch size proportional to the category's share keeps the interleave even
                    step = max(1, len(docs) // 64)
                    yield CATEGORIES.index(cat), docs[pos[cat] : pos[cat] + step]
                    pos[cat] += step


def tokenizer_dir_name(tok_fp: str) -> str:
    return tok_fp[:16]


def run_tokenize(cfg: PipelineConfig, tokenizer=None) -> dict[str, Any]:
    from tasks.model import load_tokenizer, resolve_base, tokenizer_fingerprint

    root = cfg.root
    mix_m = require_manifest(root / "mix", "mix")
    split_m = require_manifest(root / "split", "split")
    tok = tokenizer or load_tokenizer(resolve_base(cfg.model, root / "models"), cfg.model)
    tok_fp = tokenizer_fingerprint(tok)
    out_dir = root / "tokenized" / tokenizer_dir_name(tok_fp)
    stage = Stage(
        "tokenize",
        out_dir,
        {**cfg.section("tokenize"), "seed": cfg.seed},
        {"mix": mix_m["fingerprint"], "split": split_m["fingerprint"], "tokenizer": tok_fp},
    )
    if done := stage.up_to_date():
        log.info("tokenize: up to date (%s)", out_dir)
        return done
    tc = cfg.tokenize
    vocab = len(tok)
    eos = tok.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    counts: dict[str, Any] = {"train": {}, "eval": {}}
    t0 = time.time()
    with stage.building() as work:
        # training stream: mixed categories
        w = ShardWriter(work / "train", tc.seq_len, vocab, tc.rows_per_shard)
        packer = Packer(w, eos, pad)
        per_cat = dict.fromkeys(CATEGORIES, 0)
        for cat_id, texts in _train_stream(root / "mix" / "train", cfg.seed):
            for start in range(0, len(texts), tc.batch_docs):
                for ids in _encode(tok, texts[start : start + tc.batch_docs]):
                    packer.add(ids, cat_id)
                    per_cat[CATEGORIES[cat_id]] += len(ids) + 1
        packer.close()
        counts["train"] = {"rows": w.rows, "shards": len(w.shards), "documents": packer.docs,
                           "tokens": packer.tokens, "tokens_per_category": per_cat}
        log.info("tokenize: train %d docs -> %d tokens -> %d rows of %d (%.0f tok/s)",
                 packer.docs, packer.tokens, w.rows, tc.seq_len, packer.tokens / max(time.time() - t0, 1e-9))
        # held-out streams: one per category, never mixed
        for cat_id, cat in enumerate(CATEGORIES):
            p = root / "split" / "eval" / f"{cat}.parquet"
            if not p.is_file():
                continue
            ew = ShardWriter(work / "eval" / cat, tc.seq_len, vocab, tc.rows_per_shard)
            ep = Packer(ew, eos, pad)
            pf = pq.ParquetFile(p)
            for batch in pf.iter_batches(batch_size=tc.batch_docs, columns=["text"]):
                for ids in _encode(tok, batch.column("text").to_pylist()):
                    ep.add(ids, cat_id)
            ep.close()
            if ew.rows:
                counts["eval"][cat] = {"rows": ew.rows, "documents": ep.docs, "tokens": ep.tokens}
        return stage.manifest(
            work,
            counts,
            tokenizer_fingerprint=tok_fp,
            tokenizer=getattr(tok, "name_or_path", ""),
            seq_len=tc.seq_len,
            vocab_size=vocab,
            id_dtype=str(id_dtype(vocab)),
            eos_id=eos,
            pad_id=pad,
            categories=list(CATEGORIES),
        )


def tokenized_dir(cfg: PipelineConfig, tok_fp: str) -> Path:
    return cfg.root / "tokenized" / tokenizer_dir_name(tok_fp)


# ------------------------------------------------------------------------------------ reading
@dataclass(frozen=True)
class DataPosition:
    """Where training is in the data: enough to resume in O(1)."""

    epoch: int = 0
    batch: int = 0  # micro-batches already consumed in this epoch, per rank


class PackedShards:
    """Memory-mapped view over a directory of packed shards (zero-copy numpy views per record batch)."""

    def __init__(self, shard_dir: Path):
        files = sorted(Path(shard_dir).glob("shard-*.arrow"))
        if not files:
            raise FileNotFoundError(f"no shards in {shard_dir}")
        self.batches_: list[tuple[np.ndarray, pa.Array, np.ndarray]] = []
        for f in files:
            reader = ipc.open_file(pa.memory_map(str(f), "r"))
            for k in range(reader.num_record_batches):
                rb = reader.get_batch(k)
                seq = rb.schema.field("input_ids").type.list_size
                ids = rb.column("input_ids").values.to_numpy(zero_copy_only=True).reshape(-1, seq)
                self.batches_.append((ids, rb.column("seg_starts"), rb.column("length").to_numpy()))
        self.offsets = np.cumsum([0] + [b[0].shape[0] for b in self.batches_])
        self.seq_len = self.batches_[0][0].shape[1]

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def rows(self, idx: Iterable[int]) -> dict[str, Any]:
        ids, starts, lengths = [], [], []
        for i in idx:
            k = int(np.searchsorted(self.offsets, i, side="right") - 1)
            arr, seg, length = self.batches_[k]
            j = int(i - self.offsets[k])
            ids.append(arr[j])
            starts.append(seg[j].as_py())
            lengths.append(int(length[j]))
        return {"input_ids": np.stack(ids).astype(np.int64), "seg_starts": starts, "length": lengths}

    def order(self, seed: int, epoch: int, rank: int = 0, world: int = 1) -> np.ndarray:
        """This rank's row order for an epoch: a seeded global shuffle, dealt round-robin, trimmed so
        every rank sees the same number of rows (DDP steps stay in lockstep)."""
        perm = np.random.default_rng([seed, epoch]).permutation(len(self))
        per_rank = len(perm) // world
        return perm[rank : per_rank * world : world]

    def batches(self, seed: int, micro_batch: int, start: DataPosition, rank: int = 0, world: int = 1
                ) -> Iterator[tuple[DataPosition, dict[str, Any]]]:
        """Endless micro-batches from ``start``; yields the position *after* each batch."""
        epoch, b = start.epoch, start.batch
        while True:
            order = self.order(seed, epoch, rank, world)
            n = len(order) // micro_batch
            if n == 0:
                raise ValueError(f"{len(order)} rows per rank cannot fill one micro-batch of {micro_batch}")
            while b < n:
                idx = order[b * micro_batch : (b + 1) * micro_batch]
                b += 1
                yield DataPosition(epoch, b), self.rows(idx)
            epoch, b = epoch + 1, 0


def collate(rows: dict[str, Any]):
    """Torch tensors for a packed batch: position ids restart at every document so attention stays
    inside documents (transformers builds the block-diagonal mask from them), and no label
    crosses a document boundary or falls on padding."""
    import torch

    ids = torch.from_numpy(rows["input_ids"])
    bsz, seq = ids.shape
    pos = torch.zeros_like(ids)
    labels = ids.clone()
    for r in range(bsz):
        starts = list(rows["seg_starts"][r]) + [seq]
        for a, b in zip(starts[:-1], starts[1:]):
            pos[r, a:b] = torch.arange(b - a)
        for a in starts[1:-1]:
            labels[r, a] = -100  # first token of a new document is not predicted from the previous one
        n = rows["length"][r]
        labels[r, n:] = -100
        if n < seq:
            pos[r, n:] = torch.arange(seq - n)
    return {"input_ids": ids, "position_ids": pos, "labels": labels}


def check_tokenizer(manifest: dict[str, Any], tok_fp: str, where: Path) -> None:
    if manifest.get("tokenizer_fingerprint") != tok_fp:
        raise ValueError(
            f"{where}: shards were tokenized with tokenizer {str(manifest.get('tokenizer_fingerprint'))[:16]}, "
            f"but the model's tokenizer is {tok_fp[:16]}; re-run the tokenize stage for this model"
        )


# ------------------------------------------------------------------------------- entry points
@task(name="tokenize")
def tokenize(cfg_dict: dict) -> dict:
    return run_tokenize(config_from_dict(cfg_dict))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Tokenize and pack the mixed corpus into Arrow shards.")
    ap.add_argument("--config", required=True)
    ap.add_argument("overrides", nargs="*", help="section.key=value")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    m = run_tokenize(load_config(a.config, a.overrides))
    print(f"tokenize: {m['counts']['train']['rows']} training rows, eval categories {list(m['counts']['eval'])}")


if __name__ == "__main__":
    main()
