"""Early stopping and the periodic-eval sample (issue 17, the loop's part): the stop rule, the size of
a held-out sample for a given standard error, eval sharded across two gloo processes equal to eval
in one, and the real loop on the tiny Llama stopping on a flat held-out loss, not on an improving
one, keeping the best adapter."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch
from conftest import prepare_tokenized, read_metrics, tiny_config_dict
from safetensors.torch import load_file

from tasks.core.config import ConfigError, config_from_dict


# --------------------------------------------------------------------------------- the rule
def test_rule_stops_after_patience_evaluations_without_min_delta():
    from tasks.train.early_stop import EarlyStop

    es = EarlyStop(patience=2, min_delta=0.01)
    assert es.update(1, 2.0) == (True, None)  # the first evaluation is the reference
    assert es.update(2, 1.995) == (True, None)  # lower (the best so far) but not by min_delta: 1 of 2
    best, why = es.update(3, 1.999)
    assert not best and why and "patience 2" in why and "best 1.9950 at step 2" in why
    es = EarlyStop(patience=2, min_delta=0.01)
    for step, loss in enumerate([2.0, 1.98, 1.96, 1.97, 1.94, 1.95], 1):  # one bad evaluation at a time
        assert es.update(step, loss)[1] is None
    assert es.best_step == 5
    saved = json.loads(json.dumps(es.state()))  # survives a checkpoint (JSON) and a resume
    again = EarlyStop.from_config(config_from_dict(tiny_config_dict(Path("/x"), Path("/m"))).train.early_stopping, saved)
    assert (again.reference, again.best, again.best_step, again.evals_without_improvement) == (1.94, 1.94, 5, 1)


def test_rule_disabled_never_stops_but_tracks_the_best():
    from tasks.train.early_stop import EarlyStop

    es = EarlyStop(patience=1, min_delta=0.1, enabled=False)
    assert [es.update(s, 1.0)[1] for s in range(1, 5)] == [None] * 4
    assert es.best_step == 4  # ties: the newest, as prune_checkpoints keeps it
    assert EarlyStop(1, 0.1).state()["best"] is None  # inf is not JSON


def test_rows_for_standard_error():
    from tasks.train.heldout import rows_for_standard_error

    assert rows_for_standard_error(0.3, 0.01) == 900  # SE = 0.3 / sqrt(900) = 0.01
    assert rows_for_standard_error(0.305, 0.01) == 931  # (30.5)^2 = 930.25: the next whole row
    assert 0.305 / math.sqrt(931) <= 0.01 < 0.305 / math.sqrt(930)
    assert rows_for_standard_error(0.0, 0.01) == 1
    with pytest.raises(ValueError):
        rows_for_standard_error(0.3, 0)


def test_config_keys():
    d = tiny_config_dict(Path("/x"), Path("/m"), train={"eval_rows_per_category": "auto",
                                                         "early_stopping": {"enabled": True, "patience": 4}})
    tc = config_from_dict(d).train
    assert tc.eval_rows_per_category == "auto" and tc.early_stopping.patience == 4
    d["train"]["keep_best"] = False
    with pytest.raises(ConfigError, match="keep_best"):
        config_from_dict(d)
    d["train"].update(keep_best=True, eval_rows_per_category="many")
    with pytest.raises(ConfigError, match="eval_rows_per_category"):
        config_from_dict(d)


# ------------------------------------------------------------------------------ sharded eval
def test_shards_are_disjoint_cover_the_sample_and_run_in_lockstep():
    from tasks.train.heldout import _lockstep_batches, shard_rows

    for n in range(0, 12):
        for world in (1, 2, 3, 5):
            shares = [shard_rows(n, r, world) for r in range(world)]
            assert sorted(i for s in shares for i in s) == list(range(n))
            for bs in (1, 2, 4):
                runs = [list(_lockstep_batches(n, bs, r, world)) for r in range(world)]
                assert len({len(b) for b in runs}) == 1  # the same number of forwards on every rank
                real = sorted(i for b in runs for idx, ok in b if ok for i in idx)
                assert real == list(range(n))


def _eval_rank(rank: int, world: int, port: int, model_dir: str, tok_dir: str, rows: int, out: str) -> None:
    """One of two gloo processes: its share of the sample, summed across ranks by a real all_reduce."""
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from tasks.train.heldout import eval_losses, load_eval_sets

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(model_dir)

    def all_reduce(t):
        dist.all_reduce(t)
        return t

    res = eval_losses(model, load_eval_sets(Path(tok_dir)), rows, 2, torch.device("cpu"), rank, world, all_reduce)
    Path(out).with_suffix(f".{rank}.json").write_text(json.dumps(res))
    dist.destroy_process_group()


def test_eval_sharded_over_two_gloo_processes_equals_one_process(tmp_path, tiny_model_dir):
    import socket

    import torch.multiprocessing as mp
    from transformers import AutoModelForCausalLM

    from tasks.train.heldout import eval_losses, load_eval_sets

    cfg = prepare_tokenized(tmp_path, tiny_model_dir)
    tok_dir = next(p for p in (tmp_path / "tokenized").iterdir() if p.is_dir())
    sets = load_eval_sets(tok_dir)
    rows = 5  # odd: rank 1 runs a filler batch to keep the forwards in lockstep
    assert sets and all(len(s) >= rows for s in sets.values()), {c: len(s) for c, s in sets.items()}
    one = eval_losses(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), sets, rows, 2, torch.device("cpu"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "res"
    mp.spawn(_eval_rank, args=(2, port, str(tiny_model_dir), str(tok_dir), rows, str(out)), nprocs=2, join=True)
    for rank in (0, 1):
        two = json.loads(out.with_suffix(f".{rank}.json").read_text())
        assert two["categories"].keys() == one["categories"].keys()
        for cat, r in one["categories"].items():
            assert two["categories"][cat]["tokens"] == r["tokens"]
            assert two["categories"][cat]["loss"] == pytest.approx(r["loss"], rel=1e-6)
        assert two["overall"]["loss"] == pytest.approx(one["overall"]["loss"], rel=1e-6)
    assert cfg.train.micro_batch_size == 2


# ---------------------------------------------------------------------------- the real loop
ES = {"eval_every": 1, "save_every": 100, "warmup_steps": 0, "keep_checkpoints": 1}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("early")
    prepare_tokenized(root, tiny_model_dir)
    return root


class _Lines(logging.Logger):
    """The worker's output, as run_train's supervisor logs it line by line."""

    def __init__(self):
        super().__init__("t")
        self.lines: list[str] = []

    def info(self, msg, *args, **kw):
        self.lines.append(msg % args if args else msg)


def _run(root, model_dir, name, **train):
    from tasks.train.stage import run_train

    cfg = config_from_dict(tiny_config_dict(root, model_dir, run_name=name, train={**ES, **train}))
    out = _Lines()
    m = run_train(cfg, out)
    m["log"] = out.lines
    return m, Path(m["run_dir"]), read_metrics(m["run_dir"])


def _kept_is_best_checkpoint(m, run: Path) -> None:
    kept = load_file(run / "adapter" / "adapter_model.safetensors")
    best = load_file(run / "checkpoints" / f"step-{m['best_eval_step']}" / "adapter" / "adapter_model.safetensors")
    assert kept.keys() == best.keys() and all(torch.equal(kept[k], best[k]) for k in kept)


def test_flat_heldout_loss_stops_early_and_keeps_the_best(data_root, tiny_model_dir):
    """lr 1e-12: the adapter does not move, held-out loss is flat, so after the first evaluation
    `patience` more without an improvement of min_delta stop the run (12 steps planned)."""
    m, run, recs = _run(data_root, tiny_model_dir, "flat", lr=1e-12, max_steps=12,
                        early_stopping={"enabled": True, "patience": 2, "min_delta": 1e-3})
    assert m["counts"]["steps"] == 3
    assert m["stop_reason"].startswith("early stopping: held-out loss has not improved by min_delta=0.001 for 2 evaluations")
    (ev,) = [r for r in recs if r.get("event") == "early_stop"]
    assert ev["step"] == 3 and ev["reason"] == m["stop_reason"]
    (stopped,) = [r for r in recs if r.get("event") == "stopped"]
    assert stopped["reason"] == m["stop_reason"] and stopped["adapter_step"] == m["best_eval_step"]
    evals = [r["eval_loss"] for r in recs if "eval_loss" in r]
    assert len(evals) == 3 and m["best_eval_loss"] == min(evals)
    _kept_is_best_checkpoint(m, run)
    assert any(line.startswith("training stopped at step 3: early stopping") for line in m["log"]), m["log"][-5:]


def test_improving_heldout_loss_runs_to_its_budget(data_root, tiny_model_dir):
    m, run, recs = _run(data_root, tiny_model_dir, "improving", max_steps=8, lr=0.05, optimizer="adamw_torch",
                        scheduler="constant", early_stopping={"enabled": True, "patience": 2, "min_delta": 1e-4})
    evals = [r["eval_loss"] for r in recs if "eval_loss" in r]
    assert len(evals) == 8 and evals[-1] < evals[0] - 0.05, evals
    assert m["counts"]["steps"] == 8 and m["stop_reason"] == "reached train.max_steps=8"
    assert not [r for r in recs if r.get("event") == "early_stop"]
    assert m["best_eval_step"] == max(i for i, e in enumerate(evals, 1) if e == min(evals))
    _kept_is_best_checkpoint(m, run)


def test_worsening_heldout_loss_stops_and_keeps_the_earlier_best(data_root, tiny_model_dir):
    """lr 0.2: held-out loss falls for a few steps, then rises; the run stops `patience` evaluations
    after its lowest point and the adapter it keeps is that point's, not the last step's."""
    m, run, recs = _run(data_root, tiny_model_dir, "worsening", max_steps=12, lr=0.2, optimizer="adamw_torch",
                        scheduler="constant", early_stopping={"enabled": True, "patience": 3, "min_delta": 1e-3})
    evals = [r["eval_loss"] for r in recs if "eval_loss" in r]
    best = min(range(len(evals)), key=evals.__getitem__) + 1
    assert 1 < best < m["counts"]["steps"] < 12, evals
    assert m["best_eval_step"] == m["adapter_step"] == best and m["best_eval_loss"] == evals[best - 1]
    _kept_is_best_checkpoint(m, run)
    kept = load_file(run / "adapter" / "adapter_model.safetensors")
    last = load_file(run / "checkpoints" / f"step-{m['counts']['steps']}" / "adapter" / "adapter_model.safetensors")
    assert any(not torch.equal(kept[k], last[k]) for k in kept)  # not simply the newest weights
    ck = json.loads((run / "checkpoints" / f"step-{best}" / "trainer_state.json").read_text())
    assert ck["early_stopping"]["best_step"] == best


def test_plan_counts_every_node_and_the_token_budget():
    """The one step plan (flows, `d2a plan` and the worker call it): world = num_processes x nnodes,
    and the token budget sets the length whatever the epochs say."""
    from tasks.core.config import TrainConfig
    from tasks.train.plan import plan_steps

    tc = TrainConfig(micro_batch_size=4, grad_accum=8, num_processes=8, nnodes=2, max_tokens=56_000_000_000, epochs=2)
    p = plan_steps(tc, rows=30_000_000, seq_len=2048)
    assert p["world_size"] == 16 and p["tokens_per_step"] == 4 * 8 * 16 * 2048
    assert p["limit"] == "max_tokens" and p["total_steps"] == math.ceil(56_000_000_000 / p["tokens_per_step"])
    assert p["total_tokens"] >= 56_000_000_000 > p["total_tokens"] - p["tokens_per_step"]
    assert p["epochs"] == pytest.approx(p["total_steps"] / (30_000_000 // 16 // 4 // 8))
    assert p["evals"] == math.ceil(p["total_steps"] / 400)
    assert plan_steps(tc, rows=30_000_000, seq_len=2048, world=8)["tokens_per_step"] == 4 * 8 * 8 * 2048
    assert plan_steps(tc.model_copy(update={"max_tokens": None}), 30_000_000, 2048)["limit"] == "epochs"
