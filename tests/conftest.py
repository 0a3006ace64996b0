"""Shared fixtures: a tiny random Llama with a real (small, trained-on-the-fly) BPE tokenizer, so
unit tests exercise the real NF4 + LoRA + training code in seconds without any download."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from scrapers.schema import REPO_ROOT as REPO  # noqa: F401 - tests import it from here

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# No GPU here: the fast path's Triton kernels (tasks/train/kernels.py) run in Triton's CPU interpreter,
# which is chosen when the kernels are defined, so before anything imports tasks.kernels
if not Path("/dev/nvidiactl").exists():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# A skipped test is a check that did not run. Only missing hardware, or a platform a dependency has
# no build for, may skip, and the reason must say which (these prefixes); a skip for anything else (a
# tracked file, a dependency, a tool CI installs: a missing part of the product) is reported as a
# failure naming its reason, so `make test` cannot pass with a check that quietly did not run.
ALLOWED_SKIP_REASONS = ("needs a CUDA GPU", "needs 2 CUDA GPUs", "CPU only:", "no Triton build for this platform")


def _skip_reason(longrepr) -> str:
    reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    return reason.removeprefix("Skipped: ")


def _fail_unallowed_skip(rep, where: str) -> None:
    if rep.skipped and not hasattr(rep, "wasxfail"):
        reason = _skip_reason(rep.longrepr)
        if not reason.startswith(ALLOWED_SKIP_REASONS):
            rep.outcome = "failed"
            rep.longrepr = (f"{where} was skipped ({reason!r}), but only missing hardware may skip a test "
                            f"(reasons starting with {ALLOWED_SKIP_REASONS}): a missing part of the product fails")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _fail_unallowed_skip(outcome.get_result(), item.nodeid)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield  # a module-level pytest.skip / importorskip skips the whole file at collection
    _fail_unallowed_skip(outcome.get_result(), collector.nodeid)


CORPUS = [
    "Red lentil soup: rinse the lentils, soften onion and carrot in olive oil, add cumin and stock.",
    "Simmer for twenty minutes until the lentils collapse, then season with lemon and salt.",
    "Ingredients: oat flour, water, rapeseed oil, salt. Nutrition per 100 g: energy 46 kcal.",
    "Citric acid (E330) is an acidity regulator found naturally in lemons and limes.",
    "def kcal(protein, carbs, fat):\n    return 4 * protein + 4 * carbs + 9 * fat",
    "Dietary fibre supports digestion; most adults eat less than the recommended 30 g a day.",
]


def tiny_config_dict(root: Path, model_dir: Path, **sections) -> dict:
    """A full pipeline config for tests: tiny model, small shapes, data under ``root``."""
    base = {
        "run_name": "t",
        "data_root": str(root),
        "scrape": {"sources": "configs/sources/demo.yaml", "min_delay_s": 0},
        "model": {"name": str(model_dir), "quantization": {"compute_dtype": "float32"}},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "tokenize": {"seq_len": 32, "rows_per_shard": 16},
        "train": {"micro_batch_size": 2, "grad_accum": 2, "epochs": 1, "lr": 5e-3, "warmup_steps": 1,
                  "eval_every": 2, "save_every": 2, "eval_batches": 1, "num_threads": 1},
        "evaluate": {"max_rows_per_category": 4, "batch_size": 2, "max_new_tokens": 4},
        "tracking": {"tensorboard": False, "wandb": "off"},
    }
    for k, v in sections.items():
        base[k] = {**base.get(k, {}), **v} if isinstance(v, dict) else v
    return base


def read_metrics(run_dir) -> list[dict]:
    """The records of a run's metrics.jsonl (empty if it has none yet)."""
    import json

    p = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()] if p.is_file() else []


def prepare_tokenized(root: Path, model_dir: Path, docs: dict | None = None, **sections):
    """Mixed training docs and held-out docs (two categories by default), tokenized by the real
    stage; returns the config. The fake mix/split manifests stand in for the upstream stages."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tasks.core.config import config_from_dict
    from tasks.core.manifest import write_json_atomic
    from tasks.tokenize.stage import run_tokenize

    cfg = config_from_dict(tiny_config_dict(root, model_dir, **sections))
    docs = docs or {"recipes": CORPUS[:2] * 6, "code": CORPUS[4:5] * 6}
    for d in (root / "mix" / "train", root / "split" / "eval"):
        d.mkdir(parents=True)
        for cat, ts in docs.items():
            pq.write_table(pa.table({"doc_id": [f"{cat}{i}" for i in range(len(ts))], "text": ts,
                                     "repeat": [1] * len(ts)}), d / f"{cat}.parquet")
    write_json_atomic(root / "mix" / "manifest.json", {"fingerprint": "m"})
    write_json_atomic(root / "split" / "manifest.json", {"fingerprint": "s"})
    run_tokenize(cfg)
    return cfg


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = tmp_path_factory.mktemp("tiny-llama")
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(CORPUS * 20, trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>", "<pad>"],
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", pad_token="<pad>")
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
    tok.save_pretrained(out)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(out, safe_serialization=True)
    return out
