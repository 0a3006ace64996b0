"""The polite fetcher: every rule a site owner would expect, checked before a byte is sent.

Order of checks for one URL (each refusal is a logged decision, never an exception):
  one canonical form (scrapers/urls.py: dot segments, percent-encoding, case) -> scheme http/https ->
  host on the allow-list -> resolved addresses are public (or explicitly allowed; IPv6 forms that
  embed a private IPv4 are refused too) -> robots.txt (RFC 9309, protego) -> TDMRep reservation
  (/.well-known/tdmrep.json) -> per-host slot (one request at a time per host, the delay counted from
  the end of the previous body) -> GET of exactly the checked target (asserted on the prepared
  request), without automatic redirects, each Location normalized and re-checked -> status handling
  (304, 429/503 + Retry-After, 5xx retries) -> opt-out headers, content type, size (Content-Encoding
  undone by our own bounded decoder, aborted past the decoded limit) -> page-level opt-outs in the HTML.

The socket layer re-checks the address it actually connects to, so a DNS answer that changes
between the check and the connection (rebinding) cannot reach a private address either.

Politeness is never traded for speed: a robots.txt Crawl-delay / Request-rate above
``max_crawl_delay_s`` skips the host (refused_robots) rather than crawling it faster than asked, and
a Retry-After above ``max_retry_after_s`` leaves the whole host alone for that long. A robots.txt
that cannot be read (5xx, timeout, network) disallows the whole host for the run; the crawl keeps
its earlier pages as stale. Every request has a total deadline (``request_deadline_s``: DNS,
connect, headers and body) besides the per-read timeout, and DNS lookups their own
(``dns_timeout_s``), so a slow-drip server cannot hold a worker. Sessions keep no cookies and send
no credentials, to any host; URLs with credentials are refused and redacted in the log.
"""

from __future__ import annotations

import http.cookiejar
import json
import logging
import re
import socket
import threading
import time
import zlib
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from enum import Enum
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit, urlunsplit

import lxml.html
import requests
from protego import Protego
from urllib3.exceptions import HTTPError as Urllib3Error

from scrapers.common import decode_body, looks_binary, normalize_url, origin
from scrapers.connection import AddressGuard, AddressRefused, Deadline, _current, _guarded_adapter
from scrapers.decoding import BodyDecoder
from scrapers.urls import canonical_url, request_target, url_readings

log = logging.getLogger("scrapers.fetcher")


MAX_REDIRECTS = 5


MAX_RETRY_AFTER_S = 60.0  # a server asking for a longer pause gets it, but this crawl gives up on the URL


MAX_CRAWL_DELAY_S = 300.0  # default bound; a host asking for more is skipped, never crawled faster


ROBOTS_MAX_BYTES = 512 * 1024  # RFC 9309: parse at least 500 KiB; the rest is ignored


ROBOTS_TTL_S = 24 * 3600.0


PAGE_TYPES = ("text/html", "application/xhtml+xml", "text/plain")


SITEMAP_TYPES = ("application/xml", "text/xml", "text/plain", "application/rss+xml", "application/atom+xml")


class Decision(str, Enum):  # noqa: UP042 - str() of a member must stay "Decision.X"-free as logged today
    FETCHED = "fetched"
    NOT_MODIFIED = "not_modified"
    REFUSED_ROBOTS = "refused_robots"
    REFUSED_ALLOWLIST = "refused_allowlist"
    REFUSED_ADDRESS = "refused_address"
    REFUSED_OPTOUT = "refused_optout"
    REFUSED_SIZE = "refused_size"
    REFUSED_TYPE = "refused_type"
    ERROR = "error"


def utc_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class FetchResult:
    url: str
    decision: Decision
    reason: str = ""
    status: int | None = None
    final_url: str | None = None
    body: bytes | None = None
    content_type: str | None = None
    etag: str | None = None
    last_modified: str | None = None
    fetched_at: str = field(default_factory=utc_now)
    nofollow: bool = False
    text: str | None = None  # decoded HTML, kept so the crawler need not decode twice
    links: list[str] = field(default_factory=list)  # outgoing links (empty when nofollow)
    robots_unreachable: bool = False  # refused because the host's robots.txt could not be read this run

    @property
    def ok(self) -> bool:
        return self.decision in (Decision.FETCHED, Decision.NOT_MODIFIED)


def redact(url: str) -> str:
    """``url`` without user:password@ (a URL with credentials is refused, and never written down whole)."""
    try:
        p = urlsplit(url)
        if p.username is None and p.password is None:
            return url
        return urlunsplit((p.scheme, "***@" + p.netloc.rsplit("@", 1)[1], p.path, p.query, p.fragment))
    except ValueError:
        return "(unparseable URL)"


class FetchLog:
    """JSON lines, one per request decision; appended and flushed so an audit survives a crash."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._f = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self._lock = threading.Lock()
        self.counts: dict[str, int] = {}

    def write(self, r: FetchResult, **extra: Any) -> None:
        rec = {"url": redact(r.url), "time": r.fetched_at, "decision": r.decision.value, "reason": r.reason,
               "status": r.status, **({"final_url": redact(r.final_url)} if r.final_url and r.final_url != r.url else {}),
               **extra}
        line = json.dumps(rec, ensure_ascii=False)
        with self._lock:
            self._f.write(line + "\n")
            self._f.flush()
            self.counts[r.decision.value] = self.counts.get(r.decision.value, 0) + 1

    def close(self) -> None:
        with self._lock:
            self._f.close()


# ------------------------------------------------------------------------------ allow-list
class HostAllowList:
    """Hosts (with ports) that the sources name. Default ports 80/443 count as one site."""

    def __init__(self, urls: list[str]) -> None:
        self._ports: dict[str, set[int]] = {}
        for u in urls:
            p = urlsplit(u)
            if p.scheme not in ("http", "https") or not p.hostname:
                continue
            ports = self._ports.setdefault(p.hostname.lower(), set())
            ports.update({80, 443} if p.port in (None, 80, 443) else {p.port})

    def check(self, url: str) -> str | None:
        """None when allowed, else the reason."""
        p = urlsplit(url)
        if p.scheme not in ("http", "https"):
            return f"scheme {p.scheme or '(none)'!r} is not http/https"
        if p.username or p.password:
            return "credentials in URL are not allowed"
        host = (p.hostname or "").lower()
        try:
            port = p.port or (443 if p.scheme == "https" else 80)
        except ValueError:
            return "invalid port"
        if host not in self._ports:
            return f"host {host!r} is not on the allow-list"
        if port not in self._ports[host]:
            return f"port {port} of {host!r} is not on the allow-list"
        return None


# ------------------------------------------------------------------------------- throttle
class HostThrottle:
    """One request at a time per host, and at least ``delay`` seconds from one response to the next request."""

    def __init__(self) -> None:
        self._locks: dict[str, threading.Lock] = {}
        self._next: dict[str, float] = {}
        self._guard = threading.Lock()

    @contextmanager
    def slot(self, host: str, delay: float) -> Iterator[None]:
        with self._guard:
            lock = self._locks.setdefault(host, threading.Lock())
        with lock:
            wait = self._next.get(host, 0.0) - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            try:
                yield
            finally:
                self._next[host] = max(self._next.get(host, 0.0), time.monotonic() + delay)

    def pause(self, host: str, seconds: float) -> None:
        """Called inside a slot: push the host's next request back (Retry-After, back-off)."""
        self._next[host] = max(self._next.get(host, 0.0), time.monotonic() + seconds)


# -------------------------------------------------------------------------------- opt-outs
def _robots_directives(values: list[str], agent: str) -> set[str]:
    """Directives from X-Robots-Tag / meta robots values that apply to us (bare or ``ouragent:``)."""
    out: set[str] = set()
    for value in values:
        value = value.strip().lower()
        m = re.match(r"^([a-z0-9_-]+)\s*:\s*(.*)$", value)
        if m and m.group(1) not in ("noindex", "nofollow", "none", "all", "unavailable_after"):
            if m.group(1) != agent:
                continue
            value = m.group(2)
        out.update(d.strip() for d in value.split(",") if d.strip())
    if "none" in out:
        out.update({"noindex", "nofollow"})
    return out


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def _wildcard_match(pattern: str, path: str) -> bool:
    """TDMRep ``location`` patterns: ``*`` wildcards and a trailing ``$`` anchor, like robots.txt."""
    anchored = pattern.endswith("$")
    rx = ".*".join(re.escape(part) for part in pattern.rstrip("$").split("*"))
    return re.match(rx + ("$" if anchored else ""), path) is not None


@dataclass
class _Robots:
    parser: Protego | None  # None with allow_all False = disallow everything
    allow_all: bool
    fetched: float
    note: str


# --------------------------------------------------------------------------------- fetcher
@dataclass
class FetcherSettings:
    user_agent: str
    min_delay_s: float = 1.0
    timeout_s: float = 20.0
    max_bytes: int = 5_000_000
    max_retries: int = 3
    allow_private_addresses: list[str] = field(default_factory=list)
    respect_noindex: bool = True
    max_retry_after_s: float = MAX_RETRY_AFTER_S
    max_crawl_delay_s: float = MAX_CRAWL_DELAY_S
    robots_ttl_s: float = ROBOTS_TTL_S
    request_deadline_s: float = 60.0  # total per request: DNS + connect + headers + body
    dns_timeout_s: float = 5.0

    @property
    def agent_token(self) -> str:
        """Product token robots.txt groups are matched against (e.g. ``data-to-adapter``)."""
        return re.split(r"[/\s]", self.user_agent.strip(), maxsplit=1)[0].lower()


class _Abort(Exception):
    def __init__(self, result: FetchResult) -> None:
        super().__init__(result.reason)
        self.result = result


@dataclass
class _Open:
    """One request in flight: its response, its deadline, and what ``done()`` releases (body, timer, host slot)."""

    stack: ExitStack
    resp: requests.Response | None = None
    status: int | None = None
    deadline: Deadline | None = None

    def done(self) -> None:
        self.stack.close()


class PoliteFetcher:
    """Shared, thread-safe fetcher: robots cache, TDMRep cache and per-host throttle are per origin."""

    def __init__(self, settings: FetcherSettings, allow: HostAllowList, fetch_log: FetchLog | None = None) -> None:
        self.s = settings
        self.allow = allow
        self.guard = AddressGuard(settings.allow_private_addresses, settings.dns_timeout_s)
        self.throttle = HostThrottle()
        self.fetch_log = fetch_log
        self._robots: dict[str, _Robots] = {}
        self._tdm: dict[str, list[dict[str, Any]]] = {}
        self._origin_locks: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()
        # hosts that asked (Retry-After) for a longer pause than this crawl waits: skipped until then
        self._backed_off: dict[str, tuple[float, int, str]] = {}
        self._local = threading.local()
        # origins whose robots.txt could not be read this run (5xx, timeout, network): nothing is fetched
        # from them (RFC 9309 2.3.1.4) and the crawl keeps their earlier pages as stale, not gone
        self.robots_unreachable: dict[str, str] = {}

    # -- sessions: one per thread (requests.Session is not thread-safe); no cookies, no env proxies/netrc
    def _session(self) -> requests.Session:
        sess = getattr(self._local, "session", None)
        if sess is None:
            sess = requests.Session()
            sess.trust_env = False
            sess.cookies.set_policy(http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))
            adapter = _guarded_adapter(self.guard)
            sess.mount("http://", adapter)
            sess.mount("https://", adapter)
            sess.headers.clear()
            sess.headers.update({"User-Agent": self.s.user_agent, "Accept-Encoding": "gzip, deflate",
                                 "Connection": "keep-alive"})
            self._local.session = sess
        return sess

    def close(self) -> None:
        sess = getattr(self._local, "session", None)
        if sess is not None:
            sess.close()

    def _log(self, r: FetchResult, **extra: Any) -> FetchResult:
        if self.fetch_log is not None:
            self.fetch_log.write(r, **extra)
        return r

    def _origin_lock(self, org: str) -> threading.Lock:
        with self._lock:
            return self._origin_locks.setdefault(org, threading.Lock())

    # -- pre-connection checks --------------------------------------------------------------
    def _check_target(self, url: str) -> FetchResult | None:
        reason = self.allow.check(url)
        if reason:
            return FetchResult(url, Decision.REFUSED_ALLOWLIST, reason)
        p = urlsplit(url)
        try:
            self.guard.resolve(p.hostname or "", p.port or (443 if p.scheme == "https" else 80))
        except AddressRefused as e:
            return FetchResult(url, Decision.REFUSED_ADDRESS, str(e))
        except (socket.gaierror, UnicodeError) as e:
            return FetchResult(url, Decision.ERROR, f"DNS resolution failed for {p.hostname}: {e}")
        return None

    def delay_for(self, org: str) -> float:
        delay = self.s.min_delay_s
        rb = self._robots.get(org)
        if rb and rb.parser is not None:
            cd = rb.parser.crawl_delay(self.s.agent_token)
            if cd:
                delay = max(delay, float(cd))
            rr = rb.parser.request_rate(self.s.agent_token)
            if rr and rr.requests:
                delay = max(delay, rr.seconds / rr.requests)
        return delay

    def robots_sitemaps(self, org: str) -> list[str]:
        """Absolute URLs of the ``Sitemap:`` lines of an origin's robots.txt."""
        rb = self.robots(org)
        if rb.parser is None:
            return []
        out = []
        for sm in rb.parser.sitemaps:
            u = normalize_url(str(sm), org + "/")
            if u:
                out.append(u)
        return list(dict.fromkeys(out))

    def robots(self, org: str) -> _Robots:
        """robots.txt of an origin, fetched once and refreshed after a day (RFC 9309 status rules)."""
        with self._origin_lock(org):
            rb = self._robots.get(org)
            if rb and time.monotonic() - rb.fetched < self.s.robots_ttl_s:
                return rb
            url = org + "/robots.txt"
            res = self._get(url, accept_types=None, max_bytes=ROBOTS_MAX_BYTES, truncate=True, policy_checks=False,
                            kind="robots")
            if res.decision == Decision.FETCHED and res.status and 200 <= res.status < 300:
                text = (res.body or b"").decode("utf-8", errors="replace")
                try:
                    rb = _Robots(Protego.parse(text), True, time.monotonic(), "parsed")
                except Exception as e:  # noqa: BLE001 - garbage robots.txt: protego is lenient, but be safe
                    rb = _Robots(None, True, time.monotonic(), f"unparseable robots.txt ({e}); allow all")
            elif res.status is not None and 400 <= res.status < 500 and res.status != 429:
                rb = _Robots(None, True, time.monotonic(), f"robots.txt HTTP {res.status}: allow all")
            else:
                # RFC 9309 2.3.1.4: unreachable (5xx, 429, timeout, network) = complete disallow. The crawl
                # keeps this host's earlier pages as stale instead of counting them gone
                rb = _Robots(None, False, time.monotonic(),
                             f"robots.txt unreachable ({res.reason or res.status}): disallow all, earlier pages kept")
                self.robots_unreachable[org] = rb.note
            if rb.note != "parsed":
                (log.warning if not rb.allow_all else log.info)("%s: %s", url, rb.note)
            if rb.allow_all or rb.parser is not None:
                self.robots_unreachable.pop(org, None)
            self._robots[org] = rb
            # the Crawl-delay is only known now: the request after robots.txt must wait for it too
            self.throttle.pause(urlsplit(org).netloc, min(self.delay_for(org), self.s.max_crawl_delay_s))
            return rb

    def robots_allows(self, url: str) -> tuple[bool, str]:
        rb = self.robots(origin(url))
        if rb.parser is None:
            return rb.allow_all, rb.note
        delay = self.delay_for(origin(url))
        if delay > self.s.max_crawl_delay_s:
            return False, (f"robots.txt asks for {delay:.0f}s between requests (Crawl-delay/Request-rate), more than "
                           f"max_crawl_delay_s {self.s.max_crawl_delay_s:.0f}; host skipped")
        # every reading of the path must be allowed (an encoded slash that a server decodes is one)
        ok = all(rb.parser.can_fetch(u, self.s.agent_token) for u in url_readings(url))
        return ok, "" if ok else "disallowed by robots.txt"

    def tdm_reserved(self, url: str) -> str | None:
        """TDMRep (W3C CG): /.well-known/tdmrep.json rules whose location matches the path, reservation 1."""
        org = origin(url)
        with self._origin_lock(org + "#tdm"):
            rules = self._tdm.get(org)
            if rules is None:
                rules = []
                well_known = org + "/.well-known/tdmrep.json"
                allowed, _ = self.robots_allows(well_known)
                if allowed:
                    res = self._get(well_known, accept_types=None, max_bytes=256 * 1024, policy_checks=False,
                                    kind="tdmrep")
                    if res.decision == Decision.FETCHED and res.status == 200 and res.body:
                        try:
                            data = json.loads(res.body.decode("utf-8", errors="replace"))
                            rules = [r for r in data if isinstance(r, dict)] if isinstance(data, list) else []
                        except json.JSONDecodeError:
                            log.warning("%s: not valid JSON; ignored", well_known)
                self._tdm[org] = rules
        paths = [request_target(u) for u in url_readings(url)]
        for rule in rules:
            loc = str(rule.get("location", ""))
            if loc and any(_wildcard_match(loc, path) for path in paths) and str(rule.get("tdm-reservation", "0")) == "1":
                policy = rule.get("tdm-policy")
                return f"TDM reservation in /.well-known/tdmrep.json ({loc})" + (f", policy {policy}" if policy else "")
        return None

    # -- the request loop -------------------------------------------------------------------
    def fetch(self, url: str, etag: str | None = None, last_modified: str | None = None,
              accept_types: tuple[str, ...] = PAGE_TYPES, kind: str = "page") -> FetchResult:
        """Fetch one page under every rule; the decision is logged and returned, never raised."""
        try:
            res = self._get(url, accept_types=accept_types, max_bytes=self.s.max_bytes, etag=etag,
                            last_modified=last_modified, policy_checks=True, kind=kind, log_it=False)
        except Exception as e:  # noqa: BLE001 - an unexpected failure is an outcome, not a crash
            log.exception("unexpected error fetching %s", url)
            res = FetchResult(url, Decision.ERROR, f"unexpected {type(e).__name__}: {e}")
        return self._log(res, kind=kind)

    def _get(self, url: str, *, accept_types: tuple[str, ...] | None, max_bytes: int, etag: str | None = None,
             last_modified: str | None = None, truncate: bool = False, policy_checks: bool = True,
             kind: str = "page", log_it: bool = True) -> FetchResult:
        try:
            res = self._get_inner(url, accept_types, max_bytes, etag, last_modified, truncate, policy_checks)
        except _Abort as a:
            res = a.result
        except Exception as e:  # noqa: BLE001
            log.exception("unexpected error fetching %s", url)
            res = FetchResult(url, Decision.ERROR, f"unexpected {type(e).__name__}: {e}")
        if log_it:
            self._log(res, kind=kind)
        return res

    def _get_inner(self, url: str, accept_types: tuple[str, ...] | None, max_bytes: int, etag: str | None,
                   last_modified: str | None, truncate: bool, policy_checks: bool) -> FetchResult:
        first_url = url
        current = canonical_url(url)  # checks and request see one form (scrapers/urls.py)
        if current is None:
            return FetchResult(redact(url), Decision.ERROR, "unusable URL (no http(s) host, credentials, or "
                                                            "control characters)")
        seen: set[str] = set()
        for _hop in range(MAX_REDIRECTS + 1):
            refusal = self._check_target(current)
            if refusal is None and policy_checks:
                allowed, why = self.robots_allows(current)
                if not allowed:
                    refusal = FetchResult(current, Decision.REFUSED_ROBOTS, why,
                                          robots_unreachable=origin(current) in self.robots_unreachable)
                else:
                    tdm = self.tdm_reserved(current)
                    if tdm:
                        refusal = FetchResult(current, Decision.REFUSED_OPTOUT, tdm)
            if refusal is not None:
                if current != first_url:
                    if current != canonical_url(first_url):
                        refusal.reason = f"redirect to {current}: {refusal.reason}"
                    refusal.url, refusal.final_url = first_url, current
                return refusal
            seen.add(current)
            headers = {}
            if etag:
                headers["If-None-Match"] = etag
            if last_modified:
                headers["If-Modified-Since"] = last_modified
            op = self._request(first_url, current, headers)
            if op.status in (301, 302, 303, 307, 308):
                try:
                    loc = op.resp.headers.get("Location")
                finally:
                    op.done()
                nxt = canonical_url(loc, current) if loc else None  # normalized, then checked like any URL
                if not nxt:
                    return FetchResult(first_url, Decision.ERROR, f"HTTP {op.status} without a usable Location",
                                       op.status, final_url=current)
                if nxt in seen:
                    return FetchResult(first_url, Decision.ERROR, f"redirect loop at {nxt}", op.status, final_url=nxt)
                if urlsplit(nxt).netloc != urlsplit(current).netloc:
                    etag = last_modified = None  # validators belong to the host that issued them
                current = nxt
                continue
            return self._finish(first_url, current, op, accept_types, max_bytes, truncate, policy_checks)
        return FetchResult(first_url, Decision.ERROR, f"more than {MAX_REDIRECTS} redirects", final_url=current)

    def _prepare(self, first_url: str, url: str, headers: dict[str, str]) -> requests.PreparedRequest:
        """The request for ``url``, refused unless its target is byte for byte the URL that was checked."""
        prep = self._session().prepare_request(requests.Request("GET", url, headers=headers))
        sent = urlsplit(prep.url)
        want = urlsplit(url)
        if prep.path_url != request_target(url) or sent.netloc.lower() != want.netloc or sent.scheme != want.scheme:
            raise _Abort(FetchResult(first_url, Decision.ERROR, f"request target {prep.url!r} differs from the "
                                                                f"checked URL {url!r}; not sent", final_url=url))
        return prep

    def _request(self, first_url: str, url: str, headers: dict[str, str]) -> _Open:
        """One GET in the host's slot, retried on 429/503 (Retry-After), 5xx and network errors.

        The slot (one request at a time per host, the delay counted from the end of the previous
        response) is held until the caller has read the body and called ``done()``.
        """
        org = origin(url)
        host = urlsplit(url).netloc
        prep = self._prepare(first_url, url, headers)
        attempt = 0
        while True:
            off = self._backed_off.get(host)
            if off and off[0] > time.monotonic():
                raise _Abort(FetchResult(first_url, Decision.ERROR, off[2], off[1], final_url=url))
            op = _Open(ExitStack())
            op.stack.enter_context(self.throttle.slot(host, min(self.delay_for(org), self.s.max_crawl_delay_s)))
            try:
                res = self._attempt(first_url, url, prep, op, org, host, attempt)
            except BaseException:
                op.done()  # never leave the host's slot held
                raise
            if res is not None:
                return res
            attempt += 1

    def _attempt(self, first_url: str, url: str, prep: requests.PreparedRequest, op: _Open, org: str, host: str,
                 attempt: int) -> _Open | None:
        """One try: the open response to use, None to try again (slot released), or _Abort."""
        op.deadline = Deadline(self.s.request_deadline_s)
        op.stack.callback(op.deadline.cancel)
        err = None
        try:
            _current.deadline = op.deadline
            op.resp = self._session().send(prep, allow_redirects=False, stream=True,
                                           timeout=(self.s.timeout_s, self.s.timeout_s))
            op.stack.callback(op.resp.close)  # runs before the slot is released (LIFO)
            op.status = op.resp.status_code
        except requests.RequestException as e:
            err = e
        finally:
            _current.deadline = None
        if op.deadline.fired:
            op.done()
            raise _Abort(FetchResult(first_url, Decision.ERROR, op.deadline.reason, op.status, final_url=url))
        resp, status = op.resp, op.status
        wait = None
        if err is None and status in (429, 503):
            ra = _retry_after(resp.headers.get("Retry-After"))
            if ra is not None and ra > self.s.max_retry_after_s:
                # the server wants a longer pause than this crawl waits: honor it by leaving the
                # whole host alone until then (its remaining URLs are errors; stored pages are kept)
                why = (f"HTTP {status}: Retry-After {ra:.0f}s exceeds the {self.s.max_retry_after_s:.0f}s "
                       f"bound; host backed off")
                self._backed_off[host] = (time.monotonic() + ra, status, why)
                self.throttle.pause(host, ra)
                op.done()
                raise _Abort(FetchResult(first_url, Decision.ERROR, why, status, final_url=url))
            wait = ra if ra is not None else self._backoff(org, attempt)
        elif err is None and 500 <= status < 600:
            wait = self._backoff(org, attempt)
        elif err is not None:
            if "address refused" in str(err):
                op.done()
                raise _Abort(FetchResult(first_url, Decision.REFUSED_ADDRESS, f"at connect: {err}",
                                         final_url=url))
            wait = self._backoff(org, attempt)
        if wait is None:
            return op
        if attempt >= self.s.max_retries:
            op.done()
            what = f"HTTP {status}" if err is None else f"{type(err).__name__}: {err}"
            raise _Abort(FetchResult(first_url, Decision.ERROR,
                                     f"{what} after {attempt + 1} attempt(s)", status, final_url=url))
        self.throttle.pause(host, wait)
        op.done()
        return None

    def _backoff(self, org: str, attempt: int) -> float:
        return min(max(self.delay_for(org), 0.5) * (2 ** attempt), self.s.max_retry_after_s)

    def _finish(self, first_url: str, url: str, op: _Open, accept_types: tuple[str, ...] | None, max_bytes: int,
                truncate: bool, policy_checks: bool) -> FetchResult:
        resp, status = op.resp, op.status
        h = resp.headers
        base = dict(status=status, final_url=url, etag=h.get("ETag"), last_modified=h.get("Last-Modified"),
                    content_type=h.get("Content-Type"))
        try:
            if status == 304:
                return FetchResult(first_url, Decision.NOT_MODIFIED, "304 Not Modified", **base)
            if not 200 <= status < 300:
                if not policy_checks:
                    # robots.txt / tdmrep.json: a 4xx is a valid answer ("no rules"), not a failed request
                    return FetchResult(first_url, Decision.FETCHED, f"HTTP {status}", **base)
                return FetchResult(first_url, Decision.ERROR, f"HTTP {status}", **base)
            nofollow = False
            if policy_checks:
                directives = _robots_directives(h.get_all("X-Robots-Tag") if hasattr(h, "get_all") else
                                                [v for k, v in h.items() if k.lower() == "x-robots-tag"],
                                                self.s.agent_token)
                if self.s.respect_noindex and "noindex" in directives:
                    return FetchResult(first_url, Decision.REFUSED_OPTOUT, "X-Robots-Tag: noindex", **base)
                if h.get("tdm-reservation", "").strip() == "1":
                    return FetchResult(first_url, Decision.REFUSED_OPTOUT, "tdm-reservation: 1 header", **base)
                nofollow = "nofollow" in directives
            ctype = (h.get("Content-Type") or "").split(";")[0].strip().lower()
            if accept_types is not None and ctype not in accept_types:
                return FetchResult(first_url, Decision.REFUSED_TYPE, f"content type {ctype or '(none)'!r}", **base)
            length = h.get("Content-Length")
            if length and length.isdigit() and int(length) > max_bytes and not truncate:
                return FetchResult(first_url, Decision.REFUSED_SIZE,
                                   f"Content-Length {length} > max_bytes {max_bytes}", **base)
            try:
                decoder = BodyDecoder(h.get("Content-Encoding"), max_bytes)
            except ValueError as e:
                return FetchResult(first_url, Decision.REFUSED_TYPE, str(e), **base)
            body = self._read(resp, decoder, truncate)
            if op.deadline is not None and op.deadline.fired:  # the cut may have looked like a clean end of body
                return FetchResult(first_url, Decision.ERROR, op.deadline.reason, **base)
            if body is None:
                return FetchResult(first_url, Decision.REFUSED_SIZE,
                                   f"body exceeds max_bytes {max_bytes} ({decoder.describe()})", **base)
            if policy_checks and accept_types is not None and looks_binary(body):
                return FetchResult(first_url, Decision.REFUSED_TYPE,
                                   f"binary body labelled {ctype or '(no content type)'}", **base)
            res = FetchResult(first_url, Decision.FETCHED, "", body=body, nofollow=nofollow, **base)
            if policy_checks and ctype in ("text/html", "application/xhtml+xml"):
                self._page_optouts(res)
            return res
        except (requests.RequestException, Urllib3Error, OSError, zlib.error) as e:
            if op.deadline is not None and op.deadline.fired:
                return FetchResult(first_url, Decision.ERROR, op.deadline.reason, **base)
            return FetchResult(first_url, Decision.ERROR, f"reading body: {type(e).__name__}: {e}", **base)
        finally:
            op.done()  # after the body: closes it, then starts the host's delay

    def _read(self, resp: requests.Response, decoder: BodyDecoder, truncate: bool) -> bytes | None:
        """Stream the raw (still encoded) body through our own bounded decoder; None past the decoded limit.

        urllib3 is told not to decode: its limits differ between versions, ours do not. The total
        deadline (``Deadline``) cuts a slow-drip body; ``read1`` returns what one read gives.
        """
        raw = resp.raw
        while True:
            chunk = raw.read1(64 * 1024, decode_content=False)
            if not chunk:
                break
            if not decoder.feed(chunk):
                return decoder.body()[:decoder.limit] if truncate else None
        if not decoder.finish():
            return decoder.body()[:decoder.limit] if truncate else None
        return decoder.body()

    def _page_optouts(self, res: FetchResult) -> None:
        """<meta name=robots|ouragent content=noindex/nofollow> and <meta name=tdm-reservation content=1>."""
        text, _ = decode_body(res.body or b"", res.content_type)
        res.text = text
        try:
            doc = lxml.html.document_fromstring(text.encode("utf-8"), parser=_UTF8_PARSER)
        except (ValueError, lxml.etree.ParserError):
            return
        robots_vals, tdm = [], None
        for meta in doc.iter("meta"):
            name = (meta.get("name") or "").strip().lower()
            content = meta.get("content") or ""
            if name in ("robots", self.s.agent_token):
                robots_vals.append(content)
            elif name == "tdm-reservation":
                tdm = content.strip()
        directives = _robots_directives(robots_vals, self.s.agent_token)
        if self.s.respect_noindex and "noindex" in directives:
            res.decision, res.reason, res.body = Decision.REFUSED_OPTOUT, "meta robots noindex", None
        elif tdm == "1":
            res.decision, res.reason, res.body = Decision.REFUSED_OPTOUT, "meta tdm-reservation=1", None
        res.nofollow = res.nofollow or "nofollow" in directives
        if res.decision == Decision.FETCHED:
            base = doc.find(".//base")
            res_base = urljoin(res.final_url or res.url, base.get("href")) if base is not None and base.get("href") \
                else (res.final_url or res.url)
            res.links = [] if res.nofollow else _links(doc, res_base)


_UTF8_PARSER = lxml.html.HTMLParser(encoding="utf-8", remove_comments=True)


def _links(doc: lxml.html.HtmlElement, base: str) -> list[str]:
    out: list[str] = []
    for a in doc.iter("a"):
        href = a.get("href")
        if not href or "nofollow" in (a.get("rel") or "").lower().split():
            continue
        u = normalize_url(href, base)
        if u and u.startswith(("http://", "https://")):
            out.append(u)
    return list(dict.fromkeys(out))
