"""`python -m tasks.<stage>`: every stage's command line is the shared one (tasks/core/cli.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tasks.core.cli import stage_args
from tasks.core.manifest import VERIFY_ENV, verify_requested

DEMO = "configs/demo.yaml"


def test_stage_args_applies_overrides_and_verify(tmp_path, monkeypatch):
    monkeypatch.delenv(VERIFY_ENV, raising=False)
    cfg, a = stage_args("x", ["--config", DEMO, f"data_root={tmp_path}", "split.eval_fraction=0.2"])
    assert cfg.root == tmp_path and cfg.split.eval_fraction == 0.2 and not a.verify and not verify_requested()
    stage_args("x", ["--config", DEMO, "--verify"])
    assert verify_requested()


def test_stage_args_without_verify_and_with_a_stage_flag(monkeypatch):
    monkeypatch.delenv(VERIFY_ENV, raising=False)
    with pytest.raises(SystemExit):  # a stage that reads no earlier output offers no --verify
        stage_args("x", ["--config", DEMO, "--verify"], verify=False)
    _, a = stage_args("x", ["--config", DEMO, "--workers", "3"],
                      extra=lambda ap: ap.add_argument("--workers", type=int))
    assert a.workers == 3


@pytest.mark.parametrize("stage,before", [("split", "clean"), ("mix", "split"), ("tokenize", "mix")])
def test_stage_module_names_the_stage_to_run_first(tmp_path, stage, before):
    """A stage run on an empty data root fails with one line naming what is missing, no traceback dump."""
    r = subprocess.run([sys.executable, "-m", f"tasks.{stage}", "--config", DEMO, f"data_root={tmp_path}"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 3, r.stderr[-2000:]
    assert f"run the '{before}' stage first" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]


@pytest.mark.parametrize("cmd", [["-m", "tasks.split"], ["-m", "flows.cli", "stage", "split"]])
def test_bad_override_is_named_in_one_line(cmd):
    r = subprocess.run([sys.executable, *cmd, "--config", DEMO, "split.no_such_key=1"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "split.no_such_key: unknown key" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]


def test_d2a_stage_on_an_empty_root_names_the_stage_to_run_first(tmp_path):
    r = subprocess.run([sys.executable, "-m", "flows.cli", "stage", "mix", "--config", DEMO, f"data_root={tmp_path}"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 3 and "run the 'split' stage first" in r.stderr and "Traceback" not in r.stderr, \
        r.stderr[-2000:]


def test_a_bug_keeps_its_traceback(monkeypatch):
    """Only errors a user can fix are shortened: anything else propagates with its traceback."""
    import tasks.split as split

    def broken(cfg):
        raise KeyError("a bug")

    monkeypatch.setattr(split, "run_split", broken)
    with pytest.raises(KeyError, match="a bug"):
        split.main(["--config", DEMO])
