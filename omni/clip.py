"""CLIP's ViT image tower as Mini-Omni2 runs it: all 50 token features, projected (docs/model.md §7).

Mini-Omni2 pins a fork of OpenAI CLIP whose `encode_image` returns every token after `ln_post`
times `proj` (class + 7 x 7 patches) instead of the pooled class token. This module builds the same
tower from torch's own layers, with CLIP's parameter names, so OpenAI's released `ViT-B-32.pt` (a
TorchScript archive) loads strictly; no CLIP package is needed (they import torchvision).
"""
from __future__ import annotations

import pickle
import re
import warnings
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn as nn

from .errors import CheckpointError
from .image import IMAGE_SIZE
from .tokens import IMAGE_TOKENS

VISUAL_PREFIX = "visual."
HEAD_SIZE = 64  # CLIP: attention heads = width // 64
MLP_RATIO = 4
QUICK_GELU_SCALE = 1.702  # CLIP's sigmoid approximation of GELU
PROJECTIONS = ("proj", "text_projection")  # bare Parameters that CLIP's convert_weights rounds too


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(QUICK_GELU_SCALE * x)


class ResidualBlock(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(width, width // HEAD_SIZE)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict(c_fc=nn.Linear(width, width * MLP_RATIO), gelu=QuickGELU(),
                                             c_proj=nn.Linear(width * MLP_RATIO, width)))
        self.ln_2 = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (T, B, C): sequence first, as CLIP runs it
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class VisionTower(nn.Module):
    """`(B, 3, 224, 224)` normalised pixels -> `(B, 50, output_dim)` projected token features."""

    def __init__(self, width: int, layers: int, patch_size: int, grid: int, output_dim: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.empty(width))
        self.positional_embedding = nn.Parameter(torch.empty(grid * grid + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.Sequential(*(ResidualBlock(width) for _ in range(layers)))
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(torch.empty(width, output_dim))

    @property
    def output_dim(self) -> int:
        return self.proj.size(1)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.conv1(pixels.to(self.proj.dtype))  # (B, C, grid, grid)
        x = x.flatten(2).transpose(1, 2)  # (B, grid * grid, C)
        cls = self.class_embedding.expand(x.size(0), 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding  # (B, 50, C)
        x = self.ln_pre(x).transpose(0, 1)  # (50, B, C)
        x = self.transformer.resblocks(x).transpose(0, 1)  # (B, 50, C)
        return self.ln_post(x) @ self.proj  # (B, 50, output_dim): every token, not just the class one


def read_visual_state(path: Path) -> dict[str, torch.Tensor]:
    """The `visual.*` tensors of a CLIP file: OpenAI's TorchScript archive or a plain state dict."""
    try:
        with warnings.catch_warnings():  # TorchScript is deprecated, but it is the format OpenAI released
            warnings.simplefilter("ignore", DeprecationWarning)
            state = torch.jit.load(str(path), map_location="cpu").state_dict()
    except RuntimeError:  # not TorchScript: the clip package then tries a plain torch.load too
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError, pickle.UnpicklingError) as e:
            raise CheckpointError(f"cannot read {path} as a CLIP model ({e})") from e
    visual = {k.removeprefix(VISUAL_PREFIX): v for k, v in state.items() if k.startswith(VISUAL_PREFIX)}
    if "proj" not in visual or "conv1.weight" not in visual:
        raise CheckpointError(f"{path} holds no CLIP ViT image tower (no visual.proj / visual.conv1.weight)")
    return visual


def fp16_valued(model: nn.Module) -> set[str]:
    """Names of the tensors the official loader rounds to fp16 before running in fp32 on CPU: weights
    and biases of convolutions, linear and attention layers, and the projections (CLIP's
    `convert_weights`)."""
    names = set()
    for prefix, module in model.named_modules():
        stem = f"{prefix}." if prefix else ""
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            names.update(f"{stem}{p}" for p, _ in module.named_parameters(recurse=False))
        elif isinstance(module, nn.MultiheadAttention):
            names.update(f"{stem}{p}" for p in ("in_proj_weight", "in_proj_bias"))
        names.update(f"{stem}{p}" for p in PROJECTIONS if isinstance(getattr(module, p, None), nn.Parameter))
    return names


def load_vision_tower(path: Path, device: torch.device) -> VisionTower:
    """Strictly load the image tower of a CLIP ViT file onto `device`, in fp32 with the official
    weight precision; it must see 224 px images as 50 tokens."""
    state = read_visual_state(path)
    width, _, patch_size, _ = state["conv1.weight"].shape
    grid = round((state["positional_embedding"].size(0) - 1) ** 0.5)
    layers = len([k for k in state if re.fullmatch(r"transformer\.resblocks\.\d+\.attn\.in_proj_weight", k)])
    if patch_size * grid != IMAGE_SIZE or grid * grid + 1 != IMAGE_TOKENS:
        raise CheckpointError(f"{path}: a {patch_size} px patch x {grid} grid tower does not turn {IMAGE_SIZE} px "
                              f"images into the {IMAGE_TOKENS} tokens Mini-Omni2 expects (ViT-B/32)")
    with torch.device("meta"):
        tower = VisionTower(width, layers, patch_size, grid, state["proj"].size(1))
    rounded = fp16_valued(tower)
    state = {k: (v.half() if k in rounded else v).float() for k, v in state.items()}
    try:
        tower.load_state_dict(state, assign=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path} does not match CLIP's ViT layout: {e}") from e
    return tower.to(device).eval()
