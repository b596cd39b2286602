"""Intensity normalisation, resampling and slice extraction: reusable pieces shared by every engine."""
