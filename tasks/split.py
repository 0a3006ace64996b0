"""Split the cleaned corpus 90/10 into train and eval, by a stable hash.

A document goes to eval iff ``int(sha256(salt + dup_cluster)[:16], 16) / 2**64 < eval_fraction``.
The decision depends on nothing but the document's own cluster id and the salt, so it never changes
as the corpus grows (adding documents cannot move an existing one), and all members of a cluster
(the parts of a split long document share one) land on the same side.

Nothing is forced: a small category may end up with no eval document; it is listed under
``eval_missing`` in the manifest and logged, for a human to decide (more data, or a larger fraction).
"""

from __future__ import annotations

import hashlib
import logging
from collections import defaultdict
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from tasks.core._prefect import task
from tasks.core.cli import clean_errors, stage_args
from tasks.core.config import PipelineConfig, config_from_dict, dump_resolved
from tasks.core.manifest import Stage, require_manifest
from tasks.core.textio import CategoryWriters, Progress, category_files, iter_batches, num_rows

log = logging.getLogger("tasks.split")  # stable name also under python -m

SPLITS = ("train", "eval")


def eval_score(cluster: str, salt: str) -> float:
    """Uniform in [0, 1), a pure function of (salt, cluster id)."""
    return int(hashlib.sha256((salt + cluster).encode("utf-8")).hexdigest()[:16], 16) / 2**64


def is_eval(cluster: str, salt: str, eval_fraction: float) -> bool:
    return eval_score(cluster, salt) < eval_fraction


CODE_FILES = ("tasks/split.py", "tasks/core/textio.py")


def run_split(cfg: PipelineConfig) -> dict[str, Any]:
    """Split ``<root>/clean`` into ``<root>/split/{train,eval}/<category>.parquet``; returns the manifest."""
    clean_m = require_manifest(cfg.root / "clean", "clean")
    stage = Stage("split", cfg.root / "split", {"split": cfg.section("split")}, {"clean": clean_m["fingerprint"]},
                  code=CODE_FILES)
    if (m := stage.up_to_date()) is not None:
        log.info("split: up to date (%s)", stage.out_dir)
        return m
    salt, frac = cfg.split.salt, cfg.split.eval_fraction
    counts: dict[str, dict[str, dict[str, int]]] = {s: defaultdict(lambda: {"docs": 0, "chars": 0}) for s in SPLITS}
    files = category_files(cfg.root / "clean")
    with stage.building() as work:
        writers = {s: CategoryWriters(work / s) for s in SPLITS}
        try:
            for cat, path in files.items():
                prog = Progress(log, f"split {cat}", num_rows(path))
                for batch in iter_batches(path):
                    t = pa.Table.from_batches([batch])
                    # a null cluster would be a clean-stage bug; fall back to the doc_id rather than fail
                    clusters = pc.coalesce(t.column("dup_cluster"), t.column("doc_id")).to_pylist()
                    mask = pa.array([is_eval(c, salt, frac) for c in clusters], pa.bool_())
                    for name, part in (("eval", t.filter(mask)), ("train", t.filter(pc.invert(mask)))):
                        if part.num_rows:
                            writers[name].write(cat, part)
                            counts[name][cat]["docs"] += part.num_rows
                            counts[name][cat]["chars"] += int(pc.sum(pc.utf8_length(part.column("text"))).as_py() or 0)
                    prog.update(t.num_rows)
        finally:
            for w in writers.values():
                w.close()
        out = {s: {c: dict(v) for c, v in counts[s].items()} for s in SPLITS}
        for s in SPLITS:
            out[s]["total"] = {k: sum(v[k] for v in counts[s].values()) for k in ("docs", "chars")}
        eval_missing = [c for c in files if c not in counts["eval"]]
        if eval_missing:
            log.warning("split: no eval document for %s (eval_fraction=%s); their held-out loss cannot be measured",
                        eval_missing, frac)
        dump_resolved(cfg, work / "config.yaml")
        m = stage.manifest(work, out, eval_missing=eval_missing)
    log.info("split: train %s docs, eval %s docs", out["train"]["total"]["docs"], out["eval"]["total"]["docs"])
    return m


# ------------------------------------------------------------------------------- entry points
@task(name="split")
def split(cfg_dict: dict) -> dict:
    return run_split(config_from_dict(cfg_dict))


@clean_errors
def main(argv: list[str] | None = None) -> None:
    cfg, _ = stage_args("Split the cleaned corpus into train and eval by a stable hash.", argv)
    m = run_split(cfg)
    k = m["counts"]
    print(f"split: train {k['train']['total']['docs']} docs, eval {k['eval']['total']['docs']} docs; "
          f"eval_missing={m['eval_missing']}")


if __name__ == "__main__":
    main()
