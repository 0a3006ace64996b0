"""The connection layer of the polite fetcher: which addresses may be contacted (public only, also
when an IPv6 address embeds an IPv4 one: mapped, compatible, 6to4, NAT64, Teredo; checked again at
connect time), bounded DNS lookups, and one total deadline per request (DNS, connect, headers, body)."""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import NewConnectionError
from urllib3.util import connection as u3connection

# --------------------------------------------------------------------------- address guard
_CGNAT = ipaddress.ip_network("100.64.0.0/10")


_METADATA = {ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254"),
             ipaddress.ip_address("100.100.100.200")}


class AddressRefused(OSError):
    """Raised at the socket layer when a connection would reach a refused address."""


_NAT64 = ipaddress.ip_network("64:ff9b::/96")  # RFC 6052 well-known prefix: v4 in the last 32 bits


_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")  # RFC 8215 local-use prefix: v4 in bits 48-63 and 72-87


_DNS_POOL = ThreadPoolExecutor(max_workers=8, thread_name_prefix="dns")  # bounded: a hung resolver holds a slot


def embedded_ipv4(ip: ipaddress.IPv6Address) -> list[tuple[str, ipaddress.IPv4Address]]:
    """IPv4 addresses an IPv6 address carries (and reaches through a relay or translator), with the form's name."""
    n = int(ip)
    out: list[tuple[str, ipaddress.IPv4Address]] = []
    if ip.ipv4_mapped:
        out.append(("IPv4-mapped", ip.ipv4_mapped))
    if n >> 32 == 0 and n > 1:  # ::a.b.c.d (deprecated IPv4-compatible; :: and ::1 are not)
        out.append(("IPv4-compatible", ipaddress.IPv4Address(n & 0xFFFFFFFF)))
    if ip.sixtofour:
        out.append(("6to4", ip.sixtofour))
    if ip in _NAT64:
        out.append(("NAT64", ipaddress.IPv4Address(n & 0xFFFFFFFF)))
    if ip in _NAT64_LOCAL:
        out.append(("NAT64 local-use", ipaddress.IPv4Address((((n >> 64) & 0xFFFF) << 16) | ((n >> 40) & 0xFFFF))))
    if ip.teredo:
        server, client = ip.teredo  # the client address is stored XOR 0xffffffff; ipaddress undoes it
        out += [("Teredo server", server), ("Teredo client", client)]
    return out


class AddressGuard:
    """Refuses loopback, private, link-local, CGNAT, multicast, reserved and cloud-metadata addresses, and IPv6
    addresses that embed one (IPv4-mapped/compatible, 6to4, NAT64, Teredo). ``allowed`` (the demo's loopback)
    applies to an address itself or its IPv4-mapped form, never to an address reached through a translator."""

    def __init__(self, allowed: list[str], dns_timeout_s: float = 5.0) -> None:
        self.allowed = [ipaddress.ip_network(a, strict=False) for a in allowed]
        self.dns_timeout_s = dns_timeout_s

    def why_refused(self, ip_text: str) -> str | None:
        ip = ipaddress.ip_address(ip_text.split("%", 1)[0])
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
            ip = ip.ipv4_mapped  # the same endpoint: the kernel connects to the IPv4 address
        if any(ip in net for net in self.allowed):
            return None
        if isinstance(ip, ipaddress.IPv6Address):
            for form, v4 in embedded_ipv4(ip):
                if (why := self._class(v4)) is not None:
                    return f"{ip} embeds {v4} ({form}), {why}"
            if ip in _NAT64_LOCAL:
                return f"{ip} is in the local-use NAT64 prefix 64:ff9b:1::/48"
        why = self._class(ip)
        return f"{ip} is {why}" if why else None

    @staticmethod
    def _class(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
        """Why ``ip`` itself is not a public address (None when it is)."""
        if ip in _METADATA:
            return "a cloud metadata address"
        for attr, label in (("is_loopback", "loopback"), ("is_link_local", "link-local"),
                            ("is_multicast", "multicast"), ("is_unspecified", "unspecified"),
                            ("is_private", "private"), ("is_reserved", "reserved")):
            if getattr(ip, attr):
                return f"a {label} address"
        if ip.version == 4 and ip in _CGNAT:
            return "a CGNAT (100.64/10) address"
        if not ip.is_global:
            return "not a global address"
        return None

    def lookup(self, host: str, port: int, timeout: float | None = None) -> list[str]:
        """getaddrinfo bounded by ``dns_timeout_s`` (and ``timeout``): the system resolver has no deadline."""
        try:
            return [str(ipaddress.ip_address(host.strip("[]").split("%", 1)[0]))]
        except ValueError:
            pass
        limit = self.dns_timeout_s if timeout is None else max(0.0, min(self.dns_timeout_s, timeout))
        fut = _DNS_POOL.submit(socket.getaddrinfo, host, port, type=socket.SOCK_STREAM)
        try:
            infos = fut.result(timeout=limit)
        except FutureTimeout:
            fut.cancel()
            raise socket.gaierror(f"DNS lookup of {host} timed out after {limit:.1f}s (scrape.dns_timeout_s)") from None
        return list(dict.fromkeys(info[4][0] for info in infos))

    def resolve(self, host: str, port: int, timeout: float | None = None) -> list[str]:
        """All addresses of ``host``; raises AddressRefused if any is refused (no partial trust)."""
        ips = self.lookup(host, port, timeout)
        for ip in ips:
            reason = self.why_refused(ip)
            if reason:
                raise AddressRefused(f"{host} resolves to {reason}")
        return ips


# --------------------------------------------------------------------------- total deadline
class Deadline:
    """A total time limit for one request: DNS, connect, TLS, headers and body together.

    Socket timeouts bound each read, not their sum, so a server that trickles a byte now and then never
    trips them. A timer shuts the request's sockets down when the time is up; the blocked read returns
    at once and the fetcher, seeing ``fired``, reports a deadline error (even where the cut looked like
    a normal end of body).
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.end = time.monotonic() + seconds
        self.fired = False
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._fire)
        self._timer.daemon = True
        self._timer.start()

    def remaining(self) -> float:
        return self.end - time.monotonic()

    def attach(self, sock: socket.socket | None) -> None:
        if sock is None:
            return
        with self._lock:
            if sock not in self._socks:
                self._socks.append(sock)
            fired = self.fired
        if fired:
            _shutdown(sock)

    def _fire(self) -> None:
        with self._lock:
            self.fired = True
            socks = list(self._socks)
        for sock in socks:
            _shutdown(sock)

    def cancel(self) -> None:
        self._timer.cancel()

    @property
    def reason(self) -> str:
        return f"deadline: request not complete within {self.seconds:g}s (scrape.request_deadline_s)"


def _shutdown(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


_current = threading.local()  # the Deadline of the request this thread is making


def _deadline() -> Deadline | None:
    return getattr(_current, "deadline", None)


def _guarded_adapter(guard: AddressGuard) -> HTTPAdapter:
    """An adapter whose sockets connect only to addresses the guard accepts (checked at connect time)."""

    def new_conn(self: HTTPConnection) -> socket.socket:
        dl = _deadline()
        remaining = dl.remaining() if dl else None
        if remaining is not None and remaining <= 0:
            raise NewConnectionError(self, dl.reason)
        try:
            ips = guard.resolve(self._dns_host, self.port, remaining)
        except AddressRefused as e:
            raise NewConnectionError(self, f"address refused: {e}") from e
        except socket.gaierror as e:
            raise NewConnectionError(self, f"DNS resolution failed for {self._dns_host}: {e}") from e
        err: OSError | None = None
        for ip in ips:
            timeout = self.timeout
            if dl is not None:  # the connect may not outlive the request's deadline
                left = max(dl.remaining(), 0.001)
                timeout = min(timeout, left) if isinstance(timeout, (int, float)) else left
            try:
                sock = u3connection.create_connection((ip, self.port), timeout,
                                                      source_address=self.source_address,
                                                      socket_options=self.socket_options)
            except OSError as e:
                err = e
                continue
            if dl is not None:
                dl.attach(sock)  # from here the deadline can cut TLS, headers and body
            return sock
        raise NewConnectionError(self, f"Failed to establish a new connection: {err}")

    def request(self: HTTPConnection, *args: Any, **kwargs: Any) -> None:
        dl = _deadline()
        if dl is not None:
            dl.attach(self.sock)  # a kept-alive connection: its socket was made for an earlier request
        return HTTPConnection.request(self, *args, **kwargs)

    conn_http = type("GuardedHTTPConnection", (HTTPConnection,), {"_new_conn": new_conn, "request": request})
    conn_https = type("GuardedHTTPSConnection", (HTTPSConnection,), {"_new_conn": new_conn, "request": request})
    pool_http = type("GuardedHTTPPool", (HTTPConnectionPool,), {"ConnectionCls": conn_http})
    pool_https = type("GuardedHTTPSPool", (HTTPSConnectionPool,), {"ConnectionCls": conn_https})

    class Adapter(HTTPAdapter):
        def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
            super().init_poolmanager(*args, **kwargs)
            self.poolmanager.pool_classes_by_scheme = {"http": pool_http, "https": pool_https}

    return Adapter(max_retries=0, pool_connections=4, pool_maxsize=4)
