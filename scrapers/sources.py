"""Load-time checks of a sources file: every source must be able to receive pages, and no two may claim them.

The crawler routes a URL to the source whose ``include`` prefix on the same host is the longest match
(``scrapers.crawl.Router``). So two sources with the same host and the same prefix leave the second without
a single page, and a prefix that stops inside a path segment (``/wiki/E``) claims every page whose name
merely starts the same way (``/wiki/Egg``, ``/wiki/Europe``). Both are configuration errors, reported at
load time naming the sources involved. Nested prefixes (``/`` and ``/recipes/``) are fine: the longer wins.

Works on any objects with ``id``, ``kind``, ``start_urls``, ``sitemaps`` and ``include`` (the pydantic
``SourceConfig``), so it imports nothing from tasks/.
"""

from __future__ import annotations

from typing import Any, Protocol
from urllib.parse import urlsplit

from scrapers.common import normalize_url

# a prefix may end with one of these (or be a whole path): "/wiki/Cookbook:" and "/product/" are deliberate
_BOUNDARY = set("/:-_.=?&~+,;")


class _Source(Protocol):
    id: str
    kind: str
    start_urls: list[str]
    sitemaps: list[str]
    include: list[str]


def source_scopes(s: _Source) -> list[tuple[str, str]]:
    """(host, path prefix) pairs a web source claims, as the router computes them."""
    prefixes = list(s.include) or sorted({urlsplit(u).path.rsplit("/", 1)[0] + "/" for u in s.start_urls})
    hosts = sorted({urlsplit(normalize_url(u) or u).netloc for u in [*s.start_urls, *s.sitemaps]})
    return [(h, p) for h in hosts for p in prefixes]


def source_conflicts(sources: list[Any]) -> list[str]:
    """One message per problem: a prefix ending inside a path segment, or a host+prefix claimed twice."""
    problems: list[str] = []
    claimed: dict[tuple[str, str], str] = {}
    for s in sources:
        if getattr(s, "kind", "web") != "web":
            continue
        for p in s.include:
            if not p.startswith("/"):
                problems.append(f"source {s.id!r}: include prefix {p!r} must start with '/'")
            elif p[-1] not in _BOUNDARY:
                problems.append(
                    f"source {s.id!r}: include prefix {p!r} ends inside a path segment, so it also matches every "
                    f"path that merely starts with it ({p}a..., {p}z...); end it with '/' or a separator such "
                    f"as ':' or '-', or list the exact prefixes")
        for scope in source_scopes(s):
            other = claimed.get(scope)
            if other is not None and other != s.id:
                problems.append(
                    f"sources {other!r} and {s.id!r} both include {scope[0]}{scope[1]}: every page there goes to "
                    f"{other!r}, so {s.id!r} never receives one; give each source its own host or path prefix")
            else:
                claimed[scope] = s.id
    return problems
