"""The artifact contract between stages.

Every stage writes one directory with a ``manifest.json``: the config section it used, the
fingerprints of its inputs, counts, library versions and the time. The stage's own fingerprint is
the hash of (stage name, config section, input fingerprints); when an existing manifest carries the
same fingerprint the stage is skipped, so a scheduled re-run only redoes what changed.

Stages build their output in ``<dir>.partial`` and rename it into place only when complete, so a
crash never leaves a directory that looks finished: every file and directory is fsynced before the
rename and the parent after it, so a power loss cannot publish a zero-length file either.

One process builds a stage at a time: ``<dir>.lock`` is held (``flock``) from the up-to-date check
to the publish and names its holder (host, pid, since); a second run fails at once with that name.
The kernel drops the lock when the holder dies, but its name stays in the file: the next run sees
it (or a leftover ``.partial``), calls it an unclean shutdown, and checks hashes, not only sizes.

The manifest records every file's size and sha256. Before a stage is skipped as up to date, and
before the next stage reads it (``require_manifest``), sizes are always checked; hashes when asked
(``--verify``: ``D2A_VERIFY=1``) and after an unclean shutdown. A damaged output is rebuilt.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import socket
import threading
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from scrapers.hashing import fingerprint, sha256_bytes  # noqa: F401 - one definition, shared
from scrapers.schema import REPO_ROOT

log = logging.getLogger("tasks.core.manifest")

MANIFEST = "manifest.json"
VERIFY_ENV = "D2A_VERIFY"  # "1": check every file's sha256 before a stage is skipped or read (--verify)
_LIBS = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "prefect", "pyarrow", "datasets",
         "trafilatura", "beautifulsoup4", "protego", "datasketch", "mistral-common")


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def library_versions() -> dict[str, str]:
    out = {}
    for lib in _LIBS:
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[lib] = metadata.version(lib)
    return out


def read_manifest(stage_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    p = Path(stage_dir) / MANIFEST
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None  # a torn manifest means the stage is not complete


def require_manifest(stage_dir: str | os.PathLike[str], stage: str) -> dict[str, Any]:
    """The manifest of a finished stage, after checking that its files are whole (sizes always,
    hashes on demand or after an unclean shutdown of that stage); raises naming what to re-run."""
    m = read_manifest(stage_dir)
    if m is None:
        raise MissingOutput(
            f"no complete '{stage}' output at {stage_dir} (missing {MANIFEST}); run the '{stage}' stage first"
        )
    d = Path(stage_dir)
    problem = check_files(d, m, hashes=verify_requested() or unclean_shutdown(d) is not None)
    if problem:
        raise DamagedOutput(f"the '{stage}' output at {stage_dir} is damaged: {problem}; re-run the '{stage}' stage")
    return m


class MissingOutput(FileNotFoundError):
    """A stage's input is not there yet: the stage that makes it has not run (or did not finish)."""


class DamagedOutput(RuntimeError):
    """A published output whose files no longer match its manifest (truncated, missing, changed)."""


def verify_requested() -> bool:
    return os.environ.get(VERIFY_ENV, "") not in ("", "0")


def set_verify(on: bool = True) -> None:
    """``--verify``: every stage of this process (and the processes it starts) checks hashes."""
    if on:
        os.environ[VERIFY_ENV] = "1"


def check_files(stage_dir: Path, m: dict[str, Any], hashes: bool = False) -> str | None:
    """Why the files of a stage output do not match its manifest (None when they do)."""
    sizes = m.get("sizes") or {}
    for rel, digest in (m.get("files") or {}).items():
        p = Path(stage_dir) / rel
        if not p.is_file():
            return f"{p} is missing"
        if rel in sizes and p.stat().st_size != sizes[rel]:
            return f"{p} is {p.stat().st_size:,} bytes, the manifest says {sizes[rel]:,} (truncated or overwritten)"
        if hashes and sha256_file(p) != digest:
            return f"{p} fails its sha256 check"
    return None


def unclean_shutdown(stage_dir: Path) -> str | None:
    """Why the last build of this stage did not end cleanly (None when it did): a leftover ``.partial``,
    or a lock file that still names a holder that is gone."""
    d = Path(stage_dir)
    partial = d.with_name(d.name + ".partial")
    if partial.exists():
        return f"{partial} was left behind"
    lock = d.with_name(d.name + ".lock")
    try:
        holder = lock.read_text(encoding="utf-8").strip()
    except OSError:
        return None
    if holder and not _lock_is_held(lock):
        return f"{lock} names {holder}, which did not release it"
    return None


# ------------------------------------------------------------------------------ durability
def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=False, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)  # the rename itself


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and directory under ``root`` (and ``root``): what a rename then publishes is on disk."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


# ------------------------------------------------------------------------------ locks
class LockHeld(RuntimeError):
    """Another process is building this stage (or training in this run directory)."""


_HELD: dict[str, list[Any]] = {}  # lock path -> [open file, count, record left by a dead holder]
_HELD_MUTEX = threading.Lock()


def _lock_is_held(lock: Path) -> bool:
    if os.path.abspath(lock) in _HELD:
        return True
    try:
        with open(lock, "rb") as f:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released when f closes
            return False
    except BlockingIOError:
        return True
    except OSError:
        return False


def acquire_lock(lock: Path, what: str) -> str | None:
    """Take ``lock`` for ``what`` or raise LockHeld naming the holder. Re-entrant within a process.
    Returns the holder a previous, dead process left in the file (an unclean shutdown), else None."""
    key = os.path.abspath(lock)
    with _HELD_MUTEX:
        if key in _HELD:
            _HELD[key][1] += 1
            return _HELD[key][2]
        Path(key).parent.mkdir(parents=True, exist_ok=True)
        f = open(key, "a+", encoding="utf-8")  # noqa: SIM115 - held until release_lock
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise LockHeld(f"{what} is locked by {holder} (lock file {key}); wait for it to finish or stop it. "
                           "A holder that died has released it: run again.") from None
        f.seek(0)
        stale = f.read().strip() or None
        f.seek(0)
        f.truncate()
        f.write(f"host {socket.gethostname()} pid {os.getpid()} since "
                f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}")
        f.flush()
        os.fsync(f.fileno())
        _HELD[key] = [f, 1, stale]
        if stale:
            log.warning("%s: the previous holder (%s) did not release %s: unclean shutdown, files will be verified",
                        what, stale, key)
        return stale


def release_lock(lock: Path, clean: bool = True) -> None:
    """Drop one hold of ``lock``; the last one empties the file (``clean``) or leaves the holder's name
    in it, so that the next holder treats the last run as an unclean shutdown."""
    key = os.path.abspath(lock)
    with _HELD_MUTEX:
        ent = _HELD.get(key)
        if ent is None:
            return
        ent[1] -= 1
        if ent[1] > 0:
            return
        del _HELD[key]
        f = ent[0]
        if clean:
            f.seek(0)
            f.truncate()  # empty = released cleanly
            f.flush()
            os.fsync(f.fileno())
        f.close()  # closing drops the flock


@contextlib.contextmanager
def exclusive(lock: Path, what: str) -> Iterator[str | None]:
    """Hold ``lock`` for the block; yields what a dead previous holder left (None after a clean release)."""
    stale = acquire_lock(lock, what)
    try:
        yield stale
    finally:
        release_lock(lock)


def code_fingerprint(files: tuple[str, ...] | list[str]) -> str:
    """Hash of exactly the code files a stage declares (repo-relative paths, beside its run_<stage>):
    editing one of them invalidates that stage's cache, editing anything else (a benchmark, the
    training reader, a test site) re-runs nothing."""
    missing = [f for f in files if not (REPO_ROOT / f).is_file()]
    if missing:
        raise FileNotFoundError(f"stage code files not found: {', '.join(missing)} (update the stage's CODE_FILES)")
    return fingerprint({f: sha256_file(REPO_ROOT / f) for f in sorted(files)})


@dataclass
class Stage:
    """One stage's output directory, built in ``.partial`` and published atomically."""

    name: str
    out_dir: Path
    config: dict[str, Any]
    inputs: dict[str, str]  # input name -> fingerprint
    # the code files its output depends on besides its config. Training declares none: its run
    # directory is keyed by this fingerprint, and a code fix must not orphan a week-long run's checkpoints
    code: tuple[str, ...] = ()

    # False: the caller holds the lock itself (training: run_train, around the whole supervised run)
    locks: bool = field(default=True, repr=False, compare=False)
    _locked: bool = field(default=False, init=False, repr=False, compare=False)
    _release: Any = field(default=None, init=False, repr=False, compare=False)
    unclean: str | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def fingerprint(self) -> str:
        return fingerprint({"stage": self.name, "config": self.config, "inputs": self.inputs,
                            "code": code_fingerprint(self.code)})

    @property
    def lock_path(self) -> Path:
        return self.out_dir.with_name(self.out_dir.name + ".lock")

    def lock(self) -> None:
        """Hold this stage's lock until ``building`` publishes (or this object is dropped); fails at
        once naming the holder when another process has it."""
        if self._locked or not self.locks:
            return
        why = unclean_shutdown(self.out_dir)
        stale = acquire_lock(self.lock_path, f"stage {self.name} ({self.out_dir})")
        self._locked = True
        # dropped without publishing (an error between the check and the build): not a clean release
        self._release = weakref.finalize(self, release_lock, self.lock_path, False)
        self.unclean = why or (f"{self.lock_path} named {stale}" if stale else None)

    def unlock(self, clean: bool = True) -> None:
        if self._locked:
            self._release.detach()
            release_lock(self.lock_path, clean)
            self._locked = False

    def up_to_date(self) -> dict[str, Any] | None:
        """The manifest when the output exists for this fingerprint and its files are whole (sizes;
        hashes with --verify or after an unclean shutdown), else None, holding the lock to rebuild."""
        self.lock()
        m = read_manifest(self.out_dir)
        if not m or m.get("fingerprint") != self.fingerprint:
            return None
        hashes = verify_requested() or self.unclean is not None
        problem = check_files(self.out_dir, m, hashes=hashes)
        if problem:
            log.warning("%s: output damaged (%s): rebuilding", self.name, problem)
            return None
        self.unlock()
        return m

    @contextlib.contextmanager
    def building(self) -> Iterator[Path]:
        """Yield a fresh work directory; publish it only if the block finishes."""
        self.lock()
        done = False
        try:
            work = self.out_dir.with_name(self.out_dir.name + ".partial")
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True)
            yield work
            fsync_tree(work)  # data before the rename that publishes it
            old = self.out_dir.with_name(self.out_dir.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            if self.out_dir.exists():
                os.replace(self.out_dir, old)
            os.replace(work, self.out_dir)
            fsync_dir(self.out_dir.parent)
            shutil.rmtree(old, ignore_errors=True)
            done = True
        finally:
            self.unlock(clean=done)

    def manifest(self, work: Path, counts: dict[str, Any], **extra: Any) -> dict[str, Any]:
        files = [p for p in sorted(work.rglob("*")) if p.is_file() and p.name != MANIFEST]
        m = {
            "stage": self.name,
            "fingerprint": self.fingerprint,
            "config": self.config,
            "inputs": self.inputs,
            "counts": counts,
            **extra,
            "files": {str(p.relative_to(work)): sha256_file(p) for p in files},
            "sizes": {str(p.relative_to(work)): p.stat().st_size for p in files},
            "versions": library_versions(),
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        write_json_atomic(work / MANIFEST, m)
        return m
