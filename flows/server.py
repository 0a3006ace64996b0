"""``d2a server``: a real Prefect server on loopback plus the process that serves the deployments.

Two child processes, each in its own process group:

  * ``prefect server start --host 127.0.0.1 --port P`` (API + UI). Its database is SQLite under
    ``$PREFECT_HOME`` (``data/prefect/prefect.db`` by default), or PostgreSQL when
    ``PREFECT_SERVER_DATABASE_CONNECTION_URL=postgresql+asyncpg://user:pass@host:5432/prefect`` is set;
  * ``python -m flows.server serve ...``: registers the deployments (flows/deployments.py) and runs
    their flow runs (each in its own subprocess; training is a further supervised subprocess).

Ctrl-C or SIGTERM stops the serve process first (Prefect's runner cancels the flow runs in flight,
and a cancelled train stage kills its training process group), then the server; anything of the
tree still alive after that is killed, so nothing outlives ``d2a server``.

The helpers (``free_port``, ``start_server``, ``wait_healthy``, ``stop_process``) are what the tests
use to start their own server on a free port.
"""

from __future__ import annotations

import contextlib
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
    """Environment for the server, the serve process and any client: everything points at host:port."""
    env = dict(os.environ if base is None else base)
    url = f"http://{host}:{port}"
    env.update({
        "PREFECT_HOME": str(home or env.get("PREFECT_HOME") or REPO_ROOT / "data" / "prefect"),
        "PREFECT_API_URL": f"{url}/api",
        "PREFECT_UI_API_URL": f"{url}/api",  # what the browser calls: must be this server, not the default port
        "PREFECT_UI_URL": url,               # links printed in logs
        "PREFECT_SERVER_API_HOST": host,
        "PREFECT_SERVER_API_PORT": str(port),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "PREFECT_LOGGING_EXTRA_LOGGERS": env.get("PREFECT_LOGGING_EXTRA_LOGGERS", "tasks,scrapers,flows"),
        "TOKENIZERS_PARALLELISM": env.get("TOKENIZERS_PARALLELISM", "false"),
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])]),
    })
    return env


def start_server(host: str, port: int, env: dict[str, str], log: IO[Any] | None = None) -> subprocess.Popen:
    """``prefect server start`` in its own process group (so stopping it stops all of it)."""
    if port_in_use(host, port):
        raise OSError(f"{host}:{port} is already in use (another Prefect server?); choose another with --port")
    Path(env["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)
    return subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", str(port)],
                            env=env, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT if log else None,
                            stdin=subprocess.DEVNULL, start_new_session=True)


def start_serve(configs: list[str], env: dict[str, str], log: IO[Any] | None = None, limit: int | None = None,
                with_schedule: bool = True) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "flows.server", "serve"]
    for c in configs:
        cmd += ["--config", c]
    if limit:
        cmd += ["--limit", str(limit)]
    if not with_schedule:
        cmd.append("--no-schedule")
    return subprocess.Popen(cmd, env=env, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT if log else None,
                            stdin=subprocess.DEVNULL, start_new_session=True)


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
    configs = configs or ["configs/demo.yaml"]
    from tasks.core.config import load_config

    for c in configs:  # a broken config fails here, naming the key, before anything starts
        load_config(c)
    env = server_env(host, port)
    db = env.get("PREFECT_SERVER_DATABASE_CONNECTION_URL")
    where = "PostgreSQL/other (PREFECT_SERVER_DATABASE_CONNECTION_URL)" if db else \
        f"SQLite in {Path(env['PREFECT_HOME']) / 'prefect.db'}"
    print(f"starting Prefect server on http://{host}:{port} (database: {where})", flush=True)

    def _term(signum, _frame):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, _term)
    server = serve = None
    try:
        server = start_server(host, port, env)
        wait_healthy(env["PREFECT_API_URL"], timeout=180, proc=server)
        serve = start_serve(configs, env, limit=limit, with_schedule=with_schedule)
        print(f"\nPrefect UI: http://{host}:{port}   (API {env['PREFECT_API_URL']})\n"
              f"serving the deployments of {', '.join(configs)}; Ctrl-C stops everything\n", flush=True)
        while True:
            for name, p in (("server", server), ("serve", serve)):
                if p.poll() is not None:
                    print(f"the {name} process exited with status {p.returncode}; stopping", file=sys.stderr)
                    return 1
            time.sleep(1)
    except KeyboardInterrupt:
        print("\nstopping: cancelling flow runs in flight, then the server ...", flush=True)
        return 0
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not interrupt the clean-up
        if serve is not None:
            stop_process(serve, timeout=90)   # the runner cancels its runs (30 s grace each) before exiting
        if server is not None:
            stop_process(server, timeout=30)
        signal.signal(signal.SIGTERM, old)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        print("stopped", flush=True)


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="flows.server")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="serve the deployments against $PREFECT_API_URL (blocks)")
    s.add_argument("--config", action="append")
    s.add_argument("--limit", type=int)
    s.add_argument("--no-schedule", action="store_true")
    a = ap.parse_args(argv)
    from flows.deployments import serve_deployments

    serve_deployments(a.config or ["configs/demo.yaml"], a.limit, not a.no_schedule)
    return 0


if __name__ == "__main__":
    sys.exit(main())
