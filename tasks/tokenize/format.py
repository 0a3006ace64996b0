"""What the writer, the token cache and the training reader agree on about the bytes on disk: the
directory a tokenizer's data lives in and the width of a token id. A file of its own, so the stages
that write (mix through the cache, tokenize) declare it and the reader (loader.py) stays out of
their fingerprints."""

from __future__ import annotations

import pyarrow as pa


def tokenizer_dir_name(tok_fp: str) -> str:
    """``tokenized/<this>/`` and ``tokcache/<this>/``: the tokenizer fingerprint's first 16 hex digits."""
    return tok_fp[:16]


def id_dtype(vocab_size: int) -> pa.DataType:
    return pa.uint16() if vocab_size <= 65_536 else pa.uint32()
