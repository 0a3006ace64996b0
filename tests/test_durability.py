"""Locks, fsync and verification of published outputs: a second run fails at once naming the holder,
a killed holder's lock is gone, a truncated shard is detected and its stage re-run, the training
reader refuses it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import REPO  # noqa: E402

from tasks.core.manifest import (
    DamagedOutput,
    LockHeld,
    Stage,
    acquire_lock,
    release_lock,
    require_manifest,
)

ENV = {**os.environ, "PYTHONPATH": str(REPO)}

HOLD = r"""
import sys, time
from pathlib import Path
from tasks.core.manifest import Stage
st = Stage("split", Path(sys.argv[1]) / "split", {}, {})
with st.building():
    print("BUILDING", flush=True)
    time.sleep(120)
"""


def _clean_output(root: Path) -> Path:
    """A real (tiny) clean output for the split stage to read."""
    st = Stage("clean", root / "clean", {"t": 1}, {})
    with st.building() as work:
        pq.write_table(pa.table({"doc_id": ["a", "b", "c"], "text": ["x" * 300, "y" * 300, "z" * 300],
                                 "dup_cluster": ["a", "b", "c"], "category": ["recipes"] * 3}),
                       work / "recipes.parquet")
        st.manifest(work, {"kept": 3})
    config = root.parent / "cfg.yaml"
    config.write_text(yaml.safe_dump({"data_root": str(root), "model": {"name": "unused"},
                                      "scrape": {"sources": "configs/sources/demo.yaml"}}))
    return config


def _d2a(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=timeout)


def test_a_second_run_fails_at_once_naming_the_holder_and_a_killed_holder_frees_the_stage(tmp_path):
    root = tmp_path / "root"
    config = _clean_output(root)
    a = subprocess.Popen([sys.executable, "-c", HOLD, str(root)], cwd=REPO, env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert a.stdout.readline().strip() == "BUILDING"
        t0 = time.monotonic()
        b = _d2a("stage", "split", "--config", str(config))
        assert b.returncode == 3, b.stderr[-2000:]
        assert f"pid {a.pid}" in b.stderr and "split" in b.stderr and "since" in b.stderr
        assert time.monotonic() - t0 < 60  # at once: it did not wait for the holder (startup is most of it)
    finally:
        a.send_signal(signal.SIGKILL)
        a.wait()
    assert f"pid {a.pid}" in (root / "split.lock").read_text()  # the dead holder's name stays: an unclean shutdown
    c = _d2a("stage", "split", "--config", str(config))
    assert c.returncode == 0, c.stderr[-2000:]
    assert "unclean shutdown" in c.stderr
    assert json.loads((root / "split" / "manifest.json").read_text())["counts"]["train"]["total"]["docs"] + \
        json.loads((root / "split" / "manifest.json").read_text())["counts"]["eval"]["total"]["docs"] == 3
    assert (root / "split.lock").read_text() == ""  # released cleanly this time


def test_lock_is_reentrant_in_a_process_and_names_its_holder(tmp_path):
    lock = tmp_path / "x.lock"
    assert acquire_lock(lock, "x") is None
    assert acquire_lock(lock, "x") is None  # the same process again: re-entrant
    text = lock.read_text()
    assert text.startswith("host ") and f"pid {os.getpid()}" in text and "since 20" in text
    probe = subprocess.run([sys.executable, "-c", "import sys; from pathlib import Path; from tasks.core.manifest "
                            "import acquire_lock; acquire_lock(Path(sys.argv[1]), 'the x stage')", str(lock)],
                           cwd=REPO, env=ENV, capture_output=True, text=True, timeout=60)
    assert probe.returncode != 0 and "LockHeld" in probe.stderr and f"pid {os.getpid()}" in probe.stderr
    release_lock(lock)
    assert lock.read_text() != ""  # still held once
    release_lock(lock)
    assert lock.read_text() == ""


def test_publishing_fsyncs_every_file_and_directory_before_the_rename(tmp_path, monkeypatch):
    synced: list[str] = []
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        events.append(("fsync", synced[-1]))
        return real_fsync(fd)

    def replace(a, b):
        events.append(("replace", str(b)))
        return real_replace(a, b)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    st = Stage("s", tmp_path / "out", {}, {})
    with st.building() as work:
        (work / "sub").mkdir()
        (work / "sub" / "shard-00000.arrow").write_bytes(b"data")
        st.manifest(work, {})
    publish = events.index(("replace", str(tmp_path / "out")))
    before = {p for e, p in events[:publish] if e == "fsync"}
    for rel in ("sub/shard-00000.arrow", "manifest.json", "sub", ""):
        assert str(tmp_path / "out.partial" / rel).rstrip("/") in before, rel
    assert ("fsync", str(tmp_path)) in events[publish:]  # the rename itself reaches the disk


def test_a_truncated_shard_is_detected_and_tokenize_rebuilds_it(tmp_path, tiny_model_dir):
    from conftest import prepare_tokenized

    from tasks.tokenize.loader import PackedShards
    from tasks.tokenize.stage import run_tokenize

    cfg = prepare_tokenized(tmp_path / "root", tiny_model_dir)
    out = next(p for p in (tmp_path / "root" / "tokenized").iterdir() if p.is_dir())
    m1 = json.loads((out / "manifest.json").read_text())
    shard = out / "train" / "shard-00000.arrow"
    whole = shard.read_bytes()
    assert m1["sizes"]["train/shard-00000.arrow"] == len(whole)
    with open(shard, "r+b") as f:  # what a power loss after an un-synced rename leaves
        f.truncate(len(whole) // 2)
    with pytest.raises(ValueError, match="truncated.*re-run the tokenize stage"):
        PackedShards(out / "train")
    with pytest.raises(DamagedOutput, match=r"shard-00000.arrow is .* bytes, the manifest says"):
        require_manifest(out, "tokenize")
    m2 = run_tokenize(cfg)  # not skipped: rebuilt
    assert m2["created_at"] >= m1["created_at"] and shard.read_bytes() == whole
    assert len(PackedShards(out / "train")) > 0


def test_verify_checks_hashes_and_an_unclean_shutdown_forces_it(tmp_path, monkeypatch):
    def stage():
        return Stage("s", tmp_path / "out", {"k": 1}, {})

    st = stage()
    with st.building() as work:
        (work / "a.bin").write_bytes(b"0123456789")
        st.manifest(work, {})
    (tmp_path / "out" / "a.bin").write_bytes(b"0123456780")  # same size, different bytes
    assert stage().up_to_date() is not None  # sizes only: not seen
    monkeypatch.setenv("D2A_VERIFY", "1")
    assert stage().up_to_date() is None  # --verify: seen, rebuilt
    monkeypatch.delenv("D2A_VERIFY")
    (tmp_path / "out.lock").write_text("host h pid 1 since 2020-01-01T00:00:00Z")  # a holder that died
    assert stage().up_to_date() is None  # an unclean shutdown: hashes checked without asking
    with pytest.raises(DamagedOutput, match="sha256"):
        require_manifest(tmp_path / "out", "s")


def test_a_second_training_run_in_the_same_run_directory_fails_naming_the_holder(tmp_path, tiny_model_dir):
    from conftest import prepare_tokenized

    from tasks.train.stage import run_dir_for, run_train

    cfg = prepare_tokenized(tmp_path / "root", tiny_model_dir)
    run_dir = run_dir_for(cfg)
    lock = run_dir.with_name(run_dir.name + ".lock")
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; from tasks.core."
                               "manifest import acquire_lock; acquire_lock(Path(sys.argv[1]), 't'); print('HELD', "
                               "flush=True); time.sleep(120)", str(lock)], cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "HELD"
        with pytest.raises(LockHeld, match=f"training run .*pid {holder.pid}"):
            run_train(cfg)
    finally:
        holder.kill()
        holder.wait()
