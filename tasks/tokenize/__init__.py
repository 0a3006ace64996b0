"""Tokenize + pack: the mixed documents become packed Arrow shards for training.

``run_tokenize`` (``stage.py``) reads ``mix/``, encodes each document once per tokenizer through the
token cache (``cache.py``), packs rows of ``seq_len`` with document boundaries (``pack.py``) and writes
``tokenized/<tokenizer>/{train,eval}/shard-*.arrow``. ``loader.py`` is the training side: the
O(1)-resumable reader. Editing the reader re-runs no data stage (the stage fingerprints name files).
"""

from tasks.tokenize.stage import main, run_tokenize, tokenize

__all__ = ["main", "run_tokenize", "tokenize"]
