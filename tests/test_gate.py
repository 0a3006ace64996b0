"""The promotion gate fails closed: a category held out by one side only blocks; a candidate that lost
general ability (its loss on the general instruction set against the base's) is refused; with
``schedule.approval`` a real Prefect flow pauses with the comparison table, promotes on approve and
rejects on timeout (temporary Prefect API; tiny model, real training)."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import pytest
from conftest import CORPUS, prepare_tokenized

from tasks.adapter.promote import decide, read_general_set, run_promote


# --------------------------------------------------------------------------- plain functions
def test_one_sided_category_blocks():
    cur = {"recipes": 2.0, "code": 3.0}
    d = decide({"recipes": 1.0}, cur, tolerance=1.0)  # far better where compared, but code is unknown
    assert not d.promote and "code (held out by the current adapter only)" in d.reasons[0]
    d = decide({"recipes": 1.0, "code": 2.0, "articles": 2.0}, cur, tolerance=1.0)
    assert not d.promote and "articles (held out by the candidate only)" in d.reasons[0]
    assert decide({"recipes": 1.0, "code": 2.0}, cur, tolerance=0.0).promote


def test_general_set_bad_lines_are_named_and_kept_aside(tmp_path):
    p = tmp_path / "g.jsonl"
    p.write_text('{"prompt": "Capital of Italy?", "answer": "Rome."}\n\nnot json\n{"prompt": "x"}\n'
                 '{"prompt": "", "answer": "y"}\n["a"]\n')
    items, rejects = read_general_set(p)
    assert [i["line"] for i in items] == [1]
    assert [(r["line"], r["reason"].split(":")[0]) for r in rejects] == [
        (3, "not JSON"), (4, "missing or empty answer"), (5, "missing or empty prompt"),
        (6, "missing or empty prompt, answer")]
    with pytest.raises(FileNotFoundError, match="general_set"):
        read_general_set(tmp_path / "missing.jsonl")


def test_shipped_general_set_is_usable():
    items, rejects = read_general_set(Path("configs/general_instructions.jsonl"))
    assert len(items) >= 20 and not rejects


# ---------------------------------------------------------------------------- tiny real runs
def _train(root, model_dir, docs, **sections):
    from tasks.evaluate import run_evaluate
    from tasks.train.stage import run_train

    cfg = prepare_tokenized(root, model_dir, docs=docs, train={"max_steps": 4, "eval_every": 100, "save_every": 100},
                            **sections)
    m = run_train(cfg)
    run_evaluate(cfg)
    return cfg, Path(m["run_dir"])


TWO = {"recipes": CORPUS[:2] * 6, "code": CORPUS[4:5] * 6}


@pytest.fixture(scope="module")
def general_base(tmp_path_factory, tiny_model_dir):
    """The tiny random model, fully fine-tuned on the shipped general set until it predicts its answers
    far better than chance (loss ~2.3 vs ln 300 = 5.7): a base with some 'general ability' to lose."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tasks.adapter.generate import encode_messages

    out = tmp_path_factory.mktemp("general-base")
    shutil.copytree(tiny_model_dir, out, dirs_exist_ok=True)
    tok, model = AutoTokenizer.from_pretrained(out), AutoModelForCausalLM.from_pretrained(out)
    items, _ = read_general_set(Path("configs/general_instructions.jsonl"))
    rows = []
    for it in items:
        p = encode_messages(tok, [{"role": "user", "content": it["prompt"]}])["input_ids"][0].tolist()
        a = tok(it["answer"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        rows.append((p + a, [-100] * len(p) + a))
    n = max(len(r[0]) for r in rows)
    ids = torch.tensor([r[0] + [tok.pad_token_id] * (n - len(r[0])) for r in rows])
    labels = torch.tensor([r[1] + [-100] * (n - len(r[1])) for r in rows])
    mask = (torch.arange(n)[None] < torch.tensor([len(r[0]) for r in rows])[:, None]).long()
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(60):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert loss.item() < 3.5
    model.save_pretrained(out, safe_serialization=True)
    return out


@pytest.fixture(scope="module")
def first(tmp_path_factory, general_base):
    return _train(tmp_path_factory.mktemp("gate") / "a", general_base, TWO,
                  schedule={"general_tolerance": 100.0})


def test_candidate_missing_a_category_is_refused(first, tmp_path, general_base):
    from tasks.adapter.promote import read_current

    cfg, run = first
    root = cfg.root
    assert run_promote(cfg, run)["promoted"] is True  # the first adapter (general check passes at tolerance 100)
    # a candidate whose held-out split lost 'code' (its source went dark), trained in the same data root
    cand_root = tmp_path / "b"
    cfg_b, run_b = _train(cand_root, general_base, {"recipes": CORPUS[:2] * 6},
                          run_name="cand", schedule={"general_tolerance": 100.0})
    run_b_here = root / "runs" / run_b.name
    shutil.copytree(run_b, run_b_here)
    out = run_promote(cfg, run_b_here)
    assert out["promoted"] is False
    assert "code (held out by the current adapter only)" in out["reasons"][0]
    assert read_current(root)["run_id"] == run.name
    blocked = [r for r in out["rows"] if r["category"] == "code"]
    assert blocked and blocked[0]["verdict"].startswith("blocks")


def test_candidate_worse_on_the_general_set_is_refused(first, tmp_path):
    """A damaged adapter (LoRA B replaced by large random values): the general-set loss rises above the
    base's; refused. The same run with its real adapter measures a smaller change."""
    import torch
    from safetensors.torch import load_file, save_file

    cfg, run = first
    from tasks.adapter.promote import measure_general
    from tasks.core.config import resolve_path

    good = measure_general(run, resolve_path(cfg.schedule.general_set))
    bad_run = tmp_path / "runs" / (run.name + "-damaged")
    shutil.copytree(run, bad_run)
    f = bad_run / "adapter" / "adapter_model.safetensors"
    sd = load_file(str(f))
    g = torch.Generator().manual_seed(0)
    save_file({k: (torch.randn(v.shape, generator=g) if "lora_B" in k else v).contiguous() for k, v in sd.items()},
              str(f), metadata={"format": "pt"})
    (bad_run / "general.json").unlink(missing_ok=True)
    strict = cfg.model_copy(update={"schedule": cfg.schedule.model_copy(update={"general_tolerance": 0.05}),
                                    "data_root": str(tmp_path / "fresh")})
    out = run_promote(strict, bad_run)
    assert out["promoted"] is False
    assert any("lost general ability" in r for r in out["reasons"])
    g = out["general"]
    assert g["delta"] > 0.05 and g["candidate"]["loss"] > g["base"]["loss"]
    assert good["delta"] < g["delta"]
    assert [r for r in out["rows"] if r["category"] == "general set (vs base)"][0]["verdict"] == "worse"


# ----------------------------------------------------------------------------------- approval
@pytest.fixture(scope="module")
def prefect_api():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def _gate_flow():
    from prefect import flow, get_run_logger

    from flows.pipeline import promote_step
    from tasks.core.config import config_from_dict

    @flow(name="gate-test")
    def gate(cfg_dict: dict, run_dir: str) -> dict:
        return promote_step(config_from_dict(cfg_dict), Path(run_dir), get_run_logger())

    return gate


def _paused_run(name_started_after: float, timeout: float = 120):
    from prefect import get_client

    deadline = time.time() + timeout
    with get_client(sync_client=True) as c:
        while time.time() < deadline:
            for fr in c.read_flow_runs():
                if fr.state and fr.state.is_paused() and fr.created.timestamp() >= name_started_after - 5:
                    return fr
            time.sleep(0.5)
    raise AssertionError("the flow never paused for approval")


def _approval_cfg(first, tmp_path, timeout_s):
    cfg, run = first
    root = tmp_path / "root"
    shutil.copytree(run, root / "runs" / run.name)
    d = cfg.model_dump(mode="json")
    d["data_root"] = str(root)
    d["schedule"].update(approval=True, approval_timeout_s=timeout_s, general_tolerance=100.0)
    return d, root / "runs" / run.name


@pytest.mark.timeout(600)
def test_approval_promotes_on_approve(first, tmp_path, prefect_api):
    from prefect.flow_runs import resume_flow_run

    d, run = _approval_cfg(first, tmp_path, 600)
    result: dict = {}
    t0 = time.time()
    th = threading.Thread(target=lambda: result.update(out=_gate_flow()(d, str(run))))
    th.start()
    fr = _paused_run(t0)
    assert not (Path(d["data_root"]) / "current.json").exists()  # nothing promoted while it waits
    resume_flow_run(fr.id, run_input={"approve": True, "reviewer": "ana", "comment": "checked the samples"})
    th.join(300)
    out = result["out"]
    assert out["promoted"] is True and out["approval"] == {"approved": True,
                                                           "detail": "approved by ana (checked the samples)"}
    assert json.loads((Path(d["data_root"]) / "current.json").read_text())["run_id"] == run.name


@pytest.mark.timeout(600)
def test_approval_rejects_on_timeout(first, tmp_path, prefect_api):
    d, run = _approval_cfg(first, tmp_path, 3)
    out = _gate_flow()(d, str(run))
    assert out["promoted"] is False and "no approval within 3 s" in out["reasons"][-1]
    assert not (Path(d["data_root"]) / "current.json").exists()
    history = [json.loads(x) for x in (Path(d["data_root"]) / "promotions.jsonl").read_text().splitlines()]
    assert history[-1]["promoted"] is False
