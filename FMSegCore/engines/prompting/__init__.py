"""Promptable segmentation: boxes, ROIs and points per named segment, carried through volumes."""
