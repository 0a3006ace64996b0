"""Every config file loads; mistakes name the key; overrides work."""

import pytest
import yaml

from scrapers.schema import REPO_ROOT as REPO
from tasks.core.config import ConfigError, load_config, load_sources, resolve_path

PIPELINE_CONFIGS = sorted(p for p in (REPO / "configs").glob("*.yaml"))
SOURCE_FILES = sorted((REPO / "configs" / "sources").glob("*.yaml"))
ACCELERATE_FILES = sorted((REPO / "configs" / "accelerate").glob("*.yaml"))


def test_there_are_configs():
    names = {p.name for p in PIPELINE_CONFIGS}
    assert {"demo.yaml", "mistral-small-24b.yaml"} <= names


@pytest.mark.parametrize("path", PIPELINE_CONFIGS, ids=lambda p: p.name)
def test_pipeline_config_loads(path, monkeypatch):
    monkeypatch.setenv("DEMO_SITE", "http://127.0.0.1:1")
    cfg = load_config(path)
    assert abs(sum(cfg.mix.ratios.values()) - 1) < 1e-9
    sources = load_sources(cfg.scrape.sources)
    assert sources and all(s.permission is not None for s in sources)


@pytest.mark.parametrize("path", SOURCE_FILES, ids=lambda p: p.name)
def test_sources_file_loads(path, monkeypatch):
    monkeypatch.setenv("DEMO_SITE", "http://127.0.0.1:1")
    assert load_sources(path)


@pytest.mark.parametrize("path", ACCELERATE_FILES, ids=lambda p: p.name)
def test_accelerate_config_is_valid_yaml(path):
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict) and "distributed_type" in data


def test_production_config_is_the_seed_recipe():
    c = load_config("configs/mistral-small-24b.yaml")
    assert c.model.name == "mistralai/Mistral-Small-24B-Instruct-2501"
    q = c.model.quantization
    assert (q.load_in_4bit, q.quant_type, q.double_quant, q.compute_dtype) == (True, "nf4", True, "bfloat16")
    lo = c.lora
    assert (lo.r, lo.alpha, lo.dropout, lo.target_modules, lo.bias) == (32, 64, 0.05, ["q_proj", "k_proj", "v_proj"], "all")
    t = c.train
    # the seed's 8 x 4 rows per optimizer step, taken as 4 x 8 without recomputation (the speed point)
    assert (t.micro_batch_size * t.grad_accum, t.eval_every, t.save_every, t.epochs) == (32, 400, 400, 2)
    assert (t.micro_batch_size, t.gradient_checkpointing, t.fast_lora, t.attention) == (4, False, True, "auto")
    assert (t.lr, t.optimizer, t.warmup_steps, t.scheduler) == (2e-4, "paged_adamw_8bit", 200, "cosine")
    assert c.split.eval_fraction == 0.1
    assert c.mix.ratios == {"recipes": 0.43, "product_compositions": 0.25, "articles": 0.18, "code": 0.10,
                            "product_descriptions": 0.03, "chemical_additives": 0.01}


def _write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


BASE = "scrape: {sources: configs/sources/demo.yaml}\nmodel: {name: m}\n"


def test_unknown_key_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.learning_rate: unknown key"):
        load_config(_write(tmp_path, BASE + "train: {learning_rate: 0.1}\n"))


def test_wrong_type_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.micro_batch_size: .*integer"):
        load_config(_write(tmp_path, BASE + "train: {micro_batch_size: eight}\n"))


def test_missing_section_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"model: Field required"):
        load_config(_write(tmp_path, "scrape: {sources: x}\n"))


def test_bad_ratios_rejected(tmp_path):
    with pytest.raises(ConfigError, match="sum to 1"):
        load_config(_write(tmp_path, BASE + "mix: {ratios: {recipes: 0.5, code: 0.4}}\n"))
    with pytest.raises(ConfigError, match="unknown categories"):
        load_config(_write(tmp_path, BASE + "mix: {ratios: {desserts: 1.0}}\n"))


def test_overrides(tmp_path):
    p = _write(tmp_path, BASE)
    c = load_config(p, ["train.lr=1e-4", "lora.target_modules=[q_proj,v_proj]", "train.max_steps=7", "run_name=x"])
    assert (c.train.lr, c.lora.target_modules, c.train.max_steps, c.run_name) == (1e-4, ["q_proj", "v_proj"], 7, "x")
    with pytest.raises(ConfigError, match=r"train\.nope: unknown key"):
        load_config(p, ["train.nope=1"])
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_config(p, ["train.lr"])


def test_invalid_yaml_names_file(tmp_path):
    p = _write(tmp_path, "train: [unclosed\n")
    with pytest.raises(ConfigError, match=str(p)):
        load_config(p)


def test_relative_paths_are_from_repo():
    assert resolve_path("configs/demo.yaml") == REPO / "configs" / "demo.yaml"


def test_source_without_permission_is_invalid_or_refused(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text("sources:\n  - {id: x, category: desserts, start_urls: ['http://a/']}\n")
    with pytest.raises(ConfigError, match=r"sources\.0\.category"):
        load_sources(p)
