"""What you do with a trained adapter: generate, export (merge), promote, report."""
