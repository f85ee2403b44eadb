"""Sparse and modality-routed blocks on one grouping primitive; usable without `mot`."""
