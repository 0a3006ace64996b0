"""Scrape stage against real loopback servers: politeness, allow-list, opt-outs, resume, re-scrape."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import yaml

from scrapers.connection import AddressGuard
from scrapers.crawl import SourceRefused, check_sources, require_permission
from scrapers.schema import REPO_ROOT as REPO
from scrapers.testsite import serve_site
from tasks.core.config import CATEGORIES, PipelineConfig, SourceConfig
from tasks.scrape import run_scrape

DEMO_ROOT = REPO / "data" / "demo_site"
PERMISSION = {"evidence_url": "https://example.org/terms", "license": "CC-BY-4.0", "note": "test fixture"}


def make_cfg(root: Path, sources_file: Path, **scrape: Any) -> PipelineConfig:
    return PipelineConfig.model_validate({
        "data_root": str(root),
        "scrape": {"sources": str(sources_file), "min_delay_s": 0.0, "timeout_s": 5.0, "max_retries": 1,
                   "allow_private_addresses": ["127.0.0.1"], **scrape},
        "model": {"name": "unused"},
    })


def write_sources(path: Path, sources: list[dict[str, Any]]) -> Path:
    path.write_text(yaml.safe_dump({"sources": sources}), encoding="utf-8")
    return path


def write_site(root: Path, files: dict[str, str | bytes]) -> Path:
    for rel, content in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    return root


def page(title: str, body: str = "", links: list[str] = (), head: str = "") -> str:
    a = "".join(f'<li><a href="{h}">{h}</a></li>' for h in links)
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title>{head}</head>"
            f"<body><main><h1>{title}</h1><p>{body or 'Some text about food and health. ' * 5}</p>"
            f"<ul>{a}</ul></main></body></html>")


def fetch_log(root: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (root / "raw" / "fetch_log.jsonl").read_text().splitlines()]


def page_gets(site: Any) -> list[str]:
    return [p for m, p, _ in site.requests if m == "GET" and p not in ("/robots.txt", "/.well-known/tdmrep.json")]


# ----------------------------------------------------------------------------- demo site
@pytest.fixture(scope="module")
def demo_crawl(tmp_path_factory: pytest.TempPathFactory, monkeypatch_module: pytest.MonkeyPatch) -> dict[str, Any]:
    """Crawl the bundled demo site twice (the second run must be conditional) and keep both results."""
    if not (DEMO_ROOT / "robots.txt").is_file():
        pytest.fail(f"{DEMO_ROOT} is tracked in git and missing from this checkout", pytrace=False)
    root = tmp_path_factory.mktemp("demo")
    with serve_site(DEMO_ROOT) as site:
        monkeypatch_module.setenv("DEMO_SITE", site.url)
        cfg = make_cfg(root, REPO / "configs" / "sources" / "demo.yaml")
        first = run_scrape(cfg)
        first_requests = list(site.requests)
        first_log = fetch_log(root)
        site.requests.clear()
        second = run_scrape(cfg)
        return {"root": root, "first": first, "second": second, "first_requests": first_requests,
                "second_requests": list(site.requests), "first_log": first_log, "second_log": fetch_log(root)}


@pytest.fixture(scope="module")
def monkeypatch_module() -> Any:
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_demo_no_disallowed_request_and_every_category(demo_crawl: dict[str, Any]) -> None:
    paths = [p for _, p, _ in demo_crawl["first_requests"] + demo_crawl["second_requests"]]
    bad = [p for p in paths if (p.startswith("/private/") or p.startswith("/drafts/"))
           and p != "/drafts/public-preview.html"]
    assert bad == [], f"disallowed paths were requested: {bad}"
    assert "/drafts/public-preview.html" in paths  # allowed explicitly inside a disallowed folder
    root = demo_crawl["root"]
    for cat in CATEGORIES:
        table = pq.read_table(root / "raw" / cat / "pages.parquet")
        assert table.num_rows > 0, cat
        for body in table.column("body").to_pylist():
            assert b"DISALLOWED-CONTENT-MARKER" not in body
    assert all(ua.get("User-Agent", "").startswith("data-to-adapter") for _, _, ua in demo_crawl["first_requests"])


def test_demo_fetch_log_records_refusals(demo_crawl: dict[str, Any]) -> None:
    log = demo_crawl["first_log"]
    by_url = {r["url"].split("/", 3)[3]: r for r in log}
    assert by_url["articles/meal-timing.html"]["decision"] == "refused_optout"
    robots = {u for u, r in by_url.items() if r["decision"] == "refused_robots"}
    assert {"private/internal-pricing.html", "drafts/spring-menu-plan.html"} <= robots
    counts = demo_crawl["first"]["counts"]
    assert counts["refused"]["refused_robots"] >= 4 and counts["refused"]["refused_optout"] >= 1
    assert counts["new"] == counts["pages"] and counts["gone"] == 0


def test_demo_rescrape_is_conditional_and_unchanged(demo_crawl: dict[str, Any]) -> None:
    first, second = demo_crawl["first"], demo_crawl["second"]
    stored = {r["url"].split("/", 3)[3] for r in demo_crawl["first_log"] if r["decision"] == "fetched"}
    page_requests = [(p, h) for m, p, h in demo_crawl["second_requests"]
                     if m == "GET" and p.endswith(".html") and p.lstrip("/") in stored]
    assert page_requests and all("If-None-Match" in h for _, h in page_requests), page_requests
    c = second["counts"]
    assert c["not_modified"] == c["pages"] == first["counts"]["pages"]
    assert (c["new"], c["changed"], c["gone"], c["unchanged"]) == (0, 0, 0, c["pages"])
    assert second["inputs"] == first["inputs"]  # downstream stages will skip
    # the 304 reused the stored body in the published raw output
    t = pq.read_table(demo_crawl["root"] / "raw" / "recipes" / "pages.parquet")
    assert all(len(b) > 0 for b in t.column("body").to_pylist())


# ------------------------------------------------------------------------- small fixture sites
def test_same_host_requests_spaced_by_crawl_delay(tmp_path: Path) -> None:
    site_root = write_site(tmp_path / "site", {
        "robots.txt": "User-agent: *\nCrawl-delay: 0.2\n",
        "index.html": page("Home", links=["/a.html", "/b.html", "/c.html"]),
        "a.html": page("A"), "b.html": page("B"), "c.html": page("C"),
    })
    with serve_site(site_root) as site:
        src = write_sources(tmp_path / "s.yaml", [{"id": "t", "category": "articles", "start_urls": [site.url + "/"],
                                                   "include": ["/"], "permission": PERMISSION}])
        m = run_scrape(make_cfg(tmp_path / "data", src))
        times = [t for t, _ in site.requests.timed()]
    assert m["counts"]["pages"] == 4
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert len(times) >= 5 and min(gaps) >= 0.2 - 0.01, gaps


def test_redirects_off_allowlist_or_to_private_address_refused_before_connecting(tmp_path: Path) -> None:
    other_root = write_site(tmp_path / "other", {"x.html": page("X"), "robots.txt": ""})
    with serve_site(other_root) as other, serve_site(other_root, host="127.0.0.2") as private:
        redirects = {"/go-other.html": other.url + "/x.html", "/go-private.html": private.url + "/x.html",
                     "/loop1.html": "/loop2.html", "/loop2.html": "/loop1.html",
                     "/go-ftp.html": "ftp://127.0.0.1/x"}

        def hook(method: str, path: str, headers: dict[str, str]) -> Any:
            return (302, {"Location": redirects[path]}, b"") if path in redirects else None

        main_root = write_site(tmp_path / "main", {
            "robots.txt": "User-agent: *\nAllow: /\n",
            "index.html": page("Home", links=[*redirects, "/ok.html"]),
            "ok.html": page("OK"),
        })
        with serve_site(main_root, hook=hook) as site:
            src = write_sources(tmp_path / "s.yaml", [
                {"id": "main", "category": "articles", "start_urls": [site.url + "/"], "include": ["/"],
                 "permission": PERMISSION},
                # 127.0.0.2 is allow-listed as a host, but its address is not in allow_private_addresses
                {"id": "priv", "category": "articles", "start_urls": [private.url + "/nothing/"],
                 "include": ["/nothing/"], "permission": PERMISSION},
            ])
            m = run_scrape(make_cfg(tmp_path / "data", src))
        assert len(other.requests) == 0 and len(private.requests) == 0
    log = {r["url"].rsplit("/", 1)[-1]: r for r in fetch_log(tmp_path / "data")}
    assert log["go-other.html"]["decision"] == "refused_allowlist"
    assert log["go-private.html"]["decision"] == "refused_address"
    assert log["go-ftp.html"]["decision"] == "refused_allowlist"
    assert log["loop1.html"]["decision"] == "error" and "loop" in log["loop1.html"]["reason"]
    assert log["ok.html"]["decision"] == "fetched"
    assert m["counts"]["pages"] == 2  # home + ok


def test_address_guard_classes() -> None:
    g = AddressGuard(["127.0.0.1"])
    assert g.why_refused("127.0.0.1") is None
    for ip in ("127.0.0.2", "10.1.2.3", "192.168.1.1", "172.16.0.1", "169.254.169.254", "100.64.0.1", "224.0.0.1",
               "::1", "fe80::1", "fd00:ec2::254", "::ffff:10.0.0.1", "0.0.0.0"):
        assert g.why_refused(ip), ip
    assert g.why_refused("93.184.216.34") is None


def test_source_without_permission_is_refused(tmp_path: Path) -> None:
    s = SourceConfig(id="no-evidence", category="recipes", start_urls=["http://127.0.0.1:1/"])
    with pytest.raises(SourceRefused, match="no-evidence"):
        require_permission(s)
    ok, refused = check_sources([s])
    assert ok == [] and refused[0]["id"] == "no-evidence"
    src = write_sources(tmp_path / "s.yaml", [{"id": "no-evidence", "category": "recipes",
                                              "start_urls": ["http://127.0.0.1:1/"]}])
    with pytest.raises(ValueError, match="no-evidence"):
        run_scrape(make_cfg(tmp_path / "data", src))


def test_optouts_types_sizes_and_robots_failures(tmp_path: Path) -> None:
    def hook(method: str, path: str, headers: dict[str, str]) -> Any:
        if path == "/xrobots.html":
            return 200, {"Content-Type": "text/html", "X-Robots-Tag": "noindex"}, page("X").encode()
        if path == "/tdm-header.html":
            return 200, {"Content-Type": "text/html", "tdm-reservation": "1"}, page("T").encode()
        if path == "/doc.pdf":
            return 200, {"Content-Type": "application/pdf"}, b"%PDF-1.4 binary"
        if path == "/big.html":
            return 200, {"Content-Type": "text/html"}, page("Big", "x" * 50_000).encode()
        return None

    root = write_site(tmp_path / "site", {
        "robots.txt": "User-agent: *\nDisallow: /secret\n",
        ".well-known/tdmrep.json": json.dumps([{"location": "/reserved/*", "tdm-reservation": 1,
                                                "tdm-policy": "https://example.org/policy.json"}]),
        "index.html": page("Home", links=["/xrobots.html", "/tdm-header.html", "/doc.pdf", "/big.html",
                                          "/reserved/a.html", "/secret.html", "/meta-tdm.html", "/ok.html"]),
        "meta-tdm.html": page("M", head='<meta name="tdm-reservation" content="1">'),
        "reserved/a.html": page("R"), "secret.html": page("S"), "ok.html": page("OK"),
    })
    with serve_site(root, hook=hook) as site:
        src = write_sources(tmp_path / "s.yaml", [{"id": "t", "category": "articles", "start_urls": [site.url + "/"],
                                                   "include": ["/"], "permission": PERMISSION}])
        m = run_scrape(make_cfg(tmp_path / "data", src, max_bytes=20_000))
        gets = page_gets(site)
    log = {r["url"].split("/", 3)[3]: r["decision"] for r in fetch_log(tmp_path / "data")}
    assert log["xrobots.html"] == log["tdm-header.html"] == log["meta-tdm.html"] == "refused_optout"
    assert log["reserved/a.html"] == "refused_optout" and "/reserved/a.html" not in gets  # refused before fetching
    assert log["secret.html"] == "refused_robots" and "/secret.html" not in gets
    assert log["doc.pdf"] == "refused_type" and log["big.html"] == "refused_size"
    assert m["counts"]["pages"] == 2


@pytest.mark.parametrize("status,body,expect_pages", [(500, b"down", 0), (404, b"nope", 1),
                                                     (200, bytes(range(256)) * 4000, 1)])
def test_robots_unreachable_disallows_all_missing_or_garbage_allows_all(tmp_path: Path, status: int, body: bytes,
                                                                         expect_pages: int) -> None:
    def hook(method: str, path: str, headers: dict[str, str]) -> Any:
        return (status, {"Content-Type": "text/plain"}, body) if path == "/robots.txt" else None

    root = write_site(tmp_path / "site", {"index.html": page("Home")})
    with serve_site(root, hook=hook) as site:
        src = write_sources(tmp_path / "s.yaml", [{"id": "t", "category": "articles", "start_urls": [site.url + "/"],
                                                   "include": ["/"], "permission": PERMISSION}])
        m = run_scrape(make_cfg(tmp_path / "data", src, max_retries=0))
        assert len(page_gets(site)) == expect_pages
    assert m["counts"]["pages"] == expect_pages


def test_retry_after_is_honored(tmp_path: Path) -> None:
    calls: list[str] = []

    def hook(method: str, path: str, headers: dict[str, str]) -> Any:
        if path == "/busy.html":
            calls.append(path)
            if len(calls) == 1:
                return 429, {"Retry-After": "1", "Content-Type": "text/plain"}, b"slow down"
        return None

    root = write_site(tmp_path / "site", {"index.html": page("Home", links=["/busy.html"]), "busy.html": page("B")})
    with serve_site(root, hook=hook) as site:
        src = write_sources(tmp_path / "s.yaml", [{"id": "t", "category": "articles", "start_urls": [site.url + "/"],
                                                   "include": ["/"], "permission": PERMISSION}])
        m = run_scrape(make_cfg(tmp_path / "data", src))
        busy = [t for t, p in site.requests.timed() if p == "/busy.html"]
    assert len(busy) == 2 and busy[1] - busy[0] >= 1.0
    assert m["counts"]["pages"] == 2


def test_killed_crawl_resumes_without_refetching(tmp_path: Path) -> None:
    names = [f"p{i}.html" for i in range(8)]
    root = write_site(tmp_path / "site", {"index.html": page("Home", links=[f"/{n}" for n in names]),
                                          **{n: page(n) for n in names}})
    stop = threading.Event()

    def hook(method: str, path: str, headers: dict[str, str]) -> Any:
        if path.startswith("/p") and sum(p.startswith("/p") for p in site.requests.paths()) >= 3:
            stop.set()  # the "kill": the crawl stops after the third page
        return None

    with serve_site(root, hook=hook) as site:
        src = write_sources(tmp_path / "s.yaml", [{"id": "t", "category": "articles", "start_urls": [site.url + "/"],
                                                   "include": ["/"], "permission": PERMISSION}])
        cfg = make_cfg(tmp_path / "data", src)
        with pytest.raises(InterruptedError):
            run_scrape(cfg, stop=stop)
        assert not (tmp_path / "data" / "raw" / "manifest.json").exists()  # nothing half-published
        before = page_gets(site)
        m = run_scrape(cfg)
        gets = page_gets(site)
    assert 3 <= len(before) < 9
    assert sorted(gets) == sorted(set(gets)), "a page was fetched twice across the kill"
    assert m["counts"]["pages"] == 9 and m["resumed"] is True


def test_hosts_crawled_in_parallel_each_polite(tmp_path: Path) -> None:
    import contextlib
    import time

    site_root = write_site(tmp_path / "site", {
        "robots.txt": "User-agent: *\nCrawl-delay: 0.2\n",
        "index.html": page("Home", links=["/a.html", "/b.html", "/c.html"]),
        "a.html": page("A"), "b.html": page("B"), "c.html": page("C"),
    })
    with contextlib.ExitStack() as stack:
        sites = [stack.enter_context(serve_site(site_root, host=f"127.0.0.{i}")) for i in (1, 2, 3)]
        src = write_sources(tmp_path / "s.yaml", [
            {"id": f"h{i}", "category": "articles", "start_urls": [s.url + "/"], "include": ["/"],
             "permission": PERMISSION} for i, s in enumerate(sites)])
        t0 = time.monotonic()
        m = run_scrape(make_cfg(tmp_path / "data", src, allow_private_addresses=["127.0.0.0/29"]))
        wall = time.monotonic() - t0
        for s in sites:
            times = [t for t, _ in s.requests.timed()]
            assert len(times) >= 5 and min(b - a for a, b in zip(times, times[1:])) >= 0.19
    assert m["counts"]["pages"] == 12
    # each host needs >= 5 x 0.2 s; one after another that would be >= 3 s
    assert wall < 2.5, wall


def test_rescrape_reports_new_changed_unchanged_gone_and_keeps_pages_on_transient_errors(tmp_path: Path) -> None:
    site_root = write_site(tmp_path / "site", {
        "robots.txt": "User-agent: *\nAllow: /\n",
        "index.html": page("Home", links=["/a.html", "/b.html", "/c.html", "/e.html", "/slow.html"]),
        "a.html": page("A"), "b.html": page("B"), "c.html": page("C"), "e.html": page("E"), "slow.html": page("S"),
    })
    second = threading.Event()

    def hook(method: str, path: str, headers: dict[str, str]) -> Any:
        if second.is_set() and path == "/e.html":
            return 503, {"Content-Type": "text/plain"}, b"maintenance"  # transient: keep the stored page
        if second.is_set() and path == "/slow.html":
            import time
            time.sleep(0.6)  # slower than timeout_s: an error outcome, the crawl goes on
        return None

    with serve_site(site_root, hook=hook) as site:
        src = write_sources(tmp_path / "s.yaml", [{"id": "t", "category": "articles", "start_urls": [site.url + "/"],
                                                   "include": ["/"], "permission": PERMISSION},
                                                  {"id": "dns", "category": "articles", "permission": PERMISSION,
                                                   "start_urls": ["http://no-such-host.invalid/"]}])
        cfg = make_cfg(tmp_path / "data", src, max_retries=0, timeout_s=0.3)
        first = run_scrape(cfg)
        assert first["counts"]["new"] == 6
        (site_root / "b.html").write_text(page("B2", "changed text " * 20))
        (site_root / "c.html").unlink()
        (site_root / "d.html").write_text(page("D"))
        (site_root / "index.html").write_text(page("Home", links=["/a.html", "/b.html", "/c.html", "/d.html",
                                                                  "/e.html", "/slow.html"]))
        second.set()
        m = run_scrape(cfg)
    c = m["counts"]
    assert (c["new"], c["changed"], c["unchanged"], c["gone"]) == (1, 2, 1, 1), c  # d / index, b / a / c
    assert c["stale_kept"] == 2  # e (503) and slow (timeout) keep their earlier bodies
    log = {r["url"]: r for r in fetch_log(tmp_path / "data")}
    assert log["http://no-such-host.invalid/"]["decision"] == "error"
    assert "DNS" in log["http://no-such-host.invalid/"]["reason"]
    assert log[site.url + "/c.html"]["status"] == 404
    assert c["pages"] == 6  # index, a, b, d, e, slow


# ------------------------------------------------------------ robots rules, per host, RFC 9309
def test_hosts_with_different_robots_rules_never_see_a_disallowed_request(tmp_path: Path) -> None:
    """Three loopback hosts, three robots.txt files: agent groups, longest match, ``*`` and ``$``, sitemaps."""
    import contextlib

    sites_spec = {
        # our group beats the * group; longest match wins; $ anchors; Allow inside a disallowed folder
        "a": ("User-agent: *\nDisallow: /\n\nUser-agent: data-to-adapter\nAllow: /\nDisallow: /*.pdf$\n"
              "Disallow: /shop/\nAllow: /shop/public\n",
              ["/a.html", "/doc.pdf", "/shop/x.html", "/shop/public.html"],
              {"/doc.pdf", "/shop/x.html"}),
        # wildcard in the middle of a rule
        "b": ("User-agent: *\nDisallow: /*?session=\n", ["/b.html", "/b.html?session=1", "/b.html?page=2"],
              {"/b.html?session=1"}),
        # a group for another crawler does not apply to us; Sitemap: lines are followed
        "c": ("User-agent: otherbot\nDisallow: /\n\nUser-agent: *\nDisallow: /private\n"
              "Sitemap: /sm.xml\nSitemap: http://elsewhere.invalid/sm.xml\n",
              ["/c.html", "/private/p.html"], {"/private/p.html"}),
    }
    with contextlib.ExitStack() as stack:
        sites = {}
        for i, (name, (robots, links, _)) in enumerate(sites_spec.items(), start=1):
            files: dict[str, str | bytes] = {"robots.txt": robots, "index.html": page(name, links=links)}
            for link in links:
                path = link.split("?")[0].lstrip("/")
                files[path] = page(path) if path.endswith(".html") else b"%PDF-1.4"
            if name == "c":
                files["sm.xml"] = ('<?xml version="1.0"?><urlset xmlns="http://www.sitemaps.org/schemas/sitemap/0.9">'
                                   "<url><loc>/only-in-sitemap.html</loc></url></urlset>")
                files["only-in-sitemap.html"] = page("From the sitemap")
            sites[name] = stack.enter_context(serve_site(write_site(tmp_path / name, files), host=f"127.0.0.{i}"))
        src = write_sources(tmp_path / "s.yaml", [
            {"id": n, "category": "articles", "start_urls": [s.url + "/"], "include": ["/"], "permission": PERMISSION}
            for n, s in sites.items()])
        m = run_scrape(make_cfg(tmp_path / "data", src, allow_private_addresses=["127.0.0.0/29"]))
    for name, (_, links, disallowed) in sites_spec.items():
        seen = sites[name].requests.paths()
        assert not disallowed & set(seen), (name, seen)
        assert set(links) - disallowed <= set(seen), (name, seen)
        assert seen.count("/robots.txt") == 1, (name, seen)  # cached per host
    assert "/sm.xml" in sites["c"].requests.paths() and "/only-in-sitemap.html" in sites["c"].requests.paths()
    decisions = {r["url"].split("/", 3)[3]: r["decision"] for r in fetch_log(tmp_path / "data")}
    assert decisions["doc.pdf"] == decisions["shop/x.html"] == decisions["private/p.html"] == "refused_robots"
    assert decisions["b.html?session=1"] == "refused_robots" and decisions["shop/public.html"] == "fetched"
    assert m["counts"]["refused"]["refused_robots"] == 4


def test_request_rate_is_honored(tmp_path: Path) -> None:
    site_root = write_site(tmp_path / "site", {
        "robots.txt": "User-agent: *\nRequest-rate: 5/1\n",  # 5 requests per second: 0.2 s apart
        "index.html": page("Home", links=["/a.html", "/b.html", "/c.html"]),
        "a.html": page("A"), "b.html": page("B"), "c.html": page("C"),
    })
    with serve_site(site_root) as site:
        src = write_sources(tmp_path / "s.yaml", [{"id": "t", "category": "articles", "start_urls": [site.url + "/"],
                                                   "include": ["/"], "permission": PERMISSION}])
        m = run_scrape(make_cfg(tmp_path / "data", src))
        times = [t for t, _ in site.requests.timed()]
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert m["counts"]["pages"] == 4 and len(times) >= 5 and min(gaps) >= 0.2 - 0.01, gaps


def test_crawl_delay_beyond_the_bound_skips_the_host_instead_of_crawling_faster(tmp_path: Path) -> None:
    site_root = write_site(tmp_path / "site", {"robots.txt": "User-agent: *\nCrawl-delay: 3600\n",
                                               "index.html": page("Home")})
    with serve_site(site_root) as site:
        src = write_sources(tmp_path / "s.yaml", [{"id": "t", "category": "articles", "start_urls": [site.url + "/"],
                                                   "include": ["/"], "permission": PERMISSION}])
        m = run_scrape(make_cfg(tmp_path / "data", src, max_crawl_delay_s=60))
        assert page_gets(site) == []
    (rec,) = [r for r in fetch_log(tmp_path / "data") if r["kind"] == "page"]
    assert rec["decision"] == "refused_robots" and "3600" in rec["reason"]
    assert m["counts"]["pages"] == 0


def test_robots_timeout_disallows_all_and_huge_robots_is_read_to_the_limit(tmp_path: Path) -> None:
    import time

    def slow_robots(method: str, path: str, headers: dict[str, str]) -> Any:
        if path == "/robots.txt":
            time.sleep(0.6)  # longer than timeout_s
        return None

    huge = "User-agent: *\nDisallow: /secret\n" + "# filler line of a very long robots.txt\n" * 20_000  # ~800 KB
    for name, hook, robots, expect in (("slow", slow_robots, "User-agent: *\nAllow: /\n", set()),
                                       ("huge", None, huge, {"/", "/ok.html"})):
        root = write_site(tmp_path / name, {"robots.txt": robots, "index.html": page("H", links=["/ok.html",
                                                                                                   "/secret.html"]),
                                            "ok.html": page("OK"), "secret.html": page("S")})
        with serve_site(root, hook=hook) as site:
            src = write_sources(tmp_path / f"{name}.yaml", [{"id": "t", "category": "articles",
                                                             "start_urls": [site.url + "/"], "include": ["/"],
                                                             "permission": PERMISSION}])
            run_scrape(make_cfg(tmp_path / f"data-{name}", src, max_retries=0, timeout_s=0.3))
            assert set(page_gets(site)) == expect, (name, page_gets(site))


# ------------------------------------------------------------------ page-level opt-outs, links
def test_nofollow_and_agent_specific_robots_directives(tmp_path: Path) -> None:
    def hook(method: str, path: str, headers: dict[str, str]) -> Any:
        if path == "/other-bot-noindex.html":  # a directive for another crawler does not apply to us
            return 200, {"Content-Type": "text/html", "X-Robots-Tag": "otherbot: noindex"}, page("O").encode()
        if path == "/xnofollow.html":
            if headers.get("If-None-Match") == '"x1"':
                return 304, {"ETag": '"x1"'}, b""  # a 304 repeats no X-Robots-Tag: the stored nofollow must hold
            return (200, {"Content-Type": "text/html", "X-Robots-Tag": "data-to-adapter: nofollow", "ETag": '"x1"'},
                    page("XN", links=["/hidden-3.html"]).encode())
        return None

    root = write_site(tmp_path / "site", {
        "robots.txt": "User-agent: *\nAllow: /\n",
        "index.html": page("Home", links=["/meta-nofollow.html", "/ours-noindex.html", "/other-bot-noindex.html",
                                          "/xnofollow.html"]).replace(
            "</ul>", '<li><a rel="nofollow" href="/hidden-2.html">x</a></li></ul>'),
        "meta-nofollow.html": page("N", links=["/hidden-1.html"], head='<meta name="robots" content="nofollow">'),
        "ours-noindex.html": page("U", head='<meta name="data-to-adapter" content="noindex">'),
        **{f"hidden-{i}.html": page("H") for i in (1, 2, 3)},
    })
    with serve_site(root, hook=hook) as site:
        src = write_sources(tmp_path / "s.yaml", [{"id": "t", "category": "articles", "start_urls": [site.url + "/"],
                                                   "include": ["/"], "permission": PERMISSION}])
        m = run_scrape(make_cfg(tmp_path / "data", src))
        log = {r["url"].split("/", 3)[3]: r["decision"] for r in fetch_log(tmp_path / "data")}
        run_scrape(make_cfg(tmp_path / "data", src))  # 304s: the stored pages' nofollow still holds
        gets = page_gets(site)
    again_log = {r["url"].split("/", 3)[3]: r["decision"] for r in fetch_log(tmp_path / "data")}
    assert again_log["xnofollow.html"] == again_log["meta-nofollow.html"] == "not_modified"
    assert not [p for p in gets if p.startswith("/hidden")], gets
    assert log["ours-noindex.html"] == "refused_optout" and log["other-bot-noindex.html"] == "fetched"
    assert log["meta-nofollow.html"] == log["xnofollow.html"] == "fetched"  # kept, links not followed
    assert m["counts"]["pages"] == 4


def test_no_cookies_or_credentials_cross_hosts_or_requests(tmp_path: Path) -> None:
    """Cookies set by one host are never sent back, to it or to another allow-listed host."""
    def set_cookie(method: str, path: str, headers: dict[str, str]) -> Any:
        if path.endswith(".html") or path == "/":
            body = (root_b / "index.html").read_bytes() if path == "/" else page(path).encode()
            return 200, {"Content-Type": "text/html", "Set-Cookie": "sid=secret; Path=/",
                         "WWW-Authenticate": 'Basic realm="x"'}, body
        return None

    root_b = write_site(tmp_path / "b", {"robots.txt": "", "x.html": page("X")})
    with serve_site(root_b, host="127.0.0.2") as other:
        (root_b / "index.html").write_text(page("B", links=["/x.html"]))
        root_a = write_site(tmp_path / "a", {"robots.txt": "", "index.html": page(
            "A", links=["/a2.html", other.url + "/x.html", other.url.replace("http://", "http://user:pw@") + "/"])})
        with serve_site(root_a, hook=set_cookie) as site:
            src = write_sources(tmp_path / "s.yaml", [
                {"id": "a", "category": "articles", "start_urls": [site.url + "/"], "include": ["/"],
                 "permission": PERMISSION},
                {"id": "b", "category": "articles", "start_urls": [other.url + "/"], "include": ["/"],
                 "permission": PERMISSION}])
            m = run_scrape(make_cfg(tmp_path / "data", src, allow_private_addresses=["127.0.0.1", "127.0.0.2"]))
            headers = [h for _, _, h in list(site.requests) + list(other.requests)]
    assert len(headers) >= 6 and m["counts"]["pages"] >= 4
    assert not [h for h in headers if {k.lower() for k in h} & {"cookie", "authorization", "proxy-authorization"}]


# --------------------------------------------------------------------- hostile or broken servers
def test_slow_drip_and_endless_bodies_are_cut_off_and_the_crawl_goes_on(tmp_path: Path) -> None:
    import time

    done = threading.Event()
    sent = {"endless": 0}

    def drip() -> Any:
        yield b"<!doctype html><html><body><main><p>"
        for _ in range(200):  # one byte every 0.1 s: each read is in time, the whole body never is
            if done.is_set():
                return
            time.sleep(0.1)
            yield b"x"

    def endless() -> Any:
        for _ in range(2000):  # 128 MB if nobody stopped reading
            if done.is_set():
                return
            sent["endless"] += 1
            yield b"<p>" + b"y" * (64 * 1024 - 3)

    def hook(method: str, path: str, headers: dict[str, str]) -> Any:
        if path == "/drip.html":
            return 200, {"Content-Type": "text/html"}, drip()
        if path == "/endless.html":
            return 200, {"Content-Type": "text/html"}, endless()
        return None

    root = write_site(tmp_path / "site", {"robots.txt": "", "ok.html": page("OK"),
                                          "index.html": page("Home", links=["/drip.html", "/endless.html",
                                                                            "/ok.html"])})
    with serve_site(root, hook=hook) as site:
        src = write_sources(tmp_path / "s.yaml", [{"id": "t", "category": "articles", "start_urls": [site.url + "/"],
                                                   "include": ["/"], "permission": PERMISSION}])
        t0 = time.monotonic()
        m = run_scrape(make_cfg(tmp_path / "data", src, max_retries=0, timeout_s=0.5, request_deadline_s=1.5,
                                max_bytes=300_000))
        wall = time.monotonic() - t0
        done.set()
    log = {r["url"].split("/", 3)[3]: r for r in fetch_log(tmp_path / "data")}
    assert log["drip.html"]["decision"] == "error" and "not complete within" in log["drip.html"]["reason"]
    assert log["endless.html"]["decision"] == "refused_size"
    assert sent["endless"] < 200, sent  # the reader stopped; the server did not stream 128 MB
    assert log["ok.html"]["decision"] == "fetched" and m["counts"]["pages"] == 2
    assert wall < 6, wall


def test_retry_after_beyond_the_bound_backs_off_the_whole_host(tmp_path: Path) -> None:
    def hook(method: str, path: str, headers: dict[str, str]) -> Any:
        if path == "/busy.html":
            return 503, {"Retry-After": "3600", "Content-Type": "text/plain"}, b"back tomorrow"
        return None

    root = write_site(tmp_path / "site", {"robots.txt": "", "a.html": page("A"), "b.html": page("B"),
                                          "index.html": page("Home", links=["/busy.html", "/a.html", "/b.html"])})
    with serve_site(root, hook=hook) as site:
        src = write_sources(tmp_path / "s.yaml", [{"id": "t", "category": "articles", "start_urls": [site.url + "/"],
                                                   "include": ["/"], "permission": PERMISSION}])
        m = run_scrape(make_cfg(tmp_path / "data", src))
        gets = page_gets(site)
    assert gets == ["/", "/busy.html"], gets  # asked once, then left alone
    log = {r["url"].split("/", 3)[3]: r for r in fetch_log(tmp_path / "data")}
    assert all(log[p]["decision"] == "error" and "backed off" in log[p]["reason"] for p in ("a.html", "b.html"))
    assert m["counts"]["errors"] == 3


def test_fetcher_refreshes_robots_after_ttl_and_stops_long_redirect_chains(tmp_path: Path) -> None:
    import time

    from scrapers.fetcher import Decision, FetcherSettings, HostAllowList, PoliteFetcher

    def hook(method: str, path: str, headers: dict[str, str]) -> Any:
        if path.startswith("/hop"):
            n = int(path[4:])
            return 302, {"Location": f"/hop{n + 1}"}, b""
        return None

    root = write_site(tmp_path / "site", {"robots.txt": "User-agent: *\nAllow: /\n", "a.html": page("A")})
    with serve_site(root, hook=hook) as site:
        f = PoliteFetcher(FetcherSettings(user_agent="data-to-adapter/0.1 (+mailto:x@example.org)", min_delay_s=0,
                                          timeout_s=2, max_retries=0, allow_private_addresses=["127.0.0.1"],
                                          robots_ttl_s=0.3), HostAllowList([site.url + "/"]))
        assert f.fetch(site.url + "/a.html").decision == Decision.FETCHED
        assert f.fetch(site.url + "/a.html").decision == Decision.FETCHED
        assert site.requests.paths().count("/robots.txt") == 1  # cached
        time.sleep(0.35)
        f.fetch(site.url + "/a.html")
        assert site.requests.paths().count("/robots.txt") == 2  # refreshed after the TTL
        r = f.fetch(site.url + "/hop0")
        assert r.decision == Decision.ERROR and "more than 5 redirects" in r.reason
        assert [p for p in site.requests.paths() if p.startswith("/hop")] == [f"/hop{i}" for i in range(6)]
        f.close()


def test_user_agent_must_carry_a_contact(tmp_path: Path) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="contact"):
        make_cfg(tmp_path, tmp_path / "s.yaml", user_agent="python-requests/2.32")
    assert make_cfg(tmp_path, tmp_path / "s.yaml", user_agent="bot/1 (+https://example.org/bot)")


def test_crawl_state_of_an_older_schema_is_moved_aside_not_crashed_on(tmp_path: Path, caplog) -> None:
    import sqlite3

    from scrapers.crawl import SCHEMA_VERSION, CrawlState

    state = tmp_path / "scrape_state"
    state.mkdir()
    old = sqlite3.connect(state / "state.sqlite")  # a file from before 'pathq' existed, no version recorded
    old.execute("CREATE TABLE url (url TEXT PRIMARY KEY, host TEXT NOT NULL, kind TEXT NOT NULL)")
    old.execute("INSERT INTO url VALUES ('https://a.test/x', 'a.test', 'page')")
    old.commit()
    old.close()
    with caplog.at_level("WARNING", logger="scrapers.crawl"):
        cs = CrawlState(state)
    assert cs._q("SELECT url, pathq, nofollow FROM url") == []  # a fresh file of the current schema
    cs.close()
    (aside,) = state.glob("state.schema-1.*.sqlite")
    assert sqlite3.connect(aside).execute("SELECT url FROM url").fetchall() == [("https://a.test/x",)]  # kept
    assert "schema version 1" in caplog.text and aside.name in caplog.text
    con = sqlite3.connect(state / "state.sqlite")
    assert con.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    con.close()
    CrawlState(state).close()  # the current version opens as it is: nothing more moved aside
    assert len(list(state.glob("state.schema-*.sqlite"))) == 1
