"""Packing documents into fixed-length rows and writing them as Arrow shards (ids uint16/uint32,
document boundaries, category ids), with a bounded shuffle buffer."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

from tasks.tokenize.format import id_dtype


def row_schema(seq_len: int, vocab_size: int) -> pa.Schema:
    return pa.schema(
        [
            ("input_ids", pa.list_(id_dtype(vocab_size), seq_len)),
            ("seg_starts", pa.list_(pa.int32())),
            ("seg_categories", pa.list_(pa.int8())),
            ("length", pa.int32()),
        ]
    )


def rows_table(schema: pa.Schema, ids: np.ndarray, starts: list, cats: list, lengths: list) -> pa.Table:
    """Packed rows (ids: rows x seq_len) as a table of ``schema``."""
    id_type = schema.field("input_ids").type
    flat = pa.array(ids.reshape(-1).astype(id_type.value_type.to_pandas_dtype(), copy=False), type=id_type.value_type)
    return pa.table(
        [pa.FixedSizeListArray.from_arrays(flat, id_type.list_size),
         pa.array(starts, type=pa.list_(pa.int32())), pa.array(cats, type=pa.list_(pa.int8())),
         pa.array(lengths, type=pa.int32())],
        schema=schema,
    )


class ShardWriter:
    """Writes packed rows into Arrow IPC files of exactly ``rows_per_shard`` rows (the last one may be short)."""

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
        ids = np.stack([b[0] for b in self.buf]).astype(self.np_dtype, copy=False)
        table = rows_table(self.schema, ids, [b[1] for b in self.buf], [b[2] for b in self.buf], [b[3] for b in self.buf])
        path = self.out_dir / f"shard-{len(self.shards):05d}.arrow"
        with pa.OSFile(str(path), "wb") as sink, ipc.new_file(sink, self.schema) as writer:
            writer.write_table(table, max_chunksize=1024)
        self.shards.append(path.name)
        self.rows += len(self.buf)
        self.buf = []


class ShuffleBuckets:
    """First pass of the external shuffle: a row sink (same ``add`` as ShardWriter) that sends every
    row to one of ``n_buckets`` temporary Arrow streams chosen by a seeded RNG. ``drain`` is the
    second pass: each bucket is permuted in memory and its rows go to ``writer`` in bucket order."""

    def __init__(self, tmp_dir: Path, writer: ShardWriter, n_buckets: int, seed: int, max_rows_in_memory: int):
        self.tmp, self.w, self.k, self.seed = tmp_dir, writer, max(1, n_buckets), seed
        self.seq_len = writer.seq_len
        tmp_dir.mkdir(parents=True, exist_ok=True)
        self.flush_rows = max(1, min(1024, max_rows_in_memory // self.k))  # bounds pass-1 memory over all buckets
        self.rng = np.random.default_rng([seed, 0x5EED])
        self.choice = np.zeros(0, np.int64)
        self.buf: list[list] = [[] for _ in range(self.k)]
        self.writers: dict[int, ipc.RecordBatchStreamWriter] = {}
        self.sinks: dict[int, pa.OSFile] = {}
        self.rows = 0
        if self.k > 512:
            _raise_open_files_limit(self.k + 64)

    def add(self, ids: np.ndarray, seg_starts: list[int], seg_cats: list[int], length: int) -> None:
        if not len(self.choice):
            self.choice = self.rng.integers(0, self.k, 4096)
        b, self.choice = int(self.choice[0]), self.choice[1:]
        self.buf[b].append((ids.astype(self.w.np_dtype), seg_starts, seg_cats, length))
        self.rows += 1
        if len(self.buf[b]) >= self.flush_rows:
            self._flush(b)

    def _flush(self, b: int) -> None:
        rows = self.buf[b]
        if not rows:
            return
        if b not in self.writers:
            self.sinks[b] = pa.OSFile(str(self.tmp / f"bucket-{b:05d}.arrows"), "wb")
            self.writers[b] = ipc.new_stream(self.sinks[b], self.w.schema)
        self.writers[b].write_table(rows_table(self.w.schema, np.stack([r[0] for r in rows]), [r[1] for r in rows],
                                              [r[2] for r in rows], [r[3] for r in rows]))
        self.buf[b] = []

    def drain(self) -> None:
        for b in range(self.k):
            self._flush(b)
        for b in self.writers:
            self.writers[b].close()
            self.sinks[b].close()
        for b in range(self.k):
            path = self.tmp / f"bucket-{b:05d}.arrows"
            if not path.is_file():
                continue
            with pa.OSFile(str(path), "rb") as f:
                t = ipc.open_stream(f).read_all()
            perm = np.random.default_rng([self.seed, b]).permutation(t.num_rows)
            ids = t.column("input_ids").combine_chunks().values.to_numpy().reshape(t.num_rows, -1)
            starts, cats, lengths = (t.column(c).to_pylist() for c in ("seg_starts", "seg_categories", "length"))
            for i in perm:
                self.w.add(ids[i], starts[i], cats[i], lengths[i])
            del t, ids
            path.unlink()
        self.w.flush()
        shutil.rmtree(self.tmp, ignore_errors=True)


def _raise_open_files_limit(n: int) -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < n:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(n, hard), hard))


class Packer:
    """Greedy packer: concatenates documents (each + EOS) and cuts rows of exactly seq_len.

    A document longer than the space left continues in the next row as a new segment, so no
    token is dropped; only the final row is padded. Works on numpy arrays: a row is filled with
    slice copies, not token by token."""

    def __init__(self, writer: ShardWriter, eos_id: int, pad_id: int):
        self.w, self.eos, self.pad = writer, eos_id, pad_id
        self.row = np.full(writer.seq_len, pad_id, dtype=np.int64)
        self.n = 0
        self.starts: list[int] = []
        self.cats: list[int] = []
        self.tokens = 0
        self.docs = 0

    def add(self, ids, cat: int) -> None:
        seq = np.asarray(ids, dtype=np.int64)
        total = len(seq) + 1  # + EOS
        self.tokens += total
        self.docs += 1
        pos, L = 0, self.w.seq_len
        while pos < total:
            take = min(L - self.n, total - pos)
            self.starts.append(self.n)
            self.cats.append(cat)
            body = min(take, len(seq) - pos)  # document tokens in this piece; the EOS goes after them
            if body > 0:
                self.row[self.n : self.n + body] = seq[pos : pos + body]
            if body < take:
                self.row[self.n + body] = self.eos
            self.n += take
            pos += take
            if self.n == L:
                self._emit()

    def _emit(self) -> None:
        self.w.add(self.row.copy(), self.starts, self.cats, self.n)
        self.row[:] = self.pad
        self.n = 0
        self.starts, self.cats = [], []

    def close(self) -> None:
        if self.n:
            self._emit()
        if isinstance(self.w, ShuffleBuckets):
            self.w.drain()
        else:
            self.w.flush()
