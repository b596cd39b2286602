"""Write the MedSAM (SAM ViT-B) fixture ``Testing/Data/reference/medsam.{keys.json,npz}`` with the official
segment-anything code, as ../shared/reference made the others: every official tensor filled by the fixtures'
``reference_tensor`` rule, fixed synthetic inputs, the official outputs.

Run once, by hand, with the official package unpacked somewhere (it is not a dependency of FMSeg and nothing of
it is stored here)::

    pip download --no-deps segment-anything==1.0 -d /tmp/sa && unzip -q /tmp/sa/*.whl -d /tmp/sa
    python Utilities/references/make_medsam_fixture.py /tmp/sa

The package's ``__init__`` imports torchvision (its predictor); only ``segment_anything.modeling`` is imported.
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "Testing"))
from reference_fixtures import REFERENCE, reference_tensor  # noqa: E402


def official_modeling(unpacked: Path) -> types.ModuleType:
    package = types.ModuleType("segment_anything")
    package.__path__ = [str(unpacked / "segment_anything")]
    sys.modules["segment_anything"] = package
    import segment_anything.modeling as modeling

    return modeling


def build_official(modeling: types.ModuleType) -> torch.nn.Module:
    """segment_anything.build_sam._build_sam for ViT-B (768, depth 12, 12 heads, global [2, 5, 8, 11])."""
    from functools import partial

    return modeling.Sam(
        image_encoder=modeling.ImageEncoderViT(
            depth=12, embed_dim=768, img_size=1024, mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=12, patch_size=16, qkv_bias=True,
            use_rel_pos=True, global_attn_indexes=[2, 5, 8, 11], window_size=14, out_chans=256),
        prompt_encoder=modeling.PromptEncoder(embed_dim=256, image_embedding_size=(64, 64),
                                              input_image_size=(1024, 1024), mask_in_chans=16),
        mask_decoder=modeling.MaskDecoder(num_multimask_outputs=3, transformer=modeling.TwoWayTransformer(
            depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8), transformer_dim=256, iou_head_depth=3,
            iou_head_hidden_dim=256),
        pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375])


def main(unpacked: Path) -> None:
    torch.set_num_threads(2)
    model = build_official(official_modeling(unpacked))
    layout = [[key, list(value.shape), str(value.dtype).removeprefix("torch.")]
              for key, value in model.state_dict().items()]
    model.load_state_dict({key: reference_tensor(key, tuple(shape), getattr(torch, dtype))
                           for key, shape, dtype in layout}, strict=True)
    model.eval()
    yy, xx = np.mgrid[0:1024, 0:1024] / 1023.0
    image = 0.2 + 0.1 * xx + 0.6 * np.exp(-((xx - 0.45) ** 2 + (yy - 0.55) ** 2) / 0.02)
    image_u8 = np.round(255 * (image - image.min()) / (image.max() - image.min())).astype(np.uint8)
    x = torch.from_numpy(image_u8).float().div(255)[None, None].expand(1, 3, -1, -1).contiguous()
    box = np.array([[300, 380, 620, 760]], dtype=np.float32)  # x0, y0, x1, y1 in 1024-pixel coordinates
    point = np.array([[[460, 560]]], dtype=np.float32)
    out: dict[str, np.ndarray] = {"image_u8": image_u8, "box": box, "point_coords": point,
                                  "point_labels": np.array([[1]], dtype=np.int64)}
    with torch.no_grad():
        embedding = model.image_encoder(x)  # MedSAM feeds [0, 1] images straight to the encoder
        out["image_embedding_every4"] = embedding[:, :, ::4, ::4].numpy()
        cases = {"box": dict(points=None, boxes=torch.from_numpy(box)[:, None, :]),
                 "box_point": dict(points=(torch.from_numpy(point), torch.tensor([[1]])),
                                   boxes=torch.from_numpy(box)[:, None, :])}
        for name, prompt in cases.items():
            sparse, dense = model.prompt_encoder(points=prompt["points"], boxes=prompt["boxes"][:, 0], masks=None)
            low, iou = model.mask_decoder(embedding, model.prompt_encoder.get_dense_pe(), sparse, dense, False)
            out[f"{name}.low_res_masks"], out[f"{name}.iou_predictions"] = low.numpy(), iou.numpy()
    np.savez_compressed(REFERENCE / "medsam.npz", **out)
    (REFERENCE / "medsam.keys.json").write_text(json.dumps({
        "name": "medsam", "official_repo": "segment-anything 1.0 (PyPI; facebookresearch/segment-anything)",
        "builder": "segment_anything.build_sam._build_sam, ViT-B settings (MedSAM = SAM ViT-B)",
        "checkpoint": {"file": "medsam_vit_b.pth", "wrapping": "plain state_dict"},
        "input": "image = u8 / 255 on 3 channels (1, 3, 1024, 1024); box x0, y0, x1, y1; points x, y",
        "state_dict": layout, "num_parameters": sum(p.numel() for p in model.parameters())}, indent=0))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
