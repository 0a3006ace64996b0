"""Pipeline stages: plain functions (``run_<stage>``) under thin Prefect task wrappers, one module per stage."""
