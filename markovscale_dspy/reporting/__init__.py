"""Reporting layer: evaluation and method comparison, text and Markdown reports, plots."""
