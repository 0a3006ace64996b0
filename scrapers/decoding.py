"""Response bodies decoded by the project itself, whatever urllib3 does: gzip (multi-member too) and
deflate, at most MAX_ENCODINGS stacked, a bounded chunk at a time, stopped at a decoded-size limit."""

from __future__ import annotations

import zlib
from collections.abc import Iterator

# ------------------------------------------------------------------------ content decoding
DECODE_CHUNK = 64 * 1024


MAX_ENCODINGS = 3  # "gzip, gzip" is legal; a longer stack is an attack on the decoder, not a page


class _Inflater:
    """One gzip or deflate layer; never returns more than DECODE_CHUNK bytes per piece (no bomb in memory)."""

    def __init__(self, coding: str) -> None:
        self.coding = coding
        self._gzip = coding in ("gzip", "x-gzip")
        self._d = zlib.decompressobj(16 + zlib.MAX_WBITS) if self._gzip else None
        self._head = b""

    def decompress(self, data: bytes) -> Iterator[bytes]:
        if self._d is None:  # deflate: zlib-wrapped as RFC 9110 says, or raw deflate as some servers send
            self._head += data
            if len(self._head) < 2:
                return
            data, self._head = self._head, b""
            zlib_wrapped = data[0] & 0x0F == 8 and (data[0] << 8 | data[1]) % 31 == 0
            self._d = zlib.decompressobj(zlib.MAX_WBITS if zlib_wrapped else -zlib.MAX_WBITS)
        while data:
            if self._d.eof:
                if not (self._gzip and data.startswith(b"\x1f\x8b")):
                    return  # bytes after the end of the stream are ignored (as browsers do)
                self._d = zlib.decompressobj(16 + zlib.MAX_WBITS)  # the next gzip member
            out = self._d.decompress(data, DECODE_CHUNK)
            if out:
                yield out
            data = self._d.unconsumed_tail or (self._d.unused_data if self._d.eof else b"")
        while self._d is not None and not self._d.eof and (out := self._d.decompress(b"", DECODE_CHUNK)):
            yield out

    def finish(self) -> Iterator[bytes]:
        if self._head:
            yield from self.decompress(b"\0")  # a 1-byte deflate body: let zlib reject it
        if self._d is not None and not self._d.eof:
            raise zlib.error(f"{self.coding} body ends before its compressed stream does")


class BodyDecoder:
    """Undoes Content-Encoding layers itself, counting decoded bytes as they appear; stops above ``limit``.

    The limit holds whatever urllib3 version is installed and however the layers are stacked: each
    layer yields at most DECODE_CHUNK bytes at a time, so a 1 KB response that inflates to 1 GB costs
    ``limit`` bytes of memory, not 1 GB. Encoded bytes count against the limit too.
    """

    def __init__(self, header: str | None, limit: int) -> None:
        codings = [c.strip().lower() for c in (header or "").split(",") if c.strip()]
        codings = [c for c in codings if c != "identity"]
        if len(codings) > MAX_ENCODINGS:
            raise ValueError(f"Content-Encoding {header!r}: more than {MAX_ENCODINGS} layers")
        unknown = [c for c in codings if c not in ("gzip", "x-gzip", "deflate")]
        if unknown:
            raise ValueError(f"unsupported Content-Encoding {', '.join(unknown)!r} (we accept gzip, deflate)")
        self.codings = codings
        self._layers = [_Inflater(c) for c in reversed(codings)]  # the last one applied is undone first
        self.limit = limit
        self.raw_bytes = 0
        self.size = 0
        self._chunks: list[bytes] = []

    def _push(self, i: int, data: bytes) -> bool:
        if i == len(self._layers):
            self.size += len(data)
            self._chunks.append(data)
            return self.size <= self.limit
        return all(self._push(i + 1, out) for out in self._layers[i].decompress(data))

    def feed(self, data: bytes) -> bool:
        """False as soon as the encoded or the decoded size passes the limit."""
        self.raw_bytes += len(data)
        return self.raw_bytes <= self.limit and self._push(0, data)

    def finish(self) -> bool:
        if self.raw_bytes == 0:
            return True  # an empty body (204, HEAD-like) labelled with an encoding
        for i, layer in enumerate(self._layers):
            if not all(self._push(i + 1, out) for out in layer.finish()):
                return False
        return True

    def body(self) -> bytes:
        return b"".join(self._chunks)

    def describe(self) -> str:
        enc = ", ".join(self.codings) or "identity"
        return f"{self.size:,} bytes decoded so far from {self.raw_bytes:,} received, Content-Encoding {enc}"
