"""Cohort runs (``fmseg batch``): many scans with one model load per worker, on this machine or a Ray cluster,
resumable, with a quality-control report."""
