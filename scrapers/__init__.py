"""Permission-aware scraping and per-category parsing.

- ``fetcher``: the polite fetcher (allow-list, address guard, robots.txt, delays, opt-outs, limits).
- ``crawl``: the persistent frontier and per-host crawl workers.
- ``testsite``: a loopback static site server for the demo and the tests.
- ``recipes``, ``products``, ``articles``, ``code``, ``additives``: one parser per category.
"""
