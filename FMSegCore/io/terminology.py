"""Standard terminology (SNOMED CT codes, DICOM's anatomic region context) for structures FMSeg knows by name,
in the string form 3D Slicer stores in a segment's ``TerminologyEntry`` tag."""

from __future__ import annotations

import re
from typing import Optional

#: SNOMED CT code and meaning per structure name (names as TotalSegmentator-style datasets write them).
ANATOMY: dict[str, tuple[str, str]] = {
    "liver": ("10200004", "Liver"),
    "spleen": ("78961009", "Spleen"),
    "kidney_right": ("9846003", "Right kidney"),
    "kidney_left": ("18639004", "Left kidney"),
    "kidney": ("64033007", "Kidney"),
    "pancreas": ("15776009", "Pancreas"),
    "gallbladder": ("28231008", "Gallbladder"),
    "stomach": ("69695003", "Stomach"),
    "aorta": ("15825003", "Aorta"),
    "inferior_vena_cava": ("64131007", "Inferior vena cava"),
    "esophagus": ("32849002", "Esophagus"),
    "duodenum": ("38848004", "Duodenum"),
    "small_bowel": ("30315005", "Small intestine"),
    "colon": ("71854001", "Colon"),
    "urinary_bladder": ("89837001", "Urinary bladder"),
    "prostate": ("41216001", "Prostate"),
    "heart": ("80891009", "Heart"),
    "lung_right": ("3341006", "Right lung"),
    "lung_left": ("44029006", "Left lung"),
    "lung": ("39607008", "Lung"),
    "brain": ("12738006", "Brain"),
}
_ALIASES = {"right_kidney": "kidney_right", "left_kidney": "kidney_left", "right_lung": "lung_right",
            "left_lung": "lung_left", "bladder": "urinary_bladder", "ivc": "inferior_vena_cava",
            "gall_bladder": "gallbladder", "small_intestine": "small_bowel"}
_CATEGORY = "SCT^123037004^Anatomical Structure"


def _key(name: str) -> str:
    key = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
    return _ALIASES.get(key, key)


def anatomy_code(name: str) -> Optional[tuple[str, str]]:
    """(SNOMED CT code, meaning) of a structure name, or None when FMSeg does not know it."""
    return ANATOMY.get(_key(name))


def terminology_entry(name: str) -> Optional[str]:
    """Slicer's ``TerminologyEntry`` tag value for a known structure name, else None."""
    code = anatomy_code(name)
    if code is None:
        return None
    return (f"Segmentation category and type - 3D Slicer General Anatomy list~{_CATEGORY}~SCT^{code[0]}^{code[1]}"
            "~^^~Anatomic codes - DICOM master list~^^~^^")
