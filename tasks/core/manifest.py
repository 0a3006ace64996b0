"""The artifact contract between stages.

Every stage writes one directory with a ``manifest.json``: the config section it used, the
fingerprints of its inputs, counts, library versions and the time. The stage's own fingerprint is
the hash of (stage name, config section, input fingerprints); when an existing manifest carries the
same fingerprint the stage is skipped, so a scheduled re-run only redoes what changed.

Stages build their output in ``<dir>.partial`` and rename it into place only when complete, so a
crash never leaves a directory that looks finished.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from scrapers.hashing import fingerprint, sha256_bytes  # noqa: F401 - one definition, shared
from scrapers.schema import REPO_ROOT

MANIFEST = "manifest.json"
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
    m = read_manifest(stage_dir)
    if m is None:
        raise FileNotFoundError(
            f"no complete '{stage}' output at {stage_dir} (missing {MANIFEST}); run the '{stage}' stage first"
        )
    return m


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=False, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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

    @property
    def fingerprint(self) -> str:
        return fingerprint({"stage": self.name, "config": self.config, "inputs": self.inputs,
                            "code": code_fingerprint(self.code)})

    def up_to_date(self) -> dict[str, Any] | None:
        m = read_manifest(self.out_dir)
        return m if m and m.get("fingerprint") == self.fingerprint else None

    @contextlib.contextmanager
    def building(self) -> Iterator[Path]:
        """Yield a fresh work directory; publish it only if the block finishes."""
        work = self.out_dir.with_name(self.out_dir.name + ".partial")
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        yield work
        old = self.out_dir.with_name(self.out_dir.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        if self.out_dir.exists():
            os.replace(self.out_dir, old)
        os.replace(work, self.out_dir)
        shutil.rmtree(old, ignore_errors=True)

    def manifest(self, work: Path, counts: dict[str, Any], **extra: Any) -> dict[str, Any]:
        m = {
            "stage": self.name,
            "fingerprint": self.fingerprint,
            "config": self.config,
            "inputs": self.inputs,
            "counts": counts,
            **extra,
            "files": {
                str(p.relative_to(work)): sha256_file(p)
                for p in sorted(work.rglob("*"))
                if p.is_file() and p.name != MANIFEST
            },
            "versions": library_versions(),
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        write_json_atomic(work / MANIFEST, m)
        return m
