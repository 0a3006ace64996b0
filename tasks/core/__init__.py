"""Shared infrastructure of the stages: config, manifests, text I/O, model loading, the Prefect shim."""
