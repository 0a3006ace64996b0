"""Permission and robustness holes of the fetcher (issue 15), each proven on real loopback servers:
one URL form for checks and requests, robots.txt outages, total deadlines, IPv6 forms that embed
private IPv4, our own decoded-size limit, and sources files that expand only declared variables."""

from __future__ import annotations

import gzip
import json
import posixpath
import socket
import threading
import time
import tracemalloc
import zlib
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest
from test_scrape import PERMISSION, fetch_log, make_cfg, page, write_site, write_sources

from scrapers.connection import AddressGuard
from scrapers.fetcher import Decision, FetcherSettings, FetchLog, HostAllowList, PoliteFetcher, _Abort
from scrapers.testsite import serve_site
from tasks.core.config import REPO_ROOT, ConfigError, load_sources
from tasks.scrape import run_scrape

UA = "data-to-adapter-test/1.0 (+mailto:test@example.org)"


def fetcher(tmp_path: Path, origin: str, **kw: Any) -> PoliteFetcher:
    s = FetcherSettings(user_agent=UA, min_delay_s=0.0, timeout_s=kw.pop("timeout_s", 2.0), max_retries=0,
                        allow_private_addresses=["127.0.0.1"], **kw)
    return PoliteFetcher(s, HostAllowList([origin + "/"]), FetchLog(tmp_path / "fetch.jsonl"))


def server_view(target: str) -> str:
    """The file a naive server serves for a request target: percent-decoded (%2F too), dots resolved."""
    return posixpath.normpath("/" + unquote(urlsplit(target).path).lstrip("/"))


# ------------------------------------------------------------------- 1. one URL form everywhere
def test_dot_segments_and_encodings_never_reach_a_disallowed_or_out_of_scope_path(tmp_path: Path) -> None:
    site_root = write_site(tmp_path / "site", {
        "robots.txt": "User-agent: *\nDisallow: /private/\nDisallow: /recipes/secret/\n",
        **{f"private/{n}.html": page(f"private {n}") for n in "abcdefgh"},
        "private/r.html": page("private r"), "private/r2.html": page("private r2"),
        "recipes/secret/s.html": page("secret"), "recipes/secret/s2.html": page("secret 2"),
        "recipes/tea.html": page("Tea"), "recipes/~soup.html": page("Soup"), "other/o.html": page("Out"),
    })
    redirects = {"/recipes/go.html": "/recipes/../private/r.html", "/recipes/go2.html": "/recipes/%2e%2e/private/r2.html"}

    def hook(method: str, path: str, headers: dict[str, str]) -> Any:
        return (302, {"Location": redirects[path]}, b"") if path in redirects else None

    with serve_site(site_root, hook=hook) as site:
        u = site.url
        links = [
            u + "/recipes/../private/a.html",                 # absolute: urljoin keeps the dots
            "%2e%2e/private/b.html", "%2E%2e/private/b.html",  # encoded dots
            "/recipes//../private/c.html",                     # empty segment then ..
            "./.././private/d.html",
            u.replace("http://", "HtTp://") + "/recipes/%2e%2E/private/e.html",  # mixed-case scheme and escapes
            "a%2F..%2F..%2Fprivate/f.html",                    # encoded slashes a server may decode
            "%2e%2e%2fprivate/g.html", "..%5Cprivate%5Ch.html",
            "x/../secret/s.html", "%73ecret/s2.html",          # robots-disallowed inside the scope
            "/recipes/../other/o.html",                        # out of scope
            "go.html", "go2.html",                             # redirects into /private/
            "tea.html", "./tea.html", "//" + u.split("//")[1] + "/recipes//tea.html", "sub/../tea.html",
            "%7Esoup.html",
        ]
        (site_root / "recipes" / "index.html").write_text(page("Recipes", links=links))
        src = write_sources(tmp_path / "s.yaml", [{"id": "r", "category": "recipes", "start_urls": [u + "/recipes/"],
                                                   "include": ["/recipes/"], "permission": PERMISSION}])
        m = run_scrape(make_cfg(tmp_path / "data", src))
        targets = [p for meth, p, _ in site.requests]
    seen = [server_view(t) for t in targets]
    bad = [t for t, v in zip(targets, seen) if v not in ("/robots.txt", "/.well-known/tdmrep.json")
           and (not v.startswith("/recipes") or v.startswith("/recipes/secret"))]
    assert bad == [], bad  # the server's own log: nothing disallowed or out of scope was ever served
    odd = [t for t in targets if ".." in t or "//" in t or "/./" in t or "%2e" in t.lower()]
    assert odd == [], odd  # and nothing it would have to resolve itself
    assert targets.count("/recipes/tea.html") == 1 and "/recipes/~soup.html" in targets
    log = {r["url"].split("/", 3)[3]: r for r in fetch_log(tmp_path / "data")}
    assert log["recipes/go.html"]["decision"] == log["recipes/go2.html"]["decision"] == "refused_robots"
    assert log["recipes/go2.html"]["final_url"].endswith("/private/r2.html")
    assert log["recipes/secret/s.html"]["decision"] == log["recipes/secret/s2.html"]["decision"] == "refused_robots"
    assert m["counts"]["pages"] == 3  # recipes/, tea, ~soup


def test_the_request_sent_is_the_url_that_was_checked(tmp_path: Path) -> None:
    f = fetcher(tmp_path, "http://127.0.0.1:9")
    assert f._prepare("u", "http://127.0.0.1:9/a/b%2Fc?q=%C3%A9", {}).path_url == "/a/b%2Fc?q=%C3%A9"
    for unchecked in ("http://127.0.0.1:9/a/%7e", "http://127.0.0.1:9/a/../b", "http://127.0.0.1:9/a b"):
        with pytest.raises(_Abort, match="differs from the checked URL"):
            f._prepare("u", unchecked, {})  # requests would send another target than the one checked


# ------------------------------------------------------------------ 2. robots.txt outages (RFC 9309)
@pytest.mark.parametrize("outage", [503, "timeout"])
def test_robots_503_between_scrapes_fetches_nothing_and_keeps_the_host_pages_stale(tmp_path: Path,
                                                                                   outage: int | str) -> None:
    site_root = write_site(tmp_path / "site", {
        "robots.txt": "User-agent: *\nAllow: /\n",
        "index.html": page("Home", links=["/a.html", "/b.html"]), "a.html": page("A"), "b.html": page("B"),
    })
    robots = {"status": None}

    def hook(method: str, path: str, headers: dict[str, str]) -> Any:
        if path == "/robots.txt" and robots["status"] == "timeout":
            time.sleep(1.0)  # past request_deadline_s
        elif path == "/robots.txt" and robots["status"]:
            return robots["status"], {"Content-Type": "text/plain"}, b"maintenance"
        return None

    with serve_site(site_root, hook=hook) as site:
        src = write_sources(tmp_path / "s.yaml", [{"id": "t", "category": "articles", "start_urls": [site.url + "/"],
                                                   "include": ["/"], "permission": PERMISSION}])
        cfg = make_cfg(tmp_path / "data", src, max_retries=0, request_deadline_s=0.5)
        first = run_scrape(cfg)
        assert first["counts"]["pages"] == 3
        robots["status"] = outage
        site.requests.clear()
        down = run_scrape(cfg)
        assert site.requests.paths() == ["/robots.txt"]  # nothing else was requested from the host
        robots["status"] = 404  # a 4xx robots.txt is "no rules": allow all
        site.requests.clear()
        back = run_scrape(cfg)
        assert "/a.html" in site.requests.paths()
    c = down["counts"]
    assert (c["pages"], c["gone"], c["stale_kept"], c["fetched"]) == (3, 0, 3, 0), c
    assert c["robots_unreachable_hosts"] == [site.url]
    assert ("503" if outage == 503 else "deadline") in down["robots_unreachable"][site.url]
    assert down["inputs"]["pages"] == first["inputs"]["pages"]  # same corpus: nothing downstream re-runs
    assert back["counts"]["robots_unreachable_hosts"] == [] and back["counts"]["gone"] == 0


def test_drift_check_fails_closed_on_a_one_sided_category(tmp_path: Path, caplog) -> None:
    from flows.rescrape import fail_closed
    from tasks.adapter.promote import record_corpus, retrain_decision

    a = write_site(tmp_path / "a", {"robots.txt": "", "index.html": page("A", links=["/1.html", "/2.html"]),
                                    "1.html": page("A1"), "2.html": page("A2")})
    b = write_site(tmp_path / "b", {"robots.txt": "", "index.html": page("B", links=["/1.html", "/2.html", "/3.html"]),
                                    "1.html": page("B1"), "2.html": page("B2"), "3.html": page("B3")})
    with serve_site(a) as sa, serve_site(b, host="127.0.0.2") as sb:
        both = [{"id": "arts", "category": "articles", "start_urls": [sa.url + "/"], "include": ["/"],
                 "permission": PERMISSION},
                {"id": "recs", "category": "recipes", "start_urls": [sb.url + "/"], "include": ["/"],
                 "permission": PERMISSION}]
        src = write_sources(tmp_path / "s.yaml", both)
        cfg = make_cfg(tmp_path / "data", src, max_retries=0, allow_private_addresses=["127.0.0.1", "127.0.0.2"])
        run_scrape(cfg)
        run_dir = tmp_path / "data" / "runs" / "r1"
        (run_dir / "adapter").mkdir(parents=True)
        (run_dir / "adapter" / "adapter_config.json").write_text("{}")
        record_corpus(run_dir, cfg.root)
        (cfg.root / "current.json").write_text(json.dumps({"run_id": "r1", "run_dir": str(run_dir),
                                                           "adapter": str(run_dir / "adapter")}))
        # the recipes source disappears from this scrape (a broken sources file, a lost host): its 4 pages
        # are missing, the articles are unchanged
        write_sources(tmp_path / "s.yaml", both[:1])
        run_scrape(cfg)
        today = retrain_decision(cfg)
        assert today.retrain and today.drift.gone == 4  # the plain drift counts a missing category as gone
        with caplog.at_level("WARNING", logger="flows.rescrape"):
            d = fail_closed(cfg, today)
        assert not d.retrain and (d.drift.gone, d.drift.fraction) == (0, 0.0), d
        assert "'recipes' is only in the baseline" in d.reason and "'recipes'" in caplog.text
        assert fail_closed(cfg, retrain_decision(cfg, force=True), force=True).retrain  # force still forces
        # the categories both sides have still decide: 1 of 3 article pages changed is past the 5% threshold
        (a / "2.html").write_text(page("A2", "new text " * 30))
        run_scrape(cfg)
        d = fail_closed(cfg, retrain_decision(cfg))
        assert d.retrain and (d.drift.changed, d.drift.gone) == (1, 0), d


# ------------------------------------------------------------------------ 3. total request deadline
class SlowLoris:
    """A raw socket server: robots.txt 404 at once; /headers trickles header bytes, /body trickles the body."""

    def __init__(self, every_s: float = 0.05, for_s: float = 10.0) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.every_s, self.for_s, self.stop = every_s, for_s, threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _trickle(self, conn: socket.socket, head: bytes, drip: bytes) -> None:
        conn.sendall(head)
        t_end = time.monotonic() + self.for_s
        while time.monotonic() < t_end and not self.stop.is_set():
            time.sleep(self.every_s)
            conn.sendall(drip)

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                req = b""
                while b"\r\n\r\n" not in req:
                    req += conn.recv(4096) or b"\r\n\r\n"
                path = req.split(b" ")[1]
                if path == b"/robots.txt":
                    conn.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                elif path == b"/headers":
                    self._trickle(conn, b"HTTP/1.1 200 OK\r\nX-Slow: ", b"a")
                else:
                    self._trickle(conn, b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nConnection: close\r\n\r\n"
                                        b"<html><body><p>", b"x")
            except OSError:
                pass

    def close(self) -> None:
        self.stop.set()
        self.sock.close()


def test_total_deadline_cuts_slow_loris_headers_and_bodies(tmp_path: Path) -> None:
    srv = SlowLoris()
    f = fetcher(tmp_path, srv.url, timeout_s=0.5, request_deadline_s=1.0)  # each read is in time
    try:
        for path in ("/headers", "/body"):
            t0 = time.monotonic()
            r = f.fetch(srv.url + path)
            took = time.monotonic() - t0
            assert r.decision == Decision.ERROR and r.reason.startswith("deadline"), (path, r.reason)
            assert took < 2.5, (path, took)
    finally:
        srv.close()
        f.fetch_log.close()
    rows = [json.loads(x) for x in (tmp_path / "fetch.jsonl").read_text().splitlines()]
    assert [(r["decision"], "scrape.request_deadline_s" in r["reason"]) for r in rows if r["kind"] == "page"] == \
        [("error", True), ("error", True)]


def test_dns_lookups_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    # the system resolver cannot be made slow from a test, so getaddrinfo is the one thing stood in for here
    real = socket.getaddrinfo
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: (time.sleep(3), real("127.0.0.1", 80))[1])
    g = AddressGuard([], dns_timeout_s=0.3)
    t0 = time.monotonic()
    with pytest.raises(socket.gaierror, match="timed out after 0.3s"):
        g.resolve("slow.example", 80)
    assert time.monotonic() - t0 < 1.0


def test_host_delay_counts_from_the_end_of_the_previous_body(tmp_path: Path) -> None:
    ends: list[float] = []

    def slow_body() -> Any:
        for _ in range(6):
            time.sleep(0.1)
            yield b"<p>" + b"z" * 100 + b"</p>"
        ends.append(time.monotonic())

    def hook(method: str, path: str, headers: dict[str, str]) -> Any:
        return (200, {"Content-Type": "text/html"}, slow_body()) if path == "/slow.html" else None

    root = write_site(tmp_path / "site", {"robots.txt": "", "index.html": page("H", links=["/slow.html", "/b.html"]),
                                          "b.html": page("B")})
    with serve_site(root, hook=hook) as site:
        src = write_sources(tmp_path / "s.yaml", [{"id": "t", "category": "articles", "start_urls": [site.url + "/"],
                                                   "include": ["/"], "permission": PERMISSION}])
        run_scrape(make_cfg(tmp_path / "data", src, min_delay_s=0.5))
        arrivals = {p: t for t, p in site.requests.timed()}
    assert arrivals["/b.html"] - ends[0] >= 0.45, arrivals["/b.html"] - ends[0]


# ------------------------------------------------------------- 4. IPv6 forms that embed IPv4
@pytest.mark.parametrize("address,embedded,form", [
    ("::ffff:10.0.0.1", None, None),                               # IPv4-mapped: the same endpoint as 10.0.0.1
    ("::7f00:1", "127.0.0.1", "IPv4-compatible"),
    ("2002:7f00:1::", "127.0.0.1", "6to4"),
    ("2002:a9fe:a9fe::1", "169.254.169.254", "6to4"),
    ("64:ff9b::a00:1", "10.0.0.1", "NAT64"),
    ("64:ff9b:1:a00:0:100::", "10.0.0.1", "NAT64 local-use"),
    ("2001:0:4136:e378:8000:63bf:80ff:fffe", "127.0.0.1", "Teredo client"),   # client XOR 0xffffffff
    ("2001:0:c0a8:101::1", "192.168.1.1", "Teredo server"),
])
def test_ipv6_addresses_embedding_non_global_ipv4_are_refused(address: str, embedded: str | None,
                                                               form: str | None) -> None:
    why = AddressGuard(["127.0.0.1"]).why_refused(address)
    assert why, address
    if form:
        assert f"embeds {embedded} ({form})" in why, why
    else:
        assert "10.0.0.1 is a private address" in why


def test_loopback_allowance_covers_the_address_not_its_translations() -> None:
    g = AddressGuard(["127.0.0.1"])
    assert g.why_refused("127.0.0.1") is None and g.why_refused("::ffff:127.0.0.1") is None
    assert g.why_refused("2002:7f00:1::") and g.why_refused("64:ff9b::7f00:1")
    assert g.why_refused("2002:808:808::1") is None  # 6to4 of a public address (8.8.8.8) is public


# ------------------------------------------------------------------ 5. our own decoded-size limit
@pytest.fixture(scope="module")
def bomb() -> bytes:
    """200 MB of zeros, gzipped twice: about 1 KB on the wire."""
    c = zlib.compressobj(9, zlib.DEFLATED, 31)
    zero = bytes(1 << 20)
    inner = b"".join(c.compress(zero) for _ in range(200)) + c.flush()
    return gzip.compress(inner, 9)


def test_stacked_gzip_bomb_is_cut_at_the_decoded_limit_in_bounded_memory(tmp_path: Path, bomb: bytes) -> None:
    html = page("Stacked", "gzip twice is legal. " * 50).encode()
    bodies = {
        "/bomb.html": ("gzip, gzip", bomb),
        "/twice.html": ("gzip, gzip", gzip.compress(gzip.compress(html))),
        "/deflate.html": ("deflate", zlib.compress(html)),
        "/rawdeflate.html": ("deflate", zlib.compress(html, wbits=-15)),  # raw deflate, as some servers send
        "/br.html": ("br", b"\x0b\x02\x80hello\x03"),
        "/four.html": ("gzip, gzip, gzip, gzip", gzip.compress(gzip.compress(gzip.compress(gzip.compress(html))))),
    }

    def hook(method: str, path: str, headers: dict[str, str]) -> Any:
        if path in bodies:
            enc, body = bodies[path]
            return 200, {"Content-Type": "text/html", "Content-Encoding": enc}, body
        return None

    root = write_site(tmp_path / "site", {"robots.txt": ""})
    with serve_site(root, hook=hook) as site:
        f = fetcher(tmp_path, site.url, max_bytes=1_000_000)
        tracemalloc.start()
        r = f.fetch(site.url + "/bomb.html")
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        res = {p: f.fetch(site.url + p) for p in bodies if p != "/bomb.html"}
    assert r.decision == Decision.REFUSED_SIZE and "decoded" in r.reason and "gzip, gzip" in r.reason, r.reason
    assert peak < 8 * 1_000_000, peak  # the limit plus a few 64 KiB pieces, not 200 MB
    for p in ("/twice.html", "/deflate.html", "/rawdeflate.html"):
        assert res[p].decision == Decision.FETCHED and res[p].body == html, (p, res[p].reason)
    assert res["/br.html"].decision == Decision.REFUSED_TYPE and "unsupported Content-Encoding" in res["/br.html"].reason
    assert res["/four.html"].decision == Decision.REFUSED_TYPE and "layers" in res["/four.html"].reason


def test_urllib3_without_known_decompression_cves_is_required() -> None:
    import tomllib

    import urllib3

    deps = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    assert any(d.replace(" ", "").startswith("urllib3>=2.6.3") for d in deps["dependencies"]), deps["dependencies"]
    assert tuple(int(x) for x in urllib3.__version__.split(".")[:3]) >= (2, 6, 3)


# ------------------------------------------------------------- 6. sources files: declared variables only
def test_sources_expand_only_declared_variables(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_supersecret")
    monkeypatch.setenv("DEMO_SITE", "http://127.0.0.1:1")
    p = tmp_path / "s.yaml"

    def write(text: str) -> Path:
        p.write_text(text)
        return p

    ok = load_sources(write("variables: [DEMO_SITE]\nsources:\n  - {id: a, category: recipes, "
                            "start_urls: ['${DEMO_SITE}/r/', '$DEMO_SITE/s/']}\n"))
    assert ok[0].start_urls == ["http://127.0.0.1:1/r/", "http://127.0.0.1:1/s/"]
    for text, name in [(("variables: [DEMO_SITE]\nsources:\n  - {id: a, category: recipes, "
                         "start_urls: ['${DEMO_SITE}/r/?t=${HF_TOKEN}']}\n"), "HF_TOKEN"),
                       ("sources:\n  - {id: a, category: recipes, start_urls: ['$DEMO_SITE/r/']}\n", "DEMO_SITE"),
                       ("sources:\n  - {id: a, category: recipes, kind: dataset, path: '$HOME/x.jsonl'}\n", "HOME")]:
        with pytest.raises(ConfigError) as e:
            load_sources(write(text))
        assert f"${{{name}}}" in str(e.value) and str(p) in str(e.value) and "supersecret" not in str(e.value)
    with pytest.raises(ConfigError, match="HF_TOKEN look"):
        load_sources(write("variables: [HF_TOKEN]\nsources: []\n"))


def test_an_undeclared_secret_never_reaches_a_site_or_the_fetch_log(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_supersecret")
    root = write_site(tmp_path / "site", {"robots.txt": "", "index.html": page("H")})
    with serve_site(root) as site:
        monkeypatch.setenv("SITE", site.url)
        src = tmp_path / "s.yaml"
        src.write_text("variables: [SITE]\nsources:\n  - id: a\n    category: articles\n"
                       "    start_urls: ['${SITE}/?key=${HF_TOKEN}']\n"
                       f"    permission: {json.dumps(PERMISSION)}\n")
        with pytest.raises(ConfigError, match="HF_TOKEN"):
            run_scrape(make_cfg(tmp_path / "data", src))
        assert len(site.requests) == 0
    assert not (tmp_path / "data").exists() or "supersecret" not in "".join(
        x.read_text(errors="replace") for x in (tmp_path / "data").rglob("*.jsonl"))
