"""One URL form for every check and every request (RFC 3986 section 6 normalization, made strict).

Each check (robots.txt, include scope, TDMRep, allow-list) and the request line that is sent use the
same string, ``canonical_url(...)``; the fetcher refuses to send a request whose target differs from
it. Otherwise a link like ``/recipes/../private/x`` is *checked* as written and *requested* as
``/private/x`` by requests/urllib3 or by the server.

The form:
- absolute, no fragment, no userinfo; scheme and host lower case (IDN hosts in punycode), no default port;
- percent-encoding normalized: ``%XX`` of an unreserved character decoded (``%2e`` -> ``.``,
  ``%7E`` -> ``~``), every other escape upper-cased, characters not allowed in a path/query encoded
  (UTF-8), a stray ``%`` encoded as ``%25``; this is a fixed point of requests' ``requote_uri``, so
  what we check is what requests sends;
- empty path segments collapsed (``//`` -> ``/``, as nginx and Apache resolve them), then dot
  segments removed (RFC 3986 5.2.4), so no ``.`` / ``..`` / ``//`` is ever sent for a server to
  resolve differently;
- encoded slashes ``%2F`` (and backslashes ``%5C``) are kept encoded, never turned into a separator.
  Some servers decode them anyway, so ``path_readings`` also returns the path as such a server would
  read it; a URL is allowed only when every reading is allowed.
"""

from __future__ import annotations

import re
import string
from urllib.parse import urldefrag, urljoin, urlsplit, urlunsplit

_DEFAULT_PORTS = {"http": 80, "https": 443}
_UNRESERVED = frozenset(string.ascii_letters + string.digits + "-._~")
_SUB_DELIMS = "!$&'()*+,;="
_PATH_OK = _UNRESERVED | frozenset(_SUB_DELIMS + ":@/")
_QUERY_OK = _PATH_OK | frozenset("?")
_HEX = frozenset(string.hexdigits)
_ENCODED_SEPARATOR = re.compile(r"%(?:2F|5C)", re.IGNORECASE)


def _pct(s: str, allowed: frozenset[str]) -> str:
    """Normalize percent-encoding: decode unreserved escapes, upper-case the rest, encode the rest."""
    out: list[str] = []
    i, n = 0, len(s)
    while i < n:
        c = s[i]
        if c == "%" and i + 2 < n and s[i + 1] in _HEX and s[i + 2] in _HEX:
            ch = chr(int(s[i + 1:i + 3], 16))
            out.append(ch if ch in _UNRESERVED else "%" + s[i + 1:i + 3].upper())
            i += 3
            continue
        if c in allowed:
            out.append(c)
        else:
            out.extend(f"%{b:02X}" for b in c.encode("utf-8", "surrogatepass"))
        i += 1
    return "".join(out)


def remove_dot_segments(path: str) -> str:
    """RFC 3986 5.2.4 on an absolute path ("/a/b/../c/./d" -> "/a/c/d"); "." and ".." never survive."""
    out: list[str] = []
    segments = path.split("/")[1:] if path.startswith("/") else path.split("/")
    for i, seg in enumerate(segments):
        last = i == len(segments) - 1
        if seg == "..":
            if out:
                out.pop()
            if last:
                out.append("")
        elif seg == ".":
            if last:
                out.append("")
        else:
            out.append(seg)
    return "/" + "/".join(out)


def _clean_path(path: str) -> str:
    path = _pct(path or "/", _PATH_OK)
    if not path.startswith("/"):
        path = "/" + path
    path = re.sub(r"/{2,}", "/", path)  # empty segments: servers merge them, so the checks must too
    return remove_dot_segments(path)


def canonical_url(url: str, base: str | None = None) -> str | None:
    """The one form of ``url`` (resolved against ``base``) that is checked and sent; None if unusable."""
    try:
        url = url.strip()
        if any(ord(c) < 0x20 or ord(c) == 0x7F for c in url):
            return None  # control characters (a CR/LF in a link) never reach a request line
        url = urljoin(base, url) if base else url
        url, _ = urldefrag(url)
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    host = parts.hostname
    if not scheme or not host or parts.username is not None or parts.password is not None:
        return None
    host = host.lower().rstrip(".")
    if not host:
        return None
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    elif not host.isascii():
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError:
            return None
    netloc = host if port is None or _DEFAULT_PORTS.get(scheme) == port else f"{host}:{port}"
    query = _pct(parts.query, _QUERY_OK)
    return urlunsplit((scheme, netloc, _clean_path(parts.path), query, ""))


def request_target(url: str) -> str:
    """path + query of a canonical URL: the request-target the server must receive."""
    p = urlsplit(url)
    return (p.path or "/") + (f"?{p.query}" if p.query else "")


def path_readings(url: str) -> list[str]:
    """The canonical path, and (if it holds %2F or %5C) the path as a server that decodes them reads it."""
    path = urlsplit(url).path or "/"
    readings = [path]
    if _ENCODED_SEPARATOR.search(path):
        readings.append(_clean_path(_ENCODED_SEPARATOR.sub("/", path)))
    return readings


def url_readings(url: str) -> list[str]:
    """``url`` once per path reading (same scheme, host and query), for checks that take a whole URL."""
    p = urlsplit(url)
    return [urlunsplit((p.scheme, p.netloc, path, p.query, "")) for path in path_readings(url)]
