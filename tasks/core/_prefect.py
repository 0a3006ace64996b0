"""The one door to Prefect for the stages: its ``task`` decorator (a pass-through where Prefect is not
installed) and the one retry policy.

The stages are plain functions; Prefect only wires them. Training workers on GPU nodes import
``tasks.train`` and ``tasks.tokenize`` without needing Prefect (or its server stack) there.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

try:
    from prefect import task
except ImportError:  # pragma: no cover - exercised on GPU nodes without Prefect

    def task(fn=None, **_kwargs):
        return fn if fn is not None else (lambda f: f)


@dataclass(frozen=True)
class RetryPolicy:
    """Retry a task run that failed with one of ``retry_on`` (a relaunch that can succeed: a preempted
    or crashed worker resumes from its checkpoint, a flaky network answers next time), ``retries``
    times, ``delay_s`` apart, each attempt limited to ``timeout_s``; anything else (a config error, a
    divergence stop, a bug) fails at once. A cancelled flow run is never retried. Which failures are
    worth a retry is the stage's to say (its module defines its policy); how often and how long come
    from the config's ``timeouts.<stage>`` (``configured``)."""

    retry_on: tuple[type[BaseException], ...] = ()
    retries: int = 2
    delay_s: float = 10.0
    timeout_s: float | None = None

    def should_retry(self, task_, task_run, state) -> bool:
        # the exception when Prefect kept it in the state, else the result's; else its class name in
        # the state's message (a result that could not be persisted)
        exc = getattr(state, "data", None)
        if not isinstance(exc, BaseException):
            try:
                exc = state.result(raise_on_failure=False)
            except Exception as e:  # noqa: BLE001 - the result itself could not be read
                exc = e
        return isinstance(exc, self.retry_on) or any(k.__name__ in (state.message or "") for k in self.retry_on)

    def configured(self, stage_policy: Any) -> RetryPolicy:
        """This policy with the retries, delay and timeout of a config ``timeouts.<stage>`` section."""
        return replace(self, retries=stage_policy.retries if self.retry_on else 0,
                       delay_s=stage_policy.retry_delay_s, timeout_s=stage_policy.timeout_s)

    def options(self) -> dict[str, Any]:
        """Keyword arguments for ``@task`` / ``Task.with_options``."""
        return {"retries": self.retries, "retry_delay_seconds": self.delay_s, "retry_condition_fn": self.should_retry,
                "timeout_seconds": self.timeout_s}


# data stages are deterministic: a retry would fail the same way
NO_RETRY = RetryPolicy(retries=0)


__all__ = ["NO_RETRY", "RetryPolicy", "task"]
