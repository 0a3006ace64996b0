"""The training side of the shards: the O(1)-resumable reader (a data position is a small state,
not a replay), the collate function and the tokenizer check. Editing it re-runs no data stage."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

from tasks.core.config import PipelineConfig
from tasks.tokenize.format import tokenizer_dir_name


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
        sizes = _manifest_sizes(Path(shard_dir))
        for f in files:
            want = sizes.get(f.resolve())
            if want is not None and f.stat().st_size != want:
                raise ValueError(f"{f}: {f.stat().st_size:,} bytes, but the tokenize manifest says {want:,}: the shard "
                                 "is truncated or was overwritten; re-run the tokenize stage (d2a stage tokenize)")
            try:
                reader = ipc.open_file(pa.memory_map(str(f), "r"))
            except (pa.ArrowInvalid, OSError) as e:
                raise ValueError(f"{f}: not a readable Arrow shard ({e}); it is truncated or corrupt: re-run the "
                                 "tokenize stage (d2a stage tokenize)") from e
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


def _manifest_sizes(shard_dir: Path) -> dict[Path, int]:
    """Recorded byte sizes of the shards, from the tokenize manifest above ``shard_dir`` (train/ or
    eval/<category>/); empty when there is none (shards written by hand, in tests)."""
    import json

    for d in (shard_dir.parent, shard_dir.parent.parent):
        m = d / "manifest.json"
        if m.is_file():
            try:
                sizes = json.loads(m.read_text(encoding="utf-8")).get("sizes") or {}
            except (OSError, ValueError):
                return {}
            return {(d / rel).resolve(): n for rel, n in sizes.items()}
    return {}


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
