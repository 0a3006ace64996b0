"""``d2a server``: a real Prefect server, the project's deployments on their work pools, and one
process worker per pool, all on this machine: the one-command local default (``make server``).

Its children, each in its own process group:

  * ``prefect server start --host H --port P`` (API + UI). Its database is SQLite under
    ``$PREFECT_HOME`` (``data/prefect/prefect.db`` by default), or PostgreSQL when
    ``PREFECT_SERVER_DATABASE_CONNECTION_URL=postgresql+asyncpg://user:pass@host:5432/prefect`` is set;
  * ``d2a deploy --config ...``: creates the pools (process type), registers the deployments, the
    notification automations (flows/deployments.py, flows/notify.py), and exits;
  * ``prefect worker start --pool <pool> --type process`` for each pool of the configs (d2a-cpu,
    d2a-gpu): each flow run is a subprocess of its pool's worker; training a further subprocess.

Security: the server listens on loopback unless ``--host`` says otherwise, and then only with API
authentication configured (``PREFECT_SERVER_API_AUTH_STRING=user:password`` in the environment or
``.env``; clients and workers send it as ``PREFECT_API_AUTH_STRING``). CSRF protection is on and CORS
allows only the UI's own origin, on loopback too.

Ctrl-C or SIGTERM stops the workers first (their flow runs are stopped; a stopped train stage kills
its training process group), then the server; anything of the tree still alive after that is killed,
so nothing outlives ``d2a server``.

The helpers (``free_port``, ``server_env``, ``start_server``, ``wait_healthy``, ``stop_process``) are
what the tests use to start their own server on a free port.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import IO, Any

from tasks.core.config import REPO_ROOT  # noqa: E402

LOOPBACK = ("localhost",)


class InsecureServer(RuntimeError):
    """A non-loopback bind without API authentication."""


def is_loopback(host: str) -> bool:
    if host in LOOPBACK:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_in_use(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def server_env(host: str, port: int, home: str | os.PathLike[str] | None = None,
               base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for the server, the workers and any client: everything points at host:port.

    Refuses (InsecureServer) a non-loopback host unless PREFECT_SERVER_API_AUTH_STRING is set; turns
    CSRF protection on and limits CORS to the UI's origin (``PREFECT_UI_URL`` if set, else http://host:port)."""
    env = dict(os.environ if base is None else base)
    auth = env.get("PREFECT_SERVER_API_AUTH_STRING")
    if not is_loopback(host) and not auth:
        raise InsecureServer(
            f"refusing to listen on {host}: beyond loopback the API needs authentication. Set "
            "PREFECT_SERVER_API_AUTH_STRING=user:password (environment or .env; workers and clients then set "
            "PREFECT_API_AUTH_STRING to the same), or keep --host 127.0.0.1")
    if auth and ":" not in auth:
        raise InsecureServer("PREFECT_SERVER_API_AUTH_STRING must look like user:password")
    public = host if is_loopback(host) or host not in ("0.0.0.0", "::") else socket.getfqdn()
    ui = env.get("PREFECT_UI_URL") or f"http://{public}:{port}"
    client_host = "127.0.0.1" if host in ("0.0.0.0", "::") else host  # this machine's own clients and workers
    env.update({
        "PREFECT_HOME": str(home or env.get("PREFECT_HOME") or REPO_ROOT / "data" / "prefect"),
        "PREFECT_API_URL": f"http://{client_host}:{port}/api",
        "PREFECT_UI_API_URL": f"{ui}/api",   # what the browser calls: must be this server, not the default port
        "PREFECT_UI_URL": ui,                # links printed in logs
        "PREFECT_SERVER_API_HOST": host,
        "PREFECT_SERVER_API_PORT": str(port),
        "PREFECT_SERVER_CSRF_PROTECTION_ENABLED": "true",
        "PREFECT_SERVER_CORS_ALLOWED_ORIGINS": ui,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "PREFECT_LOGGING_EXTRA_LOGGERS": env.get("PREFECT_LOGGING_EXTRA_LOGGERS", "tasks,scrapers,flows"),
        "TOKENIZERS_PARALLELISM": env.get("TOKENIZERS_PARALLELISM", "false"),
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])]),
    })
    if auth:
        env["PREFECT_API_AUTH_STRING"] = auth
    return env


def start_server(host: str, port: int, env: dict[str, str], log: IO[Any] | None = None) -> subprocess.Popen:
    """``prefect server start`` in its own process group (so stopping it stops all of it)."""
    if port_in_use(host, port):
        raise OSError(f"{host}:{port} is already in use (another Prefect server?); choose another with --port")
    Path(env["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)
    return subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", str(port)],
                            env=env, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT if log else None,
                            stdin=subprocess.DEVNULL, start_new_session=True)


def deploy(configs: list[str], env: dict[str, str], log: IO[Any] | None = None, with_schedule: bool = True,
           timeout: float = 300) -> None:
    """``d2a deploy`` for each config against env's API (a subprocess: the settings are env's)."""
    cmd = [sys.executable, "-m", "flows.cli", "deploy"]
    for c in configs:
        cmd += ["--config", c]
    if not with_schedule:
        cmd.append("--no-schedule")
    r = subprocess.run(cmd, env=env, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT if log else None,
                       stdin=subprocess.DEVNULL, timeout=timeout)
    if r.returncode:
        raise RuntimeError(f"d2a deploy exited with status {r.returncode}")


def pools_of(configs: list[str]) -> list[str]:
    from tasks.core.config import load_config

    return list(dict.fromkeys(p for c in configs for p in (load_config(c).pools.cpu, load_config(c).pools.gpu)))


def wait_healthy(api_url: str, timeout: float = 120, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the Prefect server exited with status {proc.returncode} before it was healthy")
        try:
            with urllib.request.urlopen(f"{api_url}/health", timeout=5) as r:
                if r.status == 200:
                    return
        except Exception as e:  # noqa: BLE001 - not up yet
            last = e
        time.sleep(0.5)
    raise TimeoutError(f"no healthy Prefect API at {api_url} after {timeout:.0f}s ({last})")


def _tree(pid: int) -> list[Any]:
    try:
        import psutil

        p = psutil.Process(pid)
        return [p, *p.children(recursive=True)]
    except Exception:  # noqa: BLE001 - psutil missing or process gone
        return []


def stop_process(proc: subprocess.Popen, timeout: float = 30, sig: int = signal.SIGTERM) -> None:
    """Signal the child's process group, wait, then SIGKILL the group and any descendant that
    moved to a group of its own (a flow run, a training worker)."""
    if proc.poll() is not None:
        return
    tree = _tree(proc.pid)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    # descendants in their own sessions get a grace period, then are killed
    deadline = time.monotonic() + 10
    for p in tree[1:]:
        with contextlib.suppress(Exception):
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
    for p in tree[1:]:
        with contextlib.suppress(Exception):
            if p.is_running():
                p.kill()


def run_server(host: str = "127.0.0.1", port: int = 4200, configs: list[str] | None = None,
               limit: int | None = None, with_schedule: bool = True) -> int:
    """The ``d2a server`` command: blocks until Ctrl-C / SIGTERM or a child dies."""
    from flows.pools import start_worker
    from tasks.core.config import load_config

    configs = configs or ["configs/demo.yaml"]
    for c in configs:  # a broken config fails here, naming the key, before anything starts
        load_config(c)
    try:
        env = server_env(host, port)
    except InsecureServer as e:
        print(f"d2a server: {e}", file=sys.stderr)
        return 2
    db = env.get("PREFECT_SERVER_DATABASE_CONNECTION_URL")
    where = "PostgreSQL/other (PREFECT_SERVER_DATABASE_CONNECTION_URL)" if db else \
        f"SQLite in {Path(env['PREFECT_HOME']) / 'prefect.db'}"
    print(f"starting Prefect server on http://{host}:{port} (database: {where}; "
          f"{'API authentication on' if env.get('PREFECT_API_AUTH_STRING') else 'loopback only, no authentication'})",
          flush=True)

    def _term(signum, _frame):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, _term)
    server = None
    workers: dict[str, subprocess.Popen] = {}
    try:
        server = start_server(host, port, env)
        wait_healthy(env["PREFECT_API_URL"], timeout=180, proc=server)
        deploy(configs, env, with_schedule=with_schedule)
        for pool in pools_of(configs):
            workers[pool] = start_worker(pool, env, mark=pool, limit=limit)
        print(f"\nPrefect UI: {env['PREFECT_UI_URL']}   (API {env['PREFECT_API_URL']})\n"
              f"deployments of {', '.join(configs)} registered; workers polling {', '.join(workers)}; "
              "Ctrl-C stops everything\n", flush=True)
        while True:
            for name, p in (("server", server), *((f"worker {k}", w) for k, w in workers.items())):
                if p.poll() is not None:
                    print(f"the {name} process exited with status {p.returncode}; stopping", file=sys.stderr)
                    return 1
            time.sleep(1)
    except KeyboardInterrupt:
        print("\nstopping: the workers and their flow runs, then the server ...", flush=True)
        return 0
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not interrupt the clean-up
        for w in workers.values():
            stop_process(w, timeout=60)
        if server is not None:
            stop_process(server, timeout=30)
        signal.signal(signal.SIGTERM, old)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        print("stopped", flush=True)
