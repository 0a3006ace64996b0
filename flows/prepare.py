"""The ``prepare`` subflow: clean+dedup -> split -> mix -> tokenize, on the extracted corpus."""

from __future__ import annotations

from typing import Any

from prefect import flow

from tasks.clean import clean
from tasks.config import load_config
from tasks.mix import mix
from tasks.split import split
from tasks.tokenize import tokenize


@flow(name="prepare", log_prints=True)
def prepare(config: str = "configs/demo.yaml", overrides: list[str] | None = None) -> dict[str, Any]:
    """Turn ``extracted/`` into packed, tokenized shards; returns the stages' manifests."""
    d = load_config(config, overrides or []).model_dump(mode="json")
    return {"clean": clean(d), "split": split(d), "mix": mix(d), "tokenize": tokenize(d)}
