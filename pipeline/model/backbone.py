"""ResNet backbone, sine positional encoding and the multi-scale input projections.

The backbone returns the stride-8/16/32 maps (layer2..4) of a torchvision ResNet with frozen
BatchNorm; the stem and layer1 are frozen as in DETR/DINO. :class:`MultiScaleFeatures` projects
each map to the transformer width and adds stride-2 convolutions for the extra levels (stride 64
for 4 levels), with a padding mask and a positional encoding per level.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from ...errors import LtDistillError
from .config import BackboneConfig


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d with fixed statistics and affine parameters (buffers, not parameters)."""

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # torchvision checkpoints carry a BatchNorm counter that a frozen norm has no use for.
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale[None, :, None, None] + shift[None, :, None, None]


def load_resnet_weights(resnet: nn.Module, path: str | Path) -> None:
    """Load a torchvision ResNet state_dict file (``torch.load(weights_only=True)``) into ``resnet``.

    The classifier (``fc.*``) is ignored; any other missing or unexpected key is an error.
    """
    path = Path(path)
    if not path.is_file():
        raise LtDistillError(f"backbone weights file not found: {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise LtDistillError(f"backbone weights file {path} does not hold a state_dict")
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    try:
        missing, unexpected = resnet.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # tensor shapes differ: another architecture
        raise LtDistillError(f"backbone weights file {path} does not fit this ResNet: {exc}") from exc
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing or unexpected:
        raise LtDistillError(
            f"backbone weights file {path} does not fit this ResNet: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )


class ResNetBackbone(nn.Module):
    """torchvision ResNet body -> feature maps of layer2, layer3, layer4 (strides 8, 16, 32)."""

    def __init__(self, name: str, weights: str | Path | None = None, train_backbone: bool = True):
        super().__init__()
        resnet = getattr(torchvision.models, name)(weights=None, norm_layer=FrozenBatchNorm2d)
        if weights is not None:
            load_resnet_weights(resnet, weights)
        self.stem = nn.Sequential(resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool)
        self.layer1, self.layer2, self.layer3, self.layer4 = resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4
        for module_name, param in self.named_parameters():
            trainable = train_backbone and module_name.startswith(("layer2", "layer3", "layer4"))
            param.requires_grad_(trainable)
        expansion = 4 if name in ("resnet50", "resnet101", "resnet152") else 1
        self.strides = [8, 16, 32]
        self.num_channels = [128 * expansion, 256 * expansion, 512 * expansion]

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        x = self.layer1(self.stem(images))
        c3 = self.layer2(x)
        c4 = self.layer3(c3)
        c5 = self.layer4(c4)
        return [c3, c4, c5]


class PositionEmbeddingSine(nn.Module):
    """Sine/cosine encoding of normalised (y, x) pixel positions -> ``(B, 2 * num_pos_feats, H, W)``.

    Position of the i-th valid row (column) = ``(i - offset) / n * 2 pi`` for i = 1..n; offset 0 is
    DINO's ``PositionEmbeddingSineHW`` (models/dino/position_encoding.py), 0.5 the pixel centres."""

    def __init__(self, num_pos_feats: int, temperature: float = 10000.0, offset: float = 0.0):
        super().__init__()
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.offset = offset

    def forward(self, mask: torch.Tensor) -> torch.Tensor:
        not_mask = (~mask).float()
        y = not_mask.cumsum(1)
        x = not_mask.cumsum(2)
        # Normalised by the valid (unpadded) extent, times 2*pi.
        y = (y - self.offset) / (y[:, -1:, :] + 1e-6) * 2 * math.pi
        x = (x - self.offset) / (x[:, :, -1:] + 1e-6) * 2 * math.pi
        dim_t = torch.arange(self.num_pos_feats, dtype=torch.float32, device=mask.device)
        dim_t = self.temperature ** (2 * (dim_t // 2) / self.num_pos_feats)
        pos_x = x[..., None] / dim_t
        pos_y = y[..., None] / dim_t
        pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).flatten(3)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


class MultiScaleFeatures(nn.Module):
    """Backbone + input projections: images -> per-level (feature, padding mask, positional encoding).

    Levels 0..2 are 1x1 projections of the backbone maps; each further level is a 3x3 stride-2
    convolution of the previous one (the first of them reads the last backbone map), as in DINO.
    """

    def __init__(self, backbone: ResNetBackbone, hidden_dim: int, num_levels: int, pe_temperature: float,
                 pe_offset: float = 0.0):
        super().__init__()
        self.backbone = backbone
        self.num_levels = num_levels
        projections = [
            nn.Sequential(nn.Conv2d(c, hidden_dim, kernel_size=1), nn.GroupNorm(32, hidden_dim))
            for c in backbone.num_channels
        ]
        in_channels = backbone.num_channels[-1]
        for _ in range(num_levels - len(backbone.num_channels)):
            projections.append(
                nn.Sequential(
                    nn.Conv2d(in_channels, hidden_dim, kernel_size=3, stride=2, padding=1),
                    nn.GroupNorm(32, hidden_dim),
                )
            )
            in_channels = hidden_dim
        self.input_proj = nn.ModuleList(projections)
        self.position_embedding = PositionEmbeddingSine(hidden_dim // 2, pe_temperature, pe_offset)
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.constant_(proj[0].bias, 0)

    def forward(
        self, images: torch.Tensor, pixel_mask: torch.Tensor
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """images ``(B, 3, H, W)``, pixel_mask bool ``(B, H, W)`` True on padding ->
        lists over levels of features ``(B, D, h, w)``, masks bool ``(B, h, w)``, encodings ``(B, D, h, w)``."""
        feats = self.backbone(images)
        srcs = [proj(f) for proj, f in zip(self.input_proj, feats)]
        last = feats[-1]
        for proj in self.input_proj[len(feats):]:
            last = proj(last)
            srcs.append(last)
        masks = [F.interpolate(pixel_mask[None].float(), size=s.shape[-2:])[0].bool() for s in srcs]
        pos = [self.position_embedding(m).to(s.dtype) for s, m in zip(srcs, masks)]
        return srcs, masks, pos


def build_backbone(cfg: BackboneConfig, hidden_dim: int, num_levels: int, pe_temperature: float,
                   pe_offset: float = 0.0) -> MultiScaleFeatures:
    body = ResNetBackbone(cfg.name, cfg.weights, cfg.train_backbone)
    return MultiScaleFeatures(body, hidden_dim, num_levels, pe_temperature, pe_offset)
