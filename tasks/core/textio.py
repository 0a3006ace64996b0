"""Reading and writing the per-category Parquet files that clean, split and mix pass along.

Each of those stages keeps one file per category (``<dir>/<category>.parquet``); a category with
no rows has no file, so readers must treat a missing file as "empty", never as an error. Files are
read in record batches and written through one ``ParquetWriter`` per category, so memory stays
bounded by the batch size, not the corpus.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from tasks.core.config import CATEGORIES

BATCH_ROWS = 1024  # rows per record batch, at most
BATCH_BYTES = 16 << 20  # uncompressed bytes per record batch, about (fewer rows when documents are long)
READ_BUFFER = 1 << 20  # bytes of a column chunk read at a time


def category_path(directory: Path, category: str) -> Path:
    return Path(directory) / f"{category}.parquet"


def category_files(directory: Path, include_unknown: bool = False) -> dict[str, Path]:
    """Category -> file for the categories present in ``directory``, in CATEGORIES order.

    With ``include_unknown``, other ``*.parquet`` files (an unknown category written upstream) are
    listed after the known ones so the caller can quarantine their rows instead of ignoring them.
    """
    directory = Path(directory)
    out = {c: category_path(directory, c) for c in CATEGORIES if category_path(directory, c).is_file()}
    if include_unknown and directory.is_dir():
        for p in sorted(directory.glob("*.parquet")):
            if p.stem not in out and p.stem != "rejects":
                out[p.stem] = p
    return out


def iter_batches(path: Path, columns: list[str] | None = None, batch_rows: int = BATCH_ROWS,
                 max_bytes: int = BATCH_BYTES) -> Iterator[pa.RecordBatch]:
    """Record batches of one Parquet file; a file that cannot be read fails with its path in the message.

    Memory stays bounded whatever the file's row groups: pyarrow's default ``pre_buffer`` reads
    every selected column chunk of the file up front (measured: a 42 MB single-row-group file held
    49 MB while yielding 64-row batches), so it is off and pages stream through a ``READ_BUFFER``
    window instead (same speed). Rows per batch are also capped so that an average batch holds
    about ``max_bytes`` of uncompressed data (long documents: fewer rows per batch)."""
    try:
        pf = pq.ParquetFile(path, pre_buffer=False, buffer_size=READ_BUFFER)
    except Exception as e:  # noqa: BLE001 - re-raised with the file named
        raise ValueError(f"{path}: not a readable Parquet file ({e})") from e
    if columns is not None:
        missing = [c for c in columns if c not in pf.schema_arrow.names]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing}; has {pf.schema_arrow.names}")
    yield from pf.iter_batches(batch_size=batch_rows_for(pf, columns, batch_rows, max_bytes), columns=columns)


def batch_rows_for(pf: pq.ParquetFile, columns: list[str] | None, batch_rows: int, max_bytes: int) -> int:
    """``batch_rows``, lowered so that the widest row group's average row (selected columns,
    uncompressed) times the batch size stays within ``max_bytes``; at least 1."""
    md = pf.metadata
    names = set(pf.schema_arrow.names if columns is None else columns)
    widest = 0.0
    for g in range(md.num_row_groups):
        rg = md.row_group(g)
        if rg.num_rows:
            size = sum(rg.column(c).total_uncompressed_size for c in range(rg.num_columns)
                       if rg.column(c).path_in_schema.split(".")[0] in names)
            widest = max(widest, size / rg.num_rows)
    return max(1, min(batch_rows, int(max_bytes // widest))) if widest else batch_rows


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSONL file that a live process may be appending to: a torn last line is
    skipped, a missing file is empty."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            out.append(json.loads(line))
    return out


def num_rows(path: Path) -> int:
    return pq.ParquetFile(path).metadata.num_rows


class CategoryWriters:
    """One lazily opened ParquetWriter per key (category); the first table fixes the file's schema."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self._writers: dict[str, pq.ParquetWriter] = {}

    def write(self, key: str, table: pa.Table | pa.RecordBatch) -> None:
        if table.num_rows == 0:
            return
        if isinstance(table, pa.RecordBatch):
            table = pa.Table.from_batches([table])
        w = self._writers.get(key)
        if w is None:
            self.directory.mkdir(parents=True, exist_ok=True)
            w = self._writers[key] = pq.ParquetWriter(category_path(self.directory, key), table.schema)
        w.write_table(table.cast(w.schema) if table.schema != w.schema else table)

    @property
    def keys(self) -> list[str]:
        return list(self._writers)

    def close(self) -> None:
        for w in self._writers.values():
            w.close()
        self._writers.clear()

    def __enter__(self) -> CategoryWriters:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Progress:
    """Log ``what``: n items, rate and elapsed time at most every ``every_s`` seconds."""

    def __init__(self, log: logging.Logger, what: str, total: int | None = None, every_s: float = 10.0, unit: str = "docs"):
        self.log, self.what, self.total, self.every_s, self.unit = log, what, total, every_s, unit
        self.n = 0
        self.t0 = self._last = time.monotonic()

    def update(self, n: int) -> None:
        self.n += n
        now = time.monotonic()
        if now - self._last >= self.every_s:
            self._last = now
            rate = self.n / max(now - self.t0, 1e-9)
            eta = f", ETA {(self.total - self.n) / rate:.0f}s" if self.total and rate > 0 else ""
            of = f"/{self.total}" if self.total else ""
            self.log.info("%s: %d%s %s, %.0f %s/s%s", self.what, self.n, of, self.unit, rate, self.unit, eta)


def ordered_map(fn, items: Iterable[tuple[object, object]], workers: int = 1, window: int | None = None, executor=None):
    """For (context, job) pairs yield (context, fn(job)) in input order, so the output never depends
    on how the work was spread. ``executor`` (a ``distributed.Client`` or any object with
    ``submit(fn, arg)``) runs the jobs on a cluster; else ``workers`` > 1 runs them in a local
    process pool; else in this process. At most ``window`` jobs are in flight (default 2 x the
    workers), so memory stays bounded however long the input is. ``fn`` must be a picklable
    module-level function."""
    if executor is not None:
        window = window or 2 * max(_executor_slots(executor), 1)
        yield from _windowed(items, lambda job: _submit(executor, fn, job), window)
        return
    if workers <= 1:
        for ctx, job in items:
            yield ctx, fn(job)
        return
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    # spawn, not fork: the parent has threads (Prefect, Arrow) and forking those can deadlock
    with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
        yield from _windowed(items, lambda job: pool.submit(fn, job), window or 2 * workers)


def _windowed(items, submit, window: int):
    from collections import deque

    pending: deque = deque()
    for ctx, job in items:
        pending.append((ctx, submit(job)))
        if len(pending) >= window:
            c, fut = pending.popleft()
            yield c, fut.result()
    while pending:
        c, fut = pending.popleft()
        yield c, fut.result()


def _submit(executor, fn, job):
    if hasattr(executor, "scheduler_info"):  # distributed.Client: pure=False, or it would hash every batch to name the task
        return executor.submit(fn, job, pure=False)
    return executor.submit(fn, job)  # concurrent.futures (it would pass pure= on to fn)


def ran_on(executor, workers: int) -> str:
    """Where a stage's batches ran, for its manifest: a user reads whether the cluster was used."""
    if executor is not None and hasattr(executor, "scheduler_info"):
        info = executor.scheduler_info()
        return f"dask {info.get('address', '?')} ({len(info.get('workers', {}))} workers)"
    return f"{workers} local processes" if workers > 1 else "this process"


def _executor_slots(executor) -> int:
    """Worker threads a Dask client can use (so the window keeps them all busy)."""
    try:
        return sum(w.get("nthreads", 1) for w in executor.scheduler_info()["workers"].values())
    except Exception:  # noqa: BLE001 - not a distributed.Client: assume a handful
        return 4


@contextlib.contextmanager
def dask_executor():
    """A client for fanning work out when this code runs inside a Dask worker (a Prefect task under
    DaskTaskRunner), else None. ``worker_client`` secedes from the worker's thread pool while the
    stage waits, so the stage's own sub-jobs can use that thread."""
    try:
        from distributed import get_worker, worker_client

        get_worker()
    except (ImportError, ValueError):
        yield None
        return
    with worker_client() as client:
        yield client
