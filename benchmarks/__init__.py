"""Benchmarks: outside the installed packages and every stage fingerprint. Run from the repo root:
python -m benchmarks.<name> --help"""
