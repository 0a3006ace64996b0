"""What a flow run triggered through the API may change, and one run per data root at a time.

Anyone who can create a flow run can pass parameters. Those may tune a run (steps, learning rate,
eval cadence, ``force``), never choose what code runs or where: the model and tokenizer (a hub
repository's code runs at the first tokenizer load with ``trust_remote_code``), the Dask scheduler
(pickle over TCP), launcher commands and node layout, paths outside the data root, the sources to
crawl, the pools. Those come only from the config file on disk, and the ``config`` parameter itself
must be the one the deployment was registered with.

``check_run_parameters`` refuses a run that tries, naming the key; it applies to flow runs of a
deployment (runs created through the API or the UI). ``d2a run`` / ``d2a stage`` on one's own
machine take any override, as before.

``data_root_lock`` holds an exclusive ``flock`` on ``<data root>/.d2a-run.lock`` for the duration of
a flow run, so two runs never interleave on the same artifacts (whatever deployment started them).
The flow runs a DAG hands to the GPU pool run inside its lock: a run whose root flow run holds the
lock is let through.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tasks.core.config import PipelineConfig, load_config, resolve_path

log = logging.getLogger("flows.guard")

# prefix -> why it may only come from the config file (checked before the allow-list, so even a
# config that lists one of these in server.allowed_overrides cannot open it to flow runs)
CODE_SELECTING = {
    "model": "selects the model and tokenizer code that is loaded (names, revisions, trust_remote_code, GGUF package)",
    "dask": "selects the Dask scheduler the pipeline sends pickled work to",
    "scrape": "selects what is fetched from where (sources, private addresses)",
    "demo_site": "selects a directory served over HTTP",
    "train.launcher": "selects the launcher command",
    "train.accelerate_config": "selects the launcher config file",
    "train.num_processes": "selects the process layout on the GPU nodes",
    "train.nnodes": "selects the node layout",
    "train.node_rank": "selects the node layout",
    "train.rdzv_endpoint": "selects where the training processes connect",
    "train.init_adapter": "is a path outside the data root",
    "pools": "selects where the stages run",
    "server": "is the allow-list itself",
    "notifications": "selects where notifications go",
    "timeouts": "is operations policy",
    "run_name": "names the run's artifacts and directories",
}


class ParameterRefused(ValueError):
    """A flow run's parameters try to change a setting that only the config file may set."""


def _covered(key: str, prefixes: dict[str, str] | list[str]) -> str | None:
    for p in prefixes:
        if p.endswith(".*"):
            p = p[:-2]
        if key == p or key.startswith(p + "."):
            return p
    return None


def check_overrides(cfg_path: str, overrides: list[str] | None) -> None:
    """Refuse any override not on ``server.allowed_overrides`` of the config on disk, naming the key."""
    if not overrides:
        return
    base = load_config(cfg_path)  # the file on disk, without the overrides
    allowed = base.server.allowed_overrides
    for item in overrides:
        key = ".".join(k.strip() for k in item.split("=", 1)[0].split(".") if k.strip())  # as apply_overrides reads it
        if (hit := _covered(key, CODE_SELECTING)) is not None:
            raise ParameterRefused(
                f"override {key!r} refused: {key} {CODE_SELECTING[hit]}; it comes only from the config file on "
                f"disk ({cfg_path}), never from a flow run's parameters")
        if _covered(key, allowed) is None:
            raise ParameterRefused(
                f"override {key!r} refused: not in server.allowed_overrides of {cfg_path} "
                f"(allowed: {', '.join(allowed)})")
        if key == "data_root":
            value = resolve_path(item.split("=", 1)[1].strip()).resolve()
            root = base.root.resolve()
            if value != root and root not in value.parents:
                raise ParameterRefused(f"override 'data_root' refused: {value} is outside the config's data root "
                                       f"{root}; a flow run may only choose a directory inside it")


def check_path_inside(cfg: PipelineConfig, name: str, value: str | None) -> None:
    """A path parameter (e.g. generate's ``run_dir``) must lie inside the data root."""
    if not value:
        return
    p, root = resolve_path(value).resolve(), cfg.root.resolve()
    if root not in p.parents:
        raise ParameterRefused(f"parameter {name!r} refused: {p} is outside the data root {root}")


def deployment_parameters() -> dict[str, Any] | None:
    """The parameters the current flow run's deployment was registered with (read from the API: the
    runtime's ``deployment.parameters`` are the run's own); None outside a deployment run."""
    try:
        from prefect.client.orchestration import get_client
        from prefect.runtime import deployment

        dep_id = deployment.id
    except Exception:  # noqa: BLE001 - not in a flow run
        return None
    if not dep_id:
        return None
    with get_client(sync_client=True) as c:
        return dict(c.read_deployment(dep_id).parameters or {})


def check_run_parameters(config: str, overrides: list[str] | None) -> None:
    """For a flow run of a deployment: the config must be the deployment's own, overrides must be allowed."""
    registered = deployment_parameters()
    if registered is None:
        return  # d2a run / d2a stage / a test calling the flow: the user's own machine and config
    want = registered.get("config")
    if want is not None and resolve_path(config).resolve() != resolve_path(want).resolve():
        raise ParameterRefused(f"parameter 'config' refused: {config!r} is not this deployment's config ({want!r}); "
                               "register a deployment for that config with `d2a deploy --config ...`")
    check_overrides(want or config, overrides)


# ------------------------------------------------------------------------------------- lock
class DataRootBusy(RuntimeError):
    """Another flow run holds the data root."""

    def __init__(self, holder: dict[str, Any], root: Path):
        self.holder = holder
        super().__init__(f"another run holds {root}: flow run {holder.get('flow_run_name') or holder.get('flow_run_id')} "
                         f"({holder.get('flow_name')}, pid {holder.get('pid')} on {holder.get('host')}, since "
                         f"{holder.get('since')}); one run per config and data root at a time")


def _me() -> dict[str, Any]:
    info: dict[str, Any] = {"pid": os.getpid(), "host": socket.gethostname(),
                            "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    with contextlib.suppress(Exception):
        from prefect.runtime import flow_run

        info.update({"flow_run_id": flow_run.id, "flow_run_name": flow_run.name, "flow_name": flow_run.flow_name,
                     "root_flow_run_id": flow_run.root_flow_run_id})
    return info


def read_holder(root: Path) -> dict[str, Any]:
    with contextlib.suppress(OSError, json.JSONDecodeError):
        return json.loads((root / ".d2a-run.json").read_text())
    return {}


@contextlib.contextmanager
def data_root_lock(cfg: PipelineConfig) -> Iterator[dict[str, Any]]:
    """Hold the data root for this flow run (raises DataRootBusy at once if another run holds it).

    Yields the holder record. A run inside the holder's flow-run tree (the train/evaluate runs a DAG
    dispatched to the GPU pool) is let through without taking the lock."""
    root = cfg.root
    root.mkdir(parents=True, exist_ok=True)
    me = _me()
    fd = os.open(root / ".d2a-run.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = read_holder(root)
            mine = me.get("root_flow_run_id")
            if mine and holder.get("flow_run_id") == mine and mine != me.get("flow_run_id"):
                log.info("data root %s is held by this run's root flow run %s", root, holder.get("flow_run_name"))
                yield holder
                return
            raise DataRootBusy(holder, root) from None
        tmp = root / f".d2a-run.json.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(me))
        os.replace(tmp, root / ".d2a-run.json")
        try:
            yield me
        finally:
            with contextlib.suppress(OSError):
                (root / ".d2a-run.json").unlink()
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
