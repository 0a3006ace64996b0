"""Prefect's ``task`` decorator, or a pass-through where Prefect is not installed.

The stages are plain functions; Prefect only wires them. Training workers on GPU nodes import
``tasks.train`` and ``tasks.tokenize`` without needing Prefect (or its server stack) there.
"""

from __future__ import annotations

try:
    from prefect import task
except ImportError:  # pragma: no cover - exercised on GPU nodes without Prefect

    def task(fn=None, **_kwargs):
        return fn if fn is not None else (lambda f: f)


__all__ = ["task"]
