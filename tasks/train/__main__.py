"""`python -m tasks.train [--config X | worker --run-dir RUN]`: the stage, or one training worker."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from tasks.core.config import (
    load_config,
)
from tasks.train.stage import prepare_run, run_train
from tasks.train.worker import train_worker


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["worker"]:  # the loop itself, as launched by run_train / accelerate launch
        w = argparse.ArgumentParser(prog="tasks.train worker")
        w.add_argument("--run-dir", required=True, type=Path)
        sys.exit(train_worker(w.parse_args(argv[1:]).run_dir))
    ap = argparse.ArgumentParser(description="QLoRA training stage: prepares the run and launches the loop.")
    ap.add_argument("--config", required=True)
    ap.add_argument("--prepare-only", action="store_true",
                    help="write the run directory and print the launch command (for SLURM/hand-typed launches)")
    ap.add_argument("overrides", nargs="*", help="section.key=value")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    if a.prepare_only:
        run_dir, cmd, done = prepare_run(load_config(a.config, a.overrides))
        print(f"run_dir: {run_dir}\n" + ("complete" if done else "launch: " + " ".join(cmd)))
        return
    m = run_train(load_config(a.config, a.overrides))
    print(f"train: adapter at {m['adapter']}")


if __name__ == "__main__":
    main()
