"""Names users type (--labels, --classes, --structures): comma lists, forgiving matching, closest names offered for
an unknown one (never a list cut short), and a label map without names says where names come from."""

from __future__ import annotations

import numpy as np
import pytest

from FMSegCore.engines.incontext.support import SupportSet, example_from_arrays
from FMSegCore.errors import InputError
from FMSegCore.io.labelmap import SegmentInfo
from FMSegCore.names import closest_names, name_key, split_names, unknown_name

NAMES = [f"rib {side} {n}" for side in ("left", "right") for n in range(1, 13)] + ["liver", "spleen", "kidney_left"]


def test_comma_lists_and_forgiving_keys():
    assert split_names(["liver,spleen", " aorta ", "3", ",,"]) == ["liver", "spleen", "aorta", "3"]
    assert name_key("Kidney_Left") == name_key("kidney-left") == name_key("kidney  left") == "kidney left"


def test_an_unknown_name_gets_the_closest_names_even_far_down_a_long_list():
    assert closest_names("splen", NAMES)[0] == "spleen"
    assert closest_names("kidney left", NAMES) == ["kidney_left"]
    message = unknown_name("label", "livr", NAMES, "the supports")
    assert "'liver'" in message and "27 in all" in message and "\n" not in message


def _support(named: bool) -> SupportSet:
    labels = np.zeros((4, 8, 8), np.int16)
    labels[1, 2:4, 2:4], labels[2, 5:7, 5:7] = 1, 2
    segments = [SegmentInfo(1, "liver", (1, 0, 0)), SegmentInfo(2, "spleen", (0, 1, 0))] if named else None
    return SupportSet([example_from_arrays(np.random.default_rng(0).random((4, 8, 8)), labels, segments, "s")])


def test_supports_resolve_comma_lists_and_explain_unnamed_label_maps():
    assert [s.name for s in _support(True).resolve(["spleen,liver"])] == ["spleen", "liver"]
    with pytest.raises(InputError, match="unknown label 'splen'; the supports name 'liver', 'spleen'"):
        _support(True).resolve(["splen"])
    with pytest.raises(InputError, match=r"labels.json.*label values instead \(1, 2\)"):
        _support(False).resolve(["liver"])
    assert [s.value for s in _support(False).resolve(["2,1"])] == [2, 1]
