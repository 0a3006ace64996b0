"""The crawl: a persistent frontier, per-URL state, and one polite worker per host.

State lives in SQLite under ``<data root>/scrape_state`` so that
- a killed crawl resumes where it stopped (URLs visited in the unfinished generation are not
  fetched again),
- a re-crawl sends conditional requests from the stored ETag / Last-Modified, and a 304 reuses the
  stored body (content-addressed blobs, ``blobs/<sha[:2]>/<sha>``),
- the stage can say which pages are new, changed, unchanged or gone since the last crawl.

A *generation* is one complete crawl. URLs are routed to the source whose ``include`` prefix
matches (longest wins), so a sitemap or a home page may feed every source of its host, and no
URL outside every source's scope is ever requested. The ``Sitemap:`` lines of each host's robots.txt
are read too (``scrape.follow_robots_sitemaps``); the pages they list are routed the same way.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import lxml.etree
import lxml.html

from scrapers.common import decode_body, normalize_url, origin, path_query
from scrapers.fetcher import (
    SITEMAP_TYPES,
    Decision,
    FetcherSettings,
    FetchLog,
    HostAllowList,
    PoliteFetcher,
    _links,
    _robots_directives,
    redact,
)
from scrapers.hashing import fingerprint, sha256_bytes
from scrapers.schema import ScrapeConfig, SourceConfig
from scrapers.urls import canonical_url, path_readings

log = logging.getLogger("scrapers.crawl")

PROGRESS_EVERY_S = 5.0
MAX_SITEMAP_DEPTH = 3  # sitemap index -> sitemap -> ...; deeper nesting is a loop or abuse


class SourceRefused(ValueError):
    """A source lacks evidence of permission (or is otherwise unusable); the message names its id."""


def check_sources(sources: list[SourceConfig]) -> tuple[list[SourceConfig], list[dict[str, str]]]:
    """Split sources into usable ones and refusals ({id, reason}); a source needs permission evidence."""
    ok, refused = [], []
    for s in sources:
        reason = None
        if s.permission is None:
            reason = (f"source {s.id!r} refused: no evidence of permission "
                      "(add permission: {evidence_url, license, note} to the sources file)")
        elif not s.permission.evidence_url.strip() or not s.permission.license.strip():
            reason = f"source {s.id!r} refused: permission needs both evidence_url and license"
        elif s.kind == "dataset":
            from scrapers.dataset_import import check as check_dataset
            reason = check_dataset(s)
        elif s.path:
            reason = f"source {s.id!r} refused: path is for kind: dataset (this source is kind: web)"
        elif not (s.start_urls or s.sitemaps):
            reason = f"source {s.id!r} refused: no start_urls or sitemaps"
        else:
            bad = [u for u in s.start_urls + s.sitemaps if urlsplit(u).scheme not in ("http", "https")]
            creds = [redact(u) for u in s.start_urls + s.sitemaps if redact(u) != u]
            if bad:
                reason = f"source {s.id!r} refused: not http(s) URL(s) {[redact(u) for u in bad]}"
            elif creds:
                reason = f"source {s.id!r} refused: credentials in URL(s) {creds} (they would be sent and logged)"
        if reason:
            log.error(reason)
            refused.append({"id": s.id, "reason": reason})
        else:
            ok.append(s)
    return ok, refused


def require_permission(source: SourceConfig) -> None:
    _, refused = check_sources([source])
    if refused:
        raise SourceRefused(refused[0]["reason"])


def seeds_fingerprint(sources: list[SourceConfig]) -> str:
    """Identity of a crawl's seeds: an unfinished crawl resumes only with the same seeds."""
    return fingerprint(sorted((s.id, s.start_urls, s.sitemaps, s.include) for s in sources))


class Router:
    """Maps a URL to the source that may crawl it: same host, longest matching ``include`` prefix."""

    def __init__(self, sources: list[SourceConfig]) -> None:
        self._by_host: dict[str, list[tuple[str, SourceConfig]]] = {}
        for s in sources:
            prefixes = [_canonical_prefix(p) for p in s.include] or sorted(
                {urlsplit(normalize_url(u) or u).path.rsplit("/", 1)[0] + "/" for u in s.start_urls})
            hosts = {urlsplit(normalize_url(u) or u).netloc for u in s.start_urls + s.sitemaps}
            for h in hosts:
                self._by_host.setdefault(h, []).extend((p, s) for p in prefixes)
        for rules in self._by_host.values():
            rules.sort(key=lambda r: -len(r[0]))  # stable: ties keep source order

    def source_for_host(self, netloc: str) -> SourceConfig | None:
        rules = self._by_host.get(netloc)
        return rules[-1][1] if rules else None

    def route(self, url: str) -> SourceConfig | None:
        """The source for ``url`` (canonical, scrapers/urls.py), if every reading of its path is in that scope."""
        p = urlsplit(url)
        readings = path_readings(url)
        for prefix, src in self._by_host.get(p.netloc, ()):
            if readings[0].startswith(prefix):
                return src if all(r.startswith(prefix) for r in readings[1:]) else None
        return None


def _canonical_prefix(prefix: str) -> str:
    """An ``include`` prefix in the URL form paths are compared in (percent-encoding, dot segments)."""
    if not prefix.startswith("/"):
        return prefix
    canon = urlsplit(canonical_url("http://h" + prefix) or "").path or prefix
    # "/recipes/" must stay a directory prefix; canonical_url keeps the trailing slash
    return canon


class BlobStore:
    """Content-addressed bodies, so a 304 or a resumed crawl can republish what it already has."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, sha: str) -> Path:
        return self.root / sha[:2] / sha

    def has(self, sha: str | None) -> bool:
        return bool(sha) and self.path(sha).is_file()

    def put(self, sha: str, body: bytes) -> None:
        p = self.path(sha)
        if p.is_file():
            return
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(p.name + f".{threading.get_ident()}.tmp")
        tmp.write_bytes(body)
        tmp.replace(p)

    def get(self, sha: str) -> bytes:
        return self.path(sha).read_bytes()


_SCHEMA = """
CREATE TABLE IF NOT EXISTS crawl (
    gen INTEGER PRIMARY KEY, started_at TEXT NOT NULL, finished_at TEXT, seeds_fp TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS url (
    url TEXT PRIMARY KEY, host TEXT NOT NULL, kind TEXT NOT NULL, source_id TEXT, category TEXT,
    license TEXT, pathq TEXT, depth INTEGER NOT NULL DEFAULT 0, queued_gen INTEGER NOT NULL DEFAULT 0,
    visited_gen INTEGER NOT NULL DEFAULT 0, decision TEXT, reason TEXT, status INTEGER, final_url TEXT,
    content_type TEXT, etag TEXT, last_modified TEXT, sha256 TEXT, fetched_at TEXT, body_status INTEGER,
    change TEXT, publish INTEGER NOT NULL DEFAULT 0, published_gen INTEGER NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS url_frontier ON url (host, queued_gen, visited_gen);
CREATE INDEX IF NOT EXISTS url_publish ON url (visited_gen, publish);
"""
# Bumped when _SCHEMA changes in a way ALTER TABLE cannot follow. A state file of another version is
# moved aside (never deleted) and the crawl starts afresh: one full re-fetch instead of a crash.
SCHEMA_VERSION = 2


def _schema_version(db_path: Path) -> int:
    """The file's PRAGMA user_version; 1 for a file written before versions were recorded (tables, no version)."""
    con = sqlite3.connect(db_path)
    try:
        v = con.execute("PRAGMA user_version").fetchone()[0]
        has_tables = con.execute("SELECT count(*) FROM sqlite_master WHERE type='table'").fetchone()[0] > 0
    finally:
        con.close()
    return v if v or not has_tables else 1


class CrawlState:
    """SQLite frontier + per-URL state. One connection shared by the host workers behind a lock."""

    def __init__(self, state_dir: Path) -> None:
        state_dir.mkdir(parents=True, exist_ok=True)
        self.dir = state_dir
        self.blobs = BlobStore(state_dir / "blobs")
        db_path = state_dir / "state.sqlite"
        if db_path.is_file() and (old := _schema_version(db_path)) != SCHEMA_VERSION:
            aside = db_path.with_name(f"state.schema-{old}.{time.strftime('%Y%m%dT%H%M%S')}.sqlite")
            for suffix in ("", "-wal", "-shm"):
                if Path(f"{db_path}{suffix}").exists():
                    os.replace(f"{db_path}{suffix}", f"{aside}{suffix}")
            log.warning("crawl state %s has schema version %s, this code needs %s: moved it to %s and starting "
                        "a fresh crawl (every page is fetched again once)", db_path, old, SCHEMA_VERSION, aside.name)
        self._db = sqlite3.connect(db_path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        try:  # added later: the page's own nofollow (header or meta), so a 304 does not follow its links
            self._db.execute("ALTER TABLE url ADD COLUMN nofollow INTEGER NOT NULL DEFAULT 0")
        except sqlite3.OperationalError:
            pass  # already there
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _q(self, sql: str, args: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # -- generations -------------------------------------------------------------------------
    def begin(self, seeds_fp: str) -> tuple[int, bool, int]:
        """(generation, resumed?, previous finished generation or 0)."""
        last = self._q("SELECT gen, finished_at, seeds_fp FROM crawl ORDER BY gen DESC LIMIT 1")
        prev = self._q("SELECT MAX(gen) AS g FROM crawl WHERE finished_at IS NOT NULL")[0]["g"] or 0
        if last and last[0]["finished_at"] is None and last[0]["seeds_fp"] == seeds_fp:
            return last[0]["gen"], True, prev
        gen = (last[0]["gen"] if last else 0) + 1
        self._q("INSERT INTO crawl (gen, started_at, seeds_fp) VALUES (?, ?, ?)",
                (gen, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), seeds_fp))
        return gen, False, prev

    def finish(self, gen: int) -> None:
        self._q("UPDATE crawl SET finished_at=? WHERE gen=?", (time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), gen))

    # -- frontier ----------------------------------------------------------------------------
    def enqueue(self, url: str, kind: str, source: SourceConfig, depth: int, gen: int) -> bool:
        """Queue ``url`` for generation ``gen`` unless it already is; True when newly queued."""
        host = urlsplit(url).netloc
        lic = source.permission.license if source.permission else None
        with self._lock:
            cur = self._db.execute(
                "INSERT INTO url (url, host, kind, source_id, category, license, pathq, depth, queued_gen) "
                "VALUES (?,?,?,?,?,?,?,?,?) ON CONFLICT(url) DO UPDATE SET queued_gen=excluded.queued_gen, "
                "depth=excluded.depth, kind=excluded.kind, source_id=excluded.source_id, "
                "category=excluded.category, license=excluded.license WHERE url.queued_gen < excluded.queued_gen",
                (url, host, kind, source.id, source.category, lic, path_query(url), depth, gen))
            return cur.rowcount > 0

    def next_url(self, host: str, gen: int) -> sqlite3.Row | None:
        rows = self._q("SELECT * FROM url WHERE host=? AND queued_gen=? AND visited_gen<? "
                       "ORDER BY kind != 'sitemap', depth, rowid LIMIT 1", (host, gen, gen))
        return rows[0] if rows else None

    def hosts_pending(self, gen: int) -> list[str]:
        return [r["host"] for r in self._q(
            "SELECT DISTINCT host FROM url WHERE queued_gen=? AND visited_gen<?", (gen, gen))]

    def pending(self, gen: int) -> int:
        return self._q("SELECT COUNT(*) AS n FROM url WHERE queued_gen=? AND visited_gen<?", (gen, gen))[0]["n"]

    def queued_per_source(self, gen: int) -> Counter[str]:
        return Counter({r["source_id"]: r["n"] for r in self._q(
            "SELECT source_id, COUNT(*) AS n FROM url WHERE queued_gen=? AND kind='page' GROUP BY source_id", (gen,))})

    def update(self, url: str, **fields: Any) -> None:
        cols = ", ".join(f"{k}=?" for k in fields)
        self._q(f"UPDATE url SET {cols} WHERE url=?", (*fields.values(), url))

    # -- publishing --------------------------------------------------------------------------
    def published_rows(self, gen: int, order: str = "category, url", category: str | None = None
                       ) -> Iterator[sqlite3.Row]:
        """Pages to publish for ``gen`` (of one category if given), streamed (only once the crawl is over)."""
        if order not in ("category, url", "source_id, category, pathq"):
            raise ValueError(f"unsupported order {order!r}")
        where = " AND category=?" if category is not None else ""
        cur = self._db.execute(
            "SELECT url, pathq, final_url, fetched_at, body_status, etag, last_modified, content_type, sha256, "
            f"category, source_id, license, decision FROM url WHERE visited_gen=? AND publish=1 AND kind='page'"
            f"{where} ORDER BY {order}", (gen,) if category is None else (gen, category))
        yield from cur

    def pages_fingerprint(self, gen: int) -> tuple[str, int]:
        """(sha256, count) over (source, category, licence, path+query, body hash) of the pages to publish.

        The origin is left out, so the same site served from another host or port is the same input.
        """
        h = hashlib.sha256()
        n = 0
        for r in self.published_rows(gen, order="source_id, category, pathq"):
            h.update(json.dumps([r["source_id"], r["category"], r["license"] or "", r["pathq"], r["sha256"]]).encode())
            h.update(b"\n")
            n += 1
        return h.hexdigest(), n

    def keep_stale(self, gen: int, prev: int, host: str, reason: str) -> int:
        """Republish, marked stale, the pages of ``host`` published last time and not visited now (RFC 9309:
        its robots.txt was unreachable, so nothing was fetched; its pages are stale, not gone)."""
        if not prev:
            return 0
        with self._lock:
            return self._db.execute(
                "UPDATE url SET visited_gen=?, publish=1, change='stale_kept', decision='refused_robots', reason=? "
                "WHERE host=? AND kind='page' AND published_gen=? AND sha256 IS NOT NULL "
                "AND NOT (visited_gen=? AND publish=1)", (gen, reason, host, prev, gen)).rowcount

    def mark_published(self, gen: int) -> None:
        self._q("UPDATE url SET published_gen=? WHERE visited_gen=? AND publish=1 AND kind='page'", (gen, gen))

    def change_counts(self, gen: int, prev: int) -> dict[str, int]:
        out = {"new": 0, "changed": 0, "unchanged": 0, "stale_kept": 0}
        for r in self._q("SELECT change, COUNT(*) AS n FROM url WHERE visited_gen=? AND publish=1 AND kind='page' "
                         "GROUP BY change", (gen,)):
            if r["change"] in out:
                out[r["change"]] = r["n"]
        out["gone"] = self._q(
            "SELECT COUNT(*) AS n FROM url WHERE kind='page' AND published_gen=? AND ? > 0 "
            "AND NOT (visited_gen=? AND publish=1)", (prev, prev, gen))[0]["n"] if prev else 0
        return out


@dataclass
class CrawlSummary:
    gen: int
    resumed: bool
    prev_gen: int
    seconds: float
    requests: dict[str, int] = field(default_factory=dict)
    out_of_scope_links: int = 0
    over_max_pages: int = 0
    stopped: bool = False
    robots_unreachable: dict[str, str] = field(default_factory=dict)  # origin -> why (pages kept stale)


class Crawler:
    """Runs one generation: seeds, then each host's frontier in its own thread until all are empty."""

    def __init__(self, cfg: ScrapeConfig, sources: list[SourceConfig], state: CrawlState, fetch_log: FetchLog,
                 max_hosts_parallel: int = 16) -> None:
        self.cfg = cfg
        self.sources = sources
        self.by_id = {s.id: s for s in sources}
        self.state = state
        self.router = Router(sources)
        allow = HostAllowList([u for s in sources for u in s.start_urls + s.sitemaps])
        self.fetcher = PoliteFetcher(FetcherSettings(
            user_agent=cfg.user_agent, min_delay_s=cfg.min_delay_s, timeout_s=cfg.timeout_s,
            max_bytes=cfg.max_bytes, max_retries=cfg.max_retries,
            allow_private_addresses=cfg.allow_private_addresses, respect_noindex=cfg.respect_noindex,
            max_crawl_delay_s=cfg.max_crawl_delay_s, robots_ttl_s=cfg.robots_ttl_s,
            request_deadline_s=cfg.request_deadline_s, dns_timeout_s=cfg.dns_timeout_s), allow, fetch_log)
        self.fetch_log = fetch_log
        self.max_hosts_parallel = max_hosts_parallel
        self._counts_lock = threading.Lock()
        self._queued: Counter[str] = Counter()
        self._out_of_scope = 0
        self._over_max = 0
        self._pages_done = 0
        self._robots_sitemaps_done: set[str] = set()

    def run(self, gen: int, resumed: bool, prev: int, stop: threading.Event | None = None) -> CrawlSummary:
        """Crawl generation ``gen`` (from ``CrawlState.begin``) until every host's frontier is empty."""
        t0 = time.monotonic()
        self.gen = gen
        self._queued = self.state.queued_per_source(gen)
        if not resumed:
            for s in self.sources:
                for u in s.sitemaps:
                    if (nu := normalize_url(u)):
                        self.state.enqueue(nu, "sitemap", s, 0, gen)
                for u in s.start_urls:
                    if (nu := normalize_url(u)):
                        self._enqueue_page(nu, s, 0)
        log.info("crawl generation %d %s: %d URL(s) queued", gen, "resumed" if resumed else "started",
                 self.state.pending(gen))
        stop = stop or threading.Event()
        running: dict[str, Future[None]] = {}
        last_progress = time.monotonic()
        with ThreadPoolExecutor(max_workers=self.max_hosts_parallel, thread_name_prefix="host") as pool:
            while True:
                if not stop.is_set():
                    for host in self.state.hosts_pending(gen):
                        if host not in running and len(running) < self.max_hosts_parallel:
                            running[host] = pool.submit(self._host_worker, host, stop)
                if not running:
                    break
                done, _ = wait(list(running.values()), timeout=1.0, return_when=FIRST_COMPLETED)
                for host in [h for h, f in running.items() if f in done]:
                    running.pop(host).result()  # a worker bug surfaces here instead of vanishing
                if time.monotonic() - last_progress >= PROGRESS_EVERY_S:
                    self._progress(t0)
                    last_progress = time.monotonic()
        self.fetcher.close()
        stopped = stop.is_set()
        unreachable = dict(self.fetcher.robots_unreachable)
        if not stopped:
            for org, why in sorted(unreachable.items()):
                kept = self.state.keep_stale(gen, prev, urlsplit(org).netloc, why)
                log.warning("%s: %s; nothing fetched from it this run, %d earlier page(s) kept as stale", org, why,
                            kept)
            self.state.finish(gen)
        self._progress(t0)
        return CrawlSummary(gen, resumed, prev, time.monotonic() - t0, dict(self.fetch_log.counts),
                            self._out_of_scope, self._over_max, stopped, unreachable)

    def _progress(self, t0: float) -> None:
        dt = max(time.monotonic() - t0, 1e-9)
        refusals = {k: v for k, v in self.fetch_log.counts.items() if k.startswith("refused") or k == "error"}
        log.info("scrape: %d pages in %.1fs (%.1f pages/s), %d queued, refusals/errors %s",
                 self._pages_done, dt, self._pages_done / dt, self.state.pending(self.gen), refusals or "{}")

    # -- per host ----------------------------------------------------------------------------
    def _host_worker(self, host: str, stop: threading.Event) -> None:
        while not stop.is_set():
            row = self.state.next_url(host, self.gen)
            if row is None:
                return
            if self.cfg.follow_robots_sitemaps:
                self._queue_robots_sitemaps(row["url"])
                row = self.state.next_url(host, self.gen)  # a sitemap just queued goes first
                if row is None:
                    return
            try:
                if row["kind"] == "sitemap":
                    self._do_sitemap(row)
                else:
                    self._do_page(row)
            except Exception as e:  # noqa: BLE001 - one bad URL must not end the host's crawl
                log.exception("crawler error on %s", row["url"])
                self.state.update(row["url"], visited_gen=self.gen, decision=Decision.ERROR.value,
                                  reason=f"crawler error: {type(e).__name__}: {e}", publish=0)

    def _queue_robots_sitemaps(self, url: str) -> None:
        """Queue the ``Sitemap:`` URLs of this origin's robots.txt (once per crawl), if they are in scope.

        A sitemap belongs to the first source of its host; the pages it lists are routed like links,
        so a sitemap cannot widen any source's scope. Sitemaps on other hosts are not followed.
        """
        org = origin(url)
        if org in self._robots_sitemaps_done:
            return
        self._robots_sitemaps_done.add(org)
        for sm in self.fetcher.robots_sitemaps(org):
            src = self.router.source_for_host(urlsplit(sm).netloc)
            if src is None or self.fetcher.allow.check(sm):
                log.info("%s/robots.txt: sitemap %s is not on an allow-listed host; not followed", org, sm)
                continue
            self.state.enqueue(sm, "sitemap", src, 1, self.gen)

    def _enqueue_page(self, url: str, source: SourceConfig, depth: int) -> None:
        with self._counts_lock:
            if self._queued[source.id] >= source.max_pages:
                self._over_max += 1
                return
            if self.state.enqueue(url, "page", source, depth, self.gen):
                self._queued[source.id] += 1

    def _follow(self, links: list[str], depth: int) -> None:
        for link in links:
            src = self.router.route(link)
            if src is None:
                with self._counts_lock:
                    self._out_of_scope += 1
                continue
            self._enqueue_page(link, src, depth)

    def _do_sitemap(self, row: Any) -> None:
        src = self.by_id.get(row["source_id"])
        res = self.fetcher.fetch(row["url"], accept_types=SITEMAP_TYPES + ("text/html",), kind="sitemap")
        if res.decision != Decision.FETCHED or not res.body or src is None or res.status != 200:
            self.state.update(row["url"], visited_gen=self.gen, decision=res.decision.value, reason=res.reason,
                              status=res.status, publish=0)
            return
        children, pages = parse_sitemap(res.body, res.final_url or res.url)
        if row["depth"] < MAX_SITEMAP_DEPTH:
            for u in children:
                self.state.enqueue(u, "sitemap", src, row["depth"] + 1, self.gen)
        self._follow(pages, 0)
        self.state.update(row["url"], visited_gen=self.gen, decision=res.decision.value, reason=res.reason,
                          status=res.status, publish=0)

    def _do_page(self, row: Any) -> None:
        url = row["url"]
        have_body = self.state.blobs.has(row["sha256"])
        res = self.fetcher.fetch(url, etag=row["etag"] if have_body else None,
                                 last_modified=row["last_modified"] if have_body else None)
        upd: dict[str, Any] = dict(visited_gen=self.gen, decision=res.decision.value, reason=res.reason,
                                   status=res.status)
        links: list[str] = []
        if res.decision == Decision.FETCHED and res.body is not None:
            sha = sha256_bytes(res.body)
            self.state.blobs.put(sha, res.body)
            change = "new" if not row["sha256"] else ("unchanged" if row["sha256"] == sha else "changed")
            upd.update(final_url=res.final_url or url, content_type=res.content_type, etag=res.etag,
                       last_modified=res.last_modified, sha256=sha, fetched_at=res.fetched_at,
                       body_status=res.status, change=change, publish=1, nofollow=int(res.nofollow))
            links = res.links
        elif res.decision == Decision.NOT_MODIFIED and have_body:
            # the stored body is still current: republish it and crawl its links again
            upd.update(change="unchanged", publish=1, fetched_at=res.fetched_at,
                       etag=res.etag or row["etag"], last_modified=res.last_modified or row["last_modified"])
            links = [] if row["nofollow"] else stored_links(self.state.blobs.get(row["sha256"]), row["content_type"],
                                                            row["final_url"] or url, self.fetcher.s.agent_token)
        elif have_body and ((res.decision == Decision.ERROR and (res.status is None or res.status >= 500
                                                                 or res.status == 429))
                            or (res.decision == Decision.REFUSED_ROBOTS and res.robots_unreachable)):
            # a transient failure (or an unreachable robots.txt) must not lose what was scraped before: keep
            # the old body, marked stale
            upd.update(change="stale_kept", publish=1)
            links = [] if row["nofollow"] else stored_links(self.state.blobs.get(row["sha256"]), row["content_type"],
                                                            row["final_url"] or url, self.fetcher.s.agent_token)
        else:
            upd.update(publish=0)
        # links first, then "visited": a kill between the two refetches one page instead of losing its links
        self._follow(links, row["depth"] + 1)
        self.state.update(url, **upd)
        with self._counts_lock:
            self._pages_done += 1


def stored_links(body: bytes, content_type: str | None, base: str, agent: str = "") -> list[str]:
    """Links of a stored HTML body (a 304 means the page, and so its links, are unchanged)."""
    if not content_type or "html" not in content_type.lower():
        return []
    text, _ = decode_body(body, content_type)
    try:
        doc = lxml.html.document_fromstring(text.encode("utf-8"),
                                            parser=lxml.html.HTMLParser(encoding="utf-8"))
    except (ValueError, lxml.etree.ParserError):
        return []
    values = [meta.get("content") or "" for meta in doc.iter("meta")
              if (meta.get("name") or "").strip().lower() in ("robots", agent)]
    if "nofollow" in _robots_directives(values, agent):
        return []
    base_el = doc.find(".//base")
    if base_el is not None and base_el.get("href"):
        base = urljoin(base, base_el.get("href"))
    return _links(doc, base)


_XML_PARSER = lxml.etree.XMLParser(resolve_entities=False, no_network=True, recover=True, huge_tree=False)


def parse_sitemap(body: bytes, base: str) -> tuple[list[str], list[str]]:
    """(child sitemaps, page URLs) from a sitemap, sitemap index or plain-text URL list."""
    head = body.lstrip()[:200].lower()
    locs: list[str] = []
    is_index = False
    if head.startswith(b"<"):
        try:
            root = lxml.etree.fromstring(body, parser=_XML_PARSER)
        except lxml.etree.XMLSyntaxError:
            return [], []
        if root is None:
            return [], []
        is_index = lxml.etree.QName(root).localname.lower() == "sitemapindex"
        locs = [el.text.strip() for el in root.iter() if isinstance(el.tag, str)
                and lxml.etree.QName(el).localname == "loc" and el.text]
    else:
        locs = [ln.strip() for ln in body.decode("utf-8", errors="replace").splitlines() if ln.strip()]
    urls = [u for u in (normalize_url(x, base) for x in locs) if u]
    return (urls, []) if is_index else ([], urls)


def read_decisions(path: Path) -> dict[str, Any]:
    """Counts of a fetch log: decisions overall, per kind, and refusals by reason."""
    by_decision: Counter[str] = Counter()
    pages: Counter[str] = Counter()
    by_kind: Counter[str] = Counter()
    if path.is_file():
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a torn last line after a kill
                by_decision[rec.get("decision", "?")] += 1
                if rec.get("kind", "page") == "page":
                    pages[rec.get("decision", "?")] += 1
                by_kind[f"{rec.get('kind', 'page')}:{rec.get('decision', '?')}"] += 1
    return {"by_decision": dict(sorted(by_decision.items())), "pages": dict(sorted(pages.items())),
            "by_kind": dict(sorted(by_kind.items()))}
