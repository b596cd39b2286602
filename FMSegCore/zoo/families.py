"""The model families: for each network FMSeg has, its loader, the interfaces it implements and the zoo cards it
adds. A new family is one model file plus one :class:`Family` entry: in :data:`BUILTIN_FAMILIES`, or in
another package through the ``fmseg.families`` entry point group (the entry point names a :class:`Family`).

Torch-free: loaders are named as ``module:function`` and imported only when a model is loaded, so clients
without torch (Slicer's panel) can ask what each model does.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import threading
from dataclasses import dataclass
from typing import Any, Callable, Optional

from FMSegCore.errors import ModelError

#: The entry point group other packages register families under.
ENTRY_POINT_GROUP = "fmseg.families"

#: What a client can do with a model, by the interfaces its family implements (first match wins).
PROMPTABLE = "promptable"
INCONTEXT = "incontext"
#: A card whose weights FMSeg can fetch but no family of it runs (yet).
WEIGHTS_ONLY = "weights only"
#: The task interfaces: what a client can do with a model that implements one, and in how many dimensions.
_TASK_INTERFACES = {"PromptableModel3D": (PROMPTABLE, 3), "PromptableModel2D": (PROMPTABLE, 2),
                    "InContextModel3D": (INCONTEXT, 3), "InContextModel2D": (INCONTEXT, 2)}
#: Interface names a family may declare (those of :mod:`FMSegCore.models.interfaces`).
INTERFACE_NAMES = ("PromptableModel2D", "PromptableModel3D", "InContextModel2D", "InContextModel3D",
                   "StochasticInContextModel2D", "InteractiveInContextModel2D", "AdaptableModel")
#: The interface of in-context models that draw candidate segmentations (the in-context option ``candidates``).
STOCHASTIC = "StochasticInContextModel2D"


@dataclass(frozen=True)
class Family:
    """One network: the ``architecture`` id its cards name, how a checkpoint becomes the network, what it does.

    ``loader`` is ``"module:function"``; the function takes ``(checkpoint path, device, trainable=False)`` and
    returns the network in eval mode (``trainable=True``: a copy adaptation may train, e.g. not fused).
    ``implements`` names interfaces of :mod:`FMSegCore.models.interfaces`; a loaded network is checked
    against them. ``cards``: zoo cards this family adds (:class:`~FMSegCore.zoo.registry.ModelCard`).
    """

    name: str
    loader: str
    implements: tuple[str, ...] = ()
    cards: tuple[Any, ...] = ()
    title: str = ""

    def __post_init__(self) -> None:
        unknown = [name for name in self.implements if name not in INTERFACE_NAMES]
        if unknown or ":" not in self.loader:
            raise ModelError(f"family {self.name!r}: " + (f"unknown interface(s) {', '.join(unknown)} (known: "
                             f"{', '.join(INTERFACE_NAMES)})" if unknown else
                             f"loader {self.loader!r} must be 'module:function'"))

    @property
    def kind(self) -> str:
        """promptable, incontext, or 'weights only' when it implements no interface an engine runs."""
        return self._task()[0]

    @property
    def dims(self) -> Optional[int]:
        """2 or 3 for the model's task interface, None for none."""
        return self._task()[1]

    def _task(self) -> tuple[str, Optional[int]]:
        """(kind, dims) of the first task interface the family implements (3-D before 2-D)."""
        return next((task for interface, task in _TASK_INTERFACES.items() if interface in self.implements),
                    (WEIGHTS_ONLY, None))

    def load_function(self) -> Callable[..., Any]:
        """The loader function, imported now."""
        module, _, function = self.loader.partition(":")
        try:
            return getattr(importlib.import_module(module), function)
        except (ImportError, AttributeError) as error:
            raise ModelError(f"family {self.name!r}: cannot import its loader {self.loader} ({error})") from None


BUILTIN_FAMILIES = (
    Family("litemedsam", "FMSegCore.models.litemedsam:load_litemedsam", ("PromptableModel2D", "AdaptableModel"),
           title="LiteMedSAM (TinyViT encoder, SAM prompt decoder)"),
    Family("medsam", "FMSegCore.models.medsam:load_medsam", ("PromptableModel2D",),
           title="MedSAM (SAM ViT-B)"),
    Family("universeg", "FMSegCore.models.universeg:load_universeg", ("InContextModel2D",),
           title="UniverSeg v1"),
    Family("tyche", "FMSegCore.models.tyche:load_tyche", ("InContextModel2D", "StochasticInContextModel2D"),
           title="Tyche v1 (stochastic in-context)"),
    Family("multiverseg", "FMSegCore.models.multiverseg:load_multiverseg",
           ("InContextModel2D", "InteractiveInContextModel2D"), title="MultiverSeg v1 (interactive in-context)"),
    Family("sam-med3d", "FMSegCore.models.sam_med3d:load_sam_med3d", ("PromptableModel3D",),
           title="SAM-Med3D (ViT-B 3-D, 128^3 crops at 1.5 mm)"),
    Family("vista3d", "FMSegCore.models.vista3d:load_vista3d", ("PromptableModel3D",),
           title="VISTA3D (MONAI vista3d132: 3-D clicks; its classes automatically)"),
    Family("iris", "FMSegCore.models.iris:load_iris", ("InContextModel3D",),
           title="3-D in-context network (Iris-style)"),
    # Swin UNETR: the SuPreM and FSEFT layouts load and are checked, but no engine runs the network yet.
    Family("swinunetr", "FMSegCore.models.swinunetr:load_swinunetr_model", (), title="Swin UNETR (MONAI)"),
)

_FAMILIES: dict[str, Family] = {}
_LOCK = threading.RLock()
_DISCOVERED = False


def _discover() -> None:
    """Register the built-in families, then those other installed packages declare (once per process)."""
    global _DISCOVERED
    with _LOCK:
        if _DISCOVERED:
            return
        _DISCOVERED = True
        for family in BUILTIN_FAMILIES:
            _FAMILIES.setdefault(family.name, family)
        for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            try:
                family = entry.load()
            except Exception as error:  # a broken plug-in must not break FMSeg: say which one
                raise ModelError(f"model family plug-in {entry.name!r} ({entry.value}) fails to load: "
                                 f"{type(error).__name__}: {error}") from None
            if not isinstance(family, Family):
                raise ModelError(f"model family plug-in {entry.name!r} ({entry.value}) is not a Family")
            register_family(family)


def register_family(family: Family) -> None:
    """Add a family and its cards; a name (of the family or of a card) already taken is a :class:`ModelError`."""
    from FMSegCore.zoo.registry import add_cards

    with _LOCK:
        _discover()
        known = _FAMILIES.get(family.name)
        if known is not None and known != family:
            raise ModelError(f"model family {family.name!r} is registered twice")
        if known is None:
            add_cards(family.cards)
            _FAMILIES[family.name] = family


def unregister_family(name: str) -> None:
    """Remove a registered family and the cards it added (for plug-ins unloaded at run time, and tests)."""
    from FMSegCore.zoo.registry import remove_cards

    with _LOCK:
        family = _FAMILIES.pop(name, None)
        if family is not None:
            remove_cards([card.name for card in family.cards])


def families() -> list[Family]:
    """Every registered family."""
    with _LOCK:
        _discover()
        return list(_FAMILIES.values())


def family_of(card: Any) -> Optional[Family]:
    """The family that runs ``card`` (by its ``architecture``), or None."""
    with _LOCK:
        _discover()
        return _FAMILIES.get(card.architecture or "")


def model_kind(card: Any) -> str:
    """What a client can do with the card's model: promptable, incontext or 'weights only'."""
    family = family_of(card)
    return family.kind if family is not None else WEIGHTS_ONLY


def model_dims(card: Any) -> Optional[int]:
    """2 or 3 (the family's task interface), None for a model nothing runs."""
    family = family_of(card)
    return family.dims if family is not None else None


def is_stochastic(card: Any) -> bool:
    """The card's model draws candidate segmentations (its family implements :data:`STOCHASTIC`, as Tyche's)."""
    family = family_of(card)
    return family is not None and STOCHASTIC in family.implements


def require_kind(name: str, kind: str, dims: Optional[int] = None) -> Any:
    """The card ``name`` when its model is of ``kind`` (and, given ``dims``, works in those dimensions); else a
    one-line :class:`ModelError`. The one rule CLI, worker and Slicer apply before loading anything."""
    from FMSegCore.zoo.registry import get_card

    card = get_card(name)
    if model_kind(card) != kind:
        raise ModelError(f"model '{name}' is not a {kind} model (it is {model_kind(card)})")
    if dims is not None and model_dims(card) != dims:
        raise ModelError(f"model '{name}' is a {model_dims(card)}-D {kind} model; this engine runs {dims}-D ones "
                         "only so far")
    return card
