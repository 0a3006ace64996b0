"""Prefect flows: the whole data-to-adapter DAG and its stages."""
