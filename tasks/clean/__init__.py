"""Clean + dedup: normalized text, boilerplate and PII removed, quality rejects kept with reasons, exact
and near-duplicates removed across the whole corpus on disk.

``stage.py`` is the stage (``run_clean``); ``rules.py`` the per-document rules; ``index.py`` the
incremental index; ``dedup.py`` the external-memory MinHash/LSH dedup.
"""

from tasks.clean.stage import clean, main, run_clean

__all__ = ["clean", "main", "run_clean"]
