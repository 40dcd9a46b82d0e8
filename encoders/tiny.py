"""Tiny random-init backbones for tests, demos and smoke runs.

* ``TinyCNN``: 3 stride-2 conv+BN+ReLU stages (16/32/64 channels) then global
  average pool + Linear(64 -> 64).  A 64x64 image gives conv1 (n,16,32,32),
  conv2 (n,32,16,16), conv3 (n,64,8,8) and the embedding (n,64).
* ``build_tiny_vit``: a 2-block timm ``VisionTransformer`` (64 px, patch 8,
  width 64, 2 heads, CLS token): blocks.N give (n, 1 + 64, 64) tokens.
* ``build_tiny_clip``: a whole open_clip ``CLIP`` (both towers) at toy size: a 2-block
  ViT image tower (64 px, patch 8, width 64) and a 2-block text tower (width 64, the
  standard 77-token BPE tokenizer), joint embedding 64-d. Random init, so its text and
  image embeddings agree on nothing; tests use it for the CLIP code paths.
"""
from __future__ import annotations

import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
TINY_INPUT_SIZE = 64


def _stage(c_in: int, c_out: int) -> nn.Sequential:
    """conv3x3 stride 2 -> BN -> ReLU (not in-place, so hooks see clean outputs)."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel_size=3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(),
    )


class TinyCNN(nn.Module):
    """Small CNN: (n, 3, S, S) -> (n, embed_dim) embedding."""

    def __init__(self, widths: tuple[int, int, int] = (16, 32, 64), embed_dim: int = 64):
        super().__init__()
        self.conv1 = _stage(3, widths[0])
        self.conv2 = _stage(widths[0], widths[1])
        self.conv3 = _stage(widths[1], widths[2])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[2], embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (n, 3, S, S) -> (n, embed_dim)."""
        x = self.conv3(self.conv2(self.conv1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def build_tiny_cnn() -> TinyCNN:
    """Random-init TinyCNN (uses the current torch RNG)."""
    return TinyCNN()


def build_tiny_vit() -> nn.Module:
    """Random-init 2-block timm VisionTransformer for 64-px inputs (CLS token).

    A ``pretrained_cfg`` is attached so that ``timm.data.resolve_model_data_config``
    resolves the same preprocessing as the registry entry.
    """
    from timm.models.vision_transformer import VisionTransformer

    model = VisionTransformer(
        img_size=TINY_INPUT_SIZE, patch_size=8, embed_dim=64, depth=2, num_heads=2,
        num_classes=0, class_token=True, global_pool="token",
    )
    cfg = {
        "input_size": (3, TINY_INPUT_SIZE, TINY_INPUT_SIZE),
        "interpolation": "bicubic",
        "mean": IMAGENET_MEAN,
        "std": IMAGENET_STD,
        "crop_pct": 1.0,
        "crop_mode": "center",
        "num_classes": 0,
    }
    model.pretrained_cfg = cfg
    model.default_cfg = cfg
    return model


def build_tiny_clip() -> nn.Module:
    """Random-init open_clip CLIP for 64-px inputs: ViT image tower (2 blocks, width 64, CLS token),
    text tower (2 blocks, width 64, context 77), 64-d joint embedding.

    ``encode_image`` / ``encode_text`` work as for the real CLIPs; a ``pretrained_cfg`` is attached so
    that ``timm.data.resolve_model_data_config`` resolves the registry entry's preprocessing.
    """
    import open_clip
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    vision = CLIPVisionCfg(layers=2, width=64, head_width=32, patch_size=8, image_size=TINY_INPUT_SIZE)
    text = CLIPTextCfg(context_length=77, vocab_size=49408, width=64, heads=2, layers=2)
    model = open_clip.CLIP(embed_dim=64, vision_cfg=vision, text_cfg=text)
    cfg = {
        "input_size": (3, TINY_INPUT_SIZE, TINY_INPUT_SIZE),
        "interpolation": "bicubic",
        "mean": OPENAI_MEAN,
        "std": OPENAI_STD,
        "crop_pct": 1.0,
        "crop_mode": "center",
    }
    model.pretrained_cfg = cfg
    return model
