"""A static website on loopback, for the demo and the tests.

``serve_site(root)`` serves a folder with the behaviour a polite crawler must handle: directory
index pages, ETag/Last-Modified with conditional requests (304), a sitemap whose ``http://SITE``
placeholder becomes the real origin, and a request log the tests read to prove that no disallowed
path was ever requested. Bodies are served byte-for-byte (a Latin-1 page stays Latin-1).

Run by hand:  python -m scrapers.testsite --root data/demo_site --port 8765
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import mimetypes
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from email.utils import formatdate, parsedate_to_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

if TYPE_CHECKING:
    from scrapers.schema import DemoSiteConfig

PLACEHOLDER = b"http://SITE"
_TYPES = {".html": "text/html", ".htm": "text/html", ".txt": "text/plain", ".xml": "application/xml",
          ".json": "application/json", ".css": "text/css", ".js": "text/javascript"}

# A hook may answer a request itself: return (status, headers, body) or None to serve the file.
Hook = Callable[[str, str, dict[str, str]], "tuple[int, dict[str, str], bytes | Iterable[bytes]] | None"]


@dataclass
class RequestLog:
    """Thread-safe list of (method, path, headers) for every request received, plus arrival times."""

    _items: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    _times: list[float] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def append(self, item: tuple[str, str, dict[str, str]]) -> None:
        with self._lock:
            self._items.append(item)
            self._times.append(time.monotonic())

    def __iter__(self) -> Iterator[tuple[str, str, dict[str, str]]]:
        with self._lock:
            return iter(list(self._items))

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def __getitem__(self, i: int) -> tuple[str, str, dict[str, str]]:
        with self._lock:
            return self._items[i]

    def paths(self) -> list[str]:
        return [p for _, p, _ in self]

    def timed(self) -> list[tuple[float, str]]:
        with self._lock:
            return [(t, p) for t, (_, p, _) in zip(self._times, self._items)]

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._times.clear()


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        # a crawler that aborts a body (size limit, redirect) resets the connection: not a server error
        import sys

        if not isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)):
            super().handle_error(request, client_address)


@dataclass
class ServedSite:
    url: str
    requests: RequestLog
    server: ThreadingHTTPServer

    @property
    def port(self) -> int:
        return self.server.server_address[1]


def _make_handler(root: Path, log: RequestLog, origin_ref: list[str], hook: Hook | None) -> type:
    class Handler(BaseHTTPRequestHandler):
        server_version = "demo-site/1.0"
        protocol_version = "HTTP/1.1"
        # headers and body go out in two writes; with Nagle on, keep-alive clients wait ~40 ms per response
        disable_nagle_algorithm = True

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - quiet server
            pass

        def _send(self, status: int, headers: dict[str, str], body: bytes | Iterable[bytes], head: bool) -> None:
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            streamed = not isinstance(body, (bytes, bytearray))
            if streamed:
                # an iterable body (a test's slow-drip or endless server): no length, close when done
                self.send_header("Connection", "close")
                self.close_connection = True
            elif status != 304:
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if head or status == 304:
                return
            if not streamed:
                self.wfile.write(body)
                return
            for chunk in body:
                self.wfile.write(chunk)
                self.wfile.flush()

        def _serve(self, head: bool) -> None:
            path = urlsplit(self.path).path
            log.append((self.command, self.path, {k: v for k, v in self.headers.items()}))
            if hook is not None:
                answer = hook(self.command, self.path, dict(self.headers.items()))
                if answer is not None:
                    status, headers, body = answer
                    self._send(status, headers, body, head)
                    return
            rel = unquote(path).lstrip("/")
            target = (root / rel).resolve()
            if root not in target.parents and target != root:
                self._send(404, {"Content-Type": "text/plain"}, b"not found\n", head)
                return
            if target.is_dir():
                if not path.endswith("/"):
                    self._send(301, {"Location": path + "/"}, b"", head)
                    return
                target = target / "index.html"
            if not target.is_file():
                self._send(404, {"Content-Type": "text/html"}, b"<html><body>not found</body></html>", head)
                return
            body = target.read_bytes()
            if target.name == "sitemap.xml" or target.suffix == ".xml":
                body = body.replace(PLACEHOLDER, origin_ref[0].encode())
            mtime = int(target.stat().st_mtime)
            etag = '"' + hashlib.sha256(body).hexdigest()[:20] + '"'
            headers = {
                "Content-Type": _TYPES.get(target.suffix.lower())
                or (mimetypes.guess_type(target.name)[0] or "application/octet-stream"),
                "ETag": etag,
                "Last-Modified": formatdate(mtime, usegmt=True),
            }
            inm = self.headers.get("If-None-Match")
            ims = self.headers.get("If-Modified-Since")
            not_modified = False
            if inm is not None:
                not_modified = etag in [t.strip() for t in inm.split(",")] or inm.strip() == "*"
            elif ims is not None:
                with contextlib.suppress(TypeError, ValueError):
                    not_modified = mtime <= parsedate_to_datetime(ims).timestamp()
            if not_modified:
                self._send(304, {"ETag": etag, "Last-Modified": headers["Last-Modified"]}, b"", head)
                return
            self._send(200, headers, body, head)

        def do_GET(self) -> None:  # noqa: N802 - http.server naming
            self._serve(head=False)

        def do_HEAD(self) -> None:  # noqa: N802
            self._serve(head=True)

    return Handler


@contextlib.contextmanager
def serve_site(root: str | os.PathLike[str], host: str = "127.0.0.1", port: int = 0,
               hook: Hook | None = None) -> Iterator[ServedSite]:
    """Serve ``root`` on ``host:port`` (0 = a free port) in a daemon thread for the block's length."""
    root = Path(root).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"site root not found: {root}")
    log = RequestLog()
    origin_ref = [""]
    try:
        server = _QuietServer((host, port), _make_handler(root, log, origin_ref, hook))
    except OSError as e:
        raise OSError(e.errno, f"cannot serve {root} on {host}:{port}: {e.strerror} "
                               "(another server running? port 0 picks a free port)") from e
    bound_host, bound_port = server.server_address[:2]
    origin_ref[0] = f"http://{bound_host}:{bound_port}"
    # a short poll interval: shutdown() waits up to one interval, and tests start many servers
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              name=f"site-{bound_port}", daemon=True)
    thread.start()
    try:
        yield ServedSite(url=origin_ref[0], requests=log, server=server)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@contextlib.contextmanager
def demo_site_env(ds: DemoSiteConfig) -> Iterator[ServedSite | None]:
    """Serve the bundled demo site when the config asks for it and expose its origin as $DEMO_SITE.

    Sources files refer to ``${DEMO_SITE}``; the variable is restored when the block ends.
    """
    if not ds.enabled:
        yield None
        return
    from scrapers.schema import resolve_path

    with serve_site(resolve_path(ds.root), host=ds.host, port=ds.port) as site:
        previous = os.environ.get("DEMO_SITE")
        os.environ["DEMO_SITE"] = site.url
        try:
            yield site
        finally:
            if previous is None:
                os.environ.pop("DEMO_SITE", None)
            else:
                os.environ["DEMO_SITE"] = previous


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Serve a static site folder on loopback.")
    ap.add_argument("--root", default="data/demo_site")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8765)
    args = ap.parse_args(argv)
    with serve_site(args.root, args.host, args.port) as site:
        print(f"serving {Path(args.root).resolve()} at {site.url}/ (Ctrl-C to stop)", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                time.sleep(3600)


if __name__ == "__main__":
    main()
