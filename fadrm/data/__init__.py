"""Datasets: facts table, raw sources, the prepared (validated, hashed, cached) form."""
