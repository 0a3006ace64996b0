"""Training that survives: kill -9 / SIGTERM / a kill mid-checkpoint then resume (bitwise equal to an
uninterrupted run on CPU), the NaN/spike guard (skip, roll back, stop), checkpoint retention, the
token budget, and a supervisor that leaves no rank behind. Tiny random Llama (conftest), CPU."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, read_metrics
from safetensors.torch import load_file

from tasks.core.config import config_from_dict

TRAIN = {"max_steps": 8, "save_every": 2, "eval_every": 4, "keep_checkpoints": 10, "warmup_steps": 2}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory, tiny_model_dir):
    """Tokenized shards shared by every test here (each test gets its own run via run_name)."""
    from conftest import prepare_tokenized as _prepare

    root = tmp_path_factory.mktemp("resilience")
    _prepare(root, tiny_model_dir, train=TRAIN)
    return root


def _cfg(root, model_dir, name, **train):
    from conftest import tiny_config_dict

    return config_from_dict(tiny_config_dict(root, model_dir, run_name=name, train={**TRAIN, **train}))


_records = read_metrics


def _losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in _records(run_dir) if "loss" in r]


def _adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def reference(data_root, tiny_model_dir):
    """The uninterrupted run every interrupted one must reproduce."""
    from tasks.train.stage import run_train

    m = run_train(_cfg(data_root, tiny_model_dir, "ref"))
    run = Path(m["run_dir"])
    return dict(_losses(run)), _adapter(run), m


def _launch(cfg, log: Path, **env) -> tuple[Path, subprocess.Popen]:
    """Start the worker as run_train would, but in the background, so the test can kill it."""
    from tasks.train.stage import prepare_run

    run_dir, cmd, _ = prepare_run(cfg)
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", **env})
    return run_dir, proc


def _wait(cond, proc: subprocess.Popen | None, log: Path | None = None, timeout: float = 120) -> None:
    t0 = time.time()
    while not cond():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"worker exited early ({proc.returncode}):\n{log.read_text()[-3000:] if log else ''}")
        if time.time() - t0 > timeout:
            raise AssertionError("timed out" + (f":\n{log.read_text()[-3000:]}" if log else ""))
        time.sleep(0.02)


def _assert_matches_reference(run_dir: Path, reference) -> None:
    ref_losses, ref_adapter, ref_m = reference
    got = _losses(run_dir)
    assert {s for s, _ in got} == set(ref_losses), got
    for s, loss in got:  # before the kill and after the resume, every logged step: bitwise
        assert loss == ref_losses[s], (s, loss, ref_losses[s])
    ad = _adapter(run_dir)
    assert ad.keys() == ref_adapter.keys()
    for k in ad:
        assert torch.equal(ad[k], ref_adapter[k]), k


def test_kill9_at_random_step_then_resume_is_bitwise_identical(data_root, tiny_model_dir, reference, tmp_path):
    from tasks.train.checkpoint import latest_checkpoint
    from tasks.train.stage import run_train

    cfg = _cfg(data_root, tiny_model_dir, "kill9")
    log = tmp_path / "worker.log"
    run_dir, proc = _launch(cfg, log, D2A_STEP_SLEEP_S="0.2")
    k = random.randint(2, 5)
    _wait(lambda: any(s >= k for s, _ in _losses(run_dir)), proc, log)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = max(s for s, _ in _losses(run_dir))
    assert killed_at < 8, "the run finished before the kill"
    ck = latest_checkpoint(run_dir)
    m = run_train(cfg)
    assert m["counts"]["steps"] == 8
    _assert_matches_reference(run_dir, reference)
    print(f"killed after step {killed_at} (asked {k}), resumed from {ck.name if ck else 'scratch'}")


def test_sigterm_saves_at_step_boundary_exits_75_and_resumes(data_root, tiny_model_dir, reference, tmp_path):
    from tasks.train.checkpoint import latest_checkpoint
    from tasks.train.stage import run_train
    from tasks.train.supervisor import EXIT_PREEMPTED, PREEMPTED_MARK

    cfg = _cfg(data_root, tiny_model_dir, "sigterm")
    log = tmp_path / "worker.log"
    run_dir, proc = _launch(cfg, log, D2A_STEP_SLEEP_S="0.3")
    _wait(lambda: any(s >= 3 for s, _ in _losses(run_dir)), proc, log)
    os.killpg(proc.pid, signal.SIGTERM)  # what a scheduler does on preemption
    assert proc.wait(timeout=120) == EXIT_PREEMPTED, log.read_text()[-2000:]
    last = max(s for s, _ in _losses(run_dir))
    assert last < 8
    assert latest_checkpoint(run_dir).name == f"step-{last}"  # saved at the step boundary it reached
    assert json.loads((run_dir / PREEMPTED_MARK).read_text())["step"] == last
    assert "preempted: saved step" in log.read_text()
    m = run_train(cfg)
    assert m["counts"]["steps"] == 8
    _assert_matches_reference(run_dir, reference)
    # each launch logs its start-up phases; the resumed one names its checkpoint and starts at its step
    starts = [r for r in _records(run_dir) if r.get("event") == "startup"]
    assert [(r["resumed_from"], r["step"]) for r in starts] == [(None, 0), (f"step-{last}", last)]
    assert all(0 < r["model_load_s"] < r["process_s"] and r["resume_s"] >= 0 for r in starts)


def test_kill_during_checkpoint_write_previous_one_loads(data_root, tiny_model_dir, reference, tmp_path):
    from tasks.train.checkpoint import latest_checkpoint
    from tasks.train.stage import run_train

    cfg = _cfg(data_root, tiny_model_dir, "tornckpt")
    log = tmp_path / "worker.log"
    run_dir, proc = _launch(cfg, log, D2A_CKPT_PAUSE_STEP="4", D2A_CKPT_PAUSE_S="60")
    partial = run_dir / "checkpoints" / "step-4.partial"
    _wait(lambda: (partial / "adapter" / "adapter_model.safetensors").is_file() and "pausing" in log.read_text(), proc, log)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert partial.is_dir() and not (run_dir / "checkpoints" / "step-4").exists()
    assert latest_checkpoint(run_dir).name == "step-2"  # the half-written one is ignored
    m = run_train(cfg)
    assert m["counts"]["steps"] == 8
    assert not partial.exists()  # cleaned up on resume
    _assert_matches_reference(run_dir, reference)


# ------------------------------------------------------------------------ NaN and spike guard
def test_injected_nan_is_skipped_weights_unchanged_and_counted(data_root, tiny_model_dir, monkeypatch):
    from tasks.tokenize.loader import DataPosition, PackedShards
    from tasks.train.stage import run_train

    monkeypatch.setenv("D2A_INJECT_NAN_STEPS", "3")
    cfg = _cfg(data_root, tiny_model_dir, "nan1", max_steps=5, save_every=1, eval_every=100)
    m = run_train(cfg)
    run = Path(m["run_dir"])
    assert m["counts"]["skipped_steps"] == 1 and m["counts"]["steps"] == 5 and m["counts"]["rollbacks"] == 0
    ck = run / "checkpoints"
    a2, a3, a4 = (load_file(ck / f"step-{s}" / "adapter" / "adapter_model.safetensors") for s in (2, 3, 4))
    assert all(torch.equal(a2[k], a3[k]) for k in a2)  # the skipped step changed nothing
    assert any(not torch.equal(a3[k], a4[k]) for k in a3)  # the next one trains again
    skips = [r for r in _records(run) if r.get("event") == "skipped_step"]
    assert len(skips) == 1 and skips[0]["step"] == 3 and "non-finite" in skips[0]["reason"]
    # the logged sample ids are the rows of step 3's micro-batches (5th and 6th) in loader order
    shards = PackedShards(Path(json.loads((run / "inputs.json").read_text())["tokenized_dir"]) / "train")
    it = shards.batches(cfg.seed, cfg.train.micro_batch_size, DataPosition())
    mbs = [next(it)[1]["input_ids"] for _ in range(6)][4:]
    (ids,) = skips[0]["sample_ids"]
    assert len(ids) == 4
    assert (shards.rows(ids)["input_ids"] == torch.cat([torch.from_numpy(x) for x in mbs]).numpy()).all()
    losses = dict(_losses(run))
    assert losses[3] != losses[3] and all(losses[s] == losses[s] for s in (1, 2, 4, 5))  # NaN logged at 3 only


def test_repeated_nans_roll_back_with_lower_lr(data_root, tiny_model_dir, monkeypatch, reference):
    from tasks.train.stage import run_train
    from tasks.train.supervisor import ROLLBACK_FILE

    monkeypatch.setenv("D2A_INJECT_NAN_STEPS", "3,4")
    cfg = _cfg(data_root, tiny_model_dir, "rollback", max_bad_steps=2, rollback_lr_factor=0.5)
    m = run_train(cfg)
    run = Path(m["run_dir"])
    assert m["counts"]["rollbacks"] == 1 and m["counts"]["skipped_steps"] == 2 and m["counts"]["steps"] == 8
    recs = _records(run)
    assert [r["reason"] for r in recs if r.get("event") == "rollback"] == ["2 non-finite steps in a row"]
    assert not (run / ROLLBACK_FILE).exists()  # consumed by the next checkpoint
    after = [r for r in recs[[i for i, r in enumerate(recs) if r.get("event") == "rollback"][0]:] if "lr" in r]
    ref_losses, _, _ = reference
    assert after[0]["step"] == 3  # back to step-2's checkpoint
    ref_lr = {r["step"]: r["lr"] for r in _records(Path(reference[2]["run_dir"])) if "lr" in r}
    assert after[0]["lr"] == pytest.approx(0.5 * ref_lr[3])
    # the data moved on: step 3 after the rollback trains on what an uninterrupted run saw at step 5
    assert all(r["loss"] == r["loss"] for r in after)


def test_repeated_nans_stop_with_a_clear_message(data_root, tiny_model_dir, monkeypatch):
    from tasks.train.stage import run_dir_for, run_train
    from tasks.train.supervisor import DIVERGED_FILE, TrainingDiverged

    monkeypatch.setenv("D2A_INJECT_NAN_STEPS", "3,4")
    cfg = _cfg(data_root, tiny_model_dir, "stop", max_bad_steps=2, on_divergence="stop")
    with pytest.raises(TrainingDiverged, match=r"diverged at step 4: 2 non-finite steps in a row; stopping \(train.on_divergence=stop\)"):
        run_train(cfg)
    run = run_dir_for(cfg)
    assert (run / DIVERGED_FILE).is_file() and not (run / "manifest.json").exists()
    assert not (run / "checkpoints" / "step-4").exists()


def test_loss_spike_is_skipped_and_stops_without_rollbacks_left(data_root, tiny_model_dir, monkeypatch):
    from tasks.train.stage import run_train
    from tasks.train.supervisor import TrainingDiverged

    monkeypatch.setenv("D2A_INJECT_SPIKE_STEPS", "5")
    cfg = _cfg(data_root, tiny_model_dir, "spike", spike_factor=3.0, spike_window=2, max_rollbacks=0)
    with pytest.raises(TrainingDiverged, match=r"loss spike .* > 3.0 x running mean; stopping \(train.max_rollbacks=0 used up\)"):
        run_train(cfg)


# ------------------------------------------------------------------ checkpoints and token budget
def test_keep_last_k_plus_best_by_eval_loss(tmp_path):
    from tasks.train.checkpoint import prune_checkpoints

    ck = tmp_path / "checkpoints"
    for s, ev in [(2, 1.0), (4, 0.5), (6, 0.9), (8, None), (10, 0.8)]:
        (ck / f"step-{s}").mkdir(parents=True)
        (ck / f"step-{s}" / "checkpoint.json").write_text(json.dumps({"step": s, "eval_loss": ev, "files": {}}))
    (ck / "step-12.partial").mkdir()
    gone = prune_checkpoints(tmp_path, keep=2, keep_best=True, protect=ck / "step-10")
    assert sorted(p.name for p in gone) == ["step-2", "step-6"]
    assert sorted(p.name for p in ck.iterdir()) == ["step-10", "step-12.partial", "step-4", "step-8"]
    prune_checkpoints(tmp_path, keep=1, keep_best=False, protect=ck / "step-10")
    assert sorted(p.name for p in ck.iterdir()) == ["step-10", "step-12.partial"]


def test_checkpoint_with_nonfinite_weights_is_never_written(tmp_path):
    from accelerate import Accelerator

    from tasks.train.checkpoint import NonFiniteWeights, save_checkpoint

    lin = torch.nn.Linear(2, 2)
    with torch.no_grad():
        lin.weight[0, 0] = float("inf")
    with pytest.raises(NonFiniteWeights, match="step 7"):
        save_checkpoint(tmp_path, Accelerator(cpu=True), lin, None, None, {"step": 7}, None, list(lin.parameters()))
    assert not (tmp_path / "checkpoints").exists()


def test_trainer_state_and_token_budget(data_root, tiny_model_dir):
    """max_tokens / warmup_tokens / eval_every_tokens / save_every_tokens convert to steps once
    (tokens per step = 2 x 2 x 1 x 32 = 128); the checkpoint records what resuming must match."""
    from tasks.train.stage import run_train

    cfg = _cfg(data_root, tiny_model_dir, "tokens", max_steps=None, max_tokens=600, warmup_tokens=256,
               eval_every_tokens=384, save_every_tokens=256, keep_checkpoints=1, keep_best=True)
    m = run_train(cfg)
    run = Path(m["run_dir"])
    assert m["counts"]["steps"] == 5 and m["counts"]["tokens_seen"] == 640
    recs = _records(run)
    lr = {r["step"]: r["lr"] for r in recs if "lr" in r}
    assert lr[1] == pytest.approx(cfg.train.lr / 2) and lr[2] == pytest.approx(cfg.train.lr)  # 2 warmup steps
    assert [r["step"] for r in recs if "eval_loss" in r] == [3, 5]
    assert all("eta_s" in r and "tokens_seen" in r for r in recs if "loss" in r)
    kept = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert "step-5" in kept and len(kept) <= 2  # the newest, plus the best by eval loss if that is another
    st = json.loads((run / "checkpoints" / "step-5" / "trainer_state.json").read_text())
    for key in ("world_size", "tokens_per_step", "train_fingerprint", "config_fingerprint",
                "tokenizer_fingerprint", "versions", "eval_loss", "data_position", "scheduler"):
        assert key in st, key
    assert st["tokens_per_step"] == 128 and st["versions"]["torch"] and st["eval_loss"] is not None


# ------------------------------------------------------------------------- supervision
def _tree_cmd(marker: str) -> list[str]:
    """A launcher with a child that ignores SIGTERM (a stuck rank)."""
    child = f"import signal,time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('{marker}', flush=True); time.sleep(600)"
    parent = (f"import subprocess,sys,time; subprocess.Popen([sys.executable,'-c',{child!r}]); time.sleep(600)")
    return [sys.executable, "-c", parent]


def _alive_with(marker: str) -> list[int]:
    import psutil

    out = []
    for p in psutil.process_iter(["pid", "cmdline", "status"]):
        if p.info["status"] != psutil.STATUS_ZOMBIE and marker in " ".join(p.info["cmdline"] or []):
            out.append(p.info["pid"])
    return out


def test_cancelled_supervise_leaves_no_process_alive():
    import logging

    from tasks.train.supervisor import supervise

    marker = f"d2a-stuck-rank-{os.getpid()}-{time.time_ns()}"

    class Cancelled(Exception):
        pass

    class CancelOnMarker(logging.Logger):
        def info(self, msg, *args, **kw):  # the flow run is cancelled while the worker runs
            if marker in (msg % args if args else msg):
                raise Cancelled

    with pytest.raises(Cancelled):
        supervise(_tree_cmd(marker), CancelOnMarker("t"), grace_s=1.0)
    assert _alive_with(marker) == []  # the SIGTERM-ignoring grandchild was SIGKILLed too


def test_killed_supervisor_stops_the_training_worker(data_root, tiny_model_dir, tmp_path):
    """The flow's process dies outright (kill -9): the worker notices, saves and exits; no rank stays."""
    import psutil

    from tasks.train.checkpoint import latest_checkpoint
    from tasks.train.stage import run_dir_for
    from tasks.train.supervisor import PREEMPTED_MARK

    cfg = _cfg(data_root, tiny_model_dir, "orphan", max_steps=200, save_every=100)
    run_dir = run_dir_for(cfg)
    code = ("import sys; sys.path.insert(0, %r); from tasks.core.config import config_from_dict; from tasks.train import run_train; "  # noqa: UP031
            "import json; run_train(config_from_dict(json.loads(sys.argv[1])))" % str(REPO))
    sup = subprocess.Popen([sys.executable, "-c", code, json.dumps(cfg.model_dump(mode="json"))], cwd=REPO,
                           env={**os.environ, "D2A_STEP_SLEEP_S": "0.1"}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait(lambda: any(s >= 2 for s, _ in _losses(run_dir)), sup)
    workers = psutil.Process(sup.pid).children(recursive=True)
    assert workers
    sup.kill()
    sup.wait()
    gone, alive = psutil.wait_procs(workers, timeout=60)
    assert not alive, [p.cmdline() for p in alive]
    assert json.loads((run_dir / PREEMPTED_MARK).read_text())["orphaned"] is True
    assert latest_checkpoint(run_dir) is not None and max(s for s, _ in _losses(run_dir)) < 200


# ------------------------------------------------------------------------------- launch layout
def test_fsdp_with_uint8_quant_storage_is_refused_clearly(tmp_path, tiny_model_dir):
    from conftest import tiny_config_dict

    from tasks.train.stage import check_launch

    d = tiny_config_dict(tmp_path, tiny_model_dir, train={"accelerate_config": "configs/accelerate/fsdp.yaml", "num_processes": 2})
    with pytest.raises(ValueError, match=r"FSDP-QLoRA needs model.quantization.quant_storage equal to the compute dtype \('float32'\), but it is 'uint8'"):
        check_launch(config_from_dict(d))
    d["model"]["quantization"]["quant_storage"] = "float32"
    check_launch(config_from_dict(d))
    d["train"]["nnodes"] = 2
    with pytest.raises(ValueError, match="rdzv_endpoint"):
        check_launch(config_from_dict(d))


def test_launch_commands(tmp_path, tiny_model_dir):
    from conftest import tiny_config_dict

    from tasks.train.stage import launch_command

    def cmd(**train):
        return launch_command(config_from_dict(tiny_config_dict(tmp_path, tiny_model_dir, train=train)), tmp_path / "r")

    assert cmd()[1:3] == ["-m", "tasks.train"]
    c = cmd(num_processes=2, launcher="torchrun")
    assert "torch.distributed.run" in c and "--standalone" in c and c[c.index("--nproc_per_node") + 1] == "2"
    c = cmd(num_processes=8, nnodes=2, node_rank=1, rdzv_endpoint="10.0.0.1:29500", launcher="torchrun")
    assert c[c.index("--rdzv_endpoint") + 1] == "10.0.0.1:29500" and c[c.index("--node_rank") + 1] == "1"
    c = cmd(num_processes=8, nnodes=2, node_rank=1, rdzv_endpoint="10.0.0.1:29500", accelerate_config="configs/accelerate/ddp.yaml")
    assert "accelerate.commands.launch" in c and c[c.index("--num_processes") + 1] == "16"
    assert c[c.index("--machine_rank") + 1] == "1" and c[c.index("--main_process_ip") + 1] == "10.0.0.1"
    assert c[c.index("--rdzv_backend") + 1] == "c10d"


def test_train_task_retries_interruptions_and_crashes_not_divergence():
    from prefect.states import Failed

    from tasks.train.stage import TrainingFailed, _retry_when_interrupted, train
    from tasks.train.supervisor import TrainingDiverged, TrainingInterrupted

    assert train.retries >= 2
    assert _retry_when_interrupted(None, None, Failed(data=TrainingInterrupted("x"), message="TrainingInterrupted('x')"))
    assert not _retry_when_interrupted(None, None, Failed(data=TrainingDiverged("x"), message="TrainingDiverged('x')"))
    assert _retry_when_interrupted(None, None, Failed(data=TrainingFailed("x"), message="TrainingFailed('x')"))
    assert not _retry_when_interrupted(None, None, Failed(data=ValueError("x"), message="ValueError('x')"))


def test_plan_steps_converts_token_budgets_once():
    from tasks.core.config import TrainConfig
    from tasks.train.plan import plan_steps

    tc = TrainConfig(micro_batch_size=8, grad_accum=4, max_tokens=56_000_000_000, warmup_tokens=200 * 8 * 4 * 16 * 2048,
                     eval_every_tokens=10**9, save_every_tokens=10**9)
    p = plan_steps(tc, rows=30_000_000, seq_len=2048, world=16)
    assert p["tokens_per_step"] == 8 * 4 * 16 * 2048 == 1_048_576
    assert p["total_steps"] == 53_406 and p["warmup_steps"] == 200 and p["eval_every"] == p["save_every"] == 954
    assert plan_steps(TrainConfig(epochs=2), rows=30_000_000, seq_len=2048, world=16)["total_steps"] == 2 * (30_000_000 // 16 // 8 // 4)
    with pytest.raises(ValueError, match="cannot fill one step"):
        plan_steps(tc, rows=100, seq_len=2048, world=16)
