"""The one door to Prefect for the stages: its ``task`` decorator (a pass-through where Prefect is not
installed) and the one retry policy.

The stages are plain functions; Prefect only wires them. Training workers on GPU nodes import
``tasks.train`` and ``tasks.tokenize`` without needing Prefect (or its server stack) there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

try:
    from prefect import task
except ImportError:  # pragma: no cover - exercised on GPU nodes without Prefect

    def task(fn=None, **_kwargs):
        return fn if fn is not None else (lambda f: f)


@dataclass(frozen=True)
class RetryPolicy:
    """Retry a task run that failed with one of ``retry_on`` (a relaunch that can succeed: a preempted
    or crashed worker resumes from its checkpoint), ``retries`` times, ``delay_s`` apart; anything else
    (a config error, a divergence stop) fails at once. A cancelled flow run is never retried."""

    retry_on: tuple[type[BaseException], ...]
    retries: int = 2
    delay_s: float = 10.0

    def should_retry(self, task_, task_run, state) -> bool:
        # the exception when Prefect kept it in the state; else its class name in the state's message
        exc = getattr(state, "data", None)
        return isinstance(exc, self.retry_on) or any(k.__name__ in (state.message or "") for k in self.retry_on)

    def options(self) -> dict[str, Any]:
        """Keyword arguments for ``@task`` / ``Task.with_options``."""
        return {"retries": self.retries, "retry_delay_seconds": self.delay_s, "retry_condition_fn": self.should_retry}


__all__ = ["RetryPolicy", "task"]
