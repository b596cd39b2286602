"""Which slices an automatic adapter's training views come from: as many per structure, from where it is."""

from __future__ import annotations

import numpy as np

from FMSegCore.engines.adaptation.cases import case_from_arrays, resolve_structures
from FMSegCore.engines.adaptation.views import balanced_views, structure_slices
from FMSegCore.io.labelmap import default_segment


def labelled_volume() -> object:
    """40 axial slices: a large organ (1) on 0-29, a small one (2) on 30-33, another label (9) only on 34-39."""
    labels = np.zeros((40, 16, 16), dtype=np.int32)
    labels[0:30, 2:12, 2:12] = 1
    labels[30:34, 5:7, 5:7] = 2
    labels[34:40, 8:10, 8:10] = 9
    image = np.full(labels.shape, -1000.0, dtype=np.float32)
    segments = [default_segment(1, "liver"), default_segment(2, "kidney_left"), default_segment(9, "bladder")]
    return case_from_arrays(image, labels, segments, "case", (1.0, 1.0, 3.0), axis=2, modality="CT")


def test_each_structure_gets_the_same_number_of_views_from_its_own_slices():
    case = labelled_volume()
    structures = resolve_structures([case], ["liver", "kidney_left"])
    assert structure_slices(case, structures[1]) == [30, 31, 32, 33]
    views = balanced_views([case], structures, 12)
    slices = [index for _, index in views]
    assert len(views) == 12
    assert sum(30 <= i <= 33 for i in slices) == 6 and sum(i < 30 for i in slices) == 6
    assert not any(i >= 34 for i in slices)  # slices showing only an untrained label are not drawn
    assert len(set(i for i in slices if i < 30)) == 6  # spread over the liver's extent, not bunched
    # a count that does not divide: the first structures get one more each
    odd = balanced_views([case], resolve_structures([case], ["liver", "kidney_left", "bladder"]), 7)
    assert [sum(lo <= i <= hi for _, i in odd) for lo, hi in ((0, 29), (30, 33), (34, 39))] == [3, 2, 2]
