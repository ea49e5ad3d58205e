"""Frozen image encoders from open_clip, cut to their second-to-last block (BLIP2_FACTS.md s.1).

- ``eva``: open_clip ``EVA01-g-14`` (a timm ``eva_giant_patch14_224`` trunk, width 1408, 40 blocks):
  39 blocks kept, no final norm, all 257 tokens at 224 px.
- ``clip``: open_clip ``ViT-L-14`` with OpenAI weights (QuickGELU), 23 of 24 blocks, ``ln_pre``
  applied (it belongs to CLIP), no ``ln_post`` and no projection.
- ``tiny_eva`` / ``tiny_clip``: the same code paths at width 64, 4 blocks, 64 px, from local open_clip
  model configs; the tiny EVA is a timm ``Eva`` trunk registered as ``blip2_tiny_eva_patch8_64``.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import open_clip
import timm
import torch
import torch.nn.functional as F
from timm.models import register_model
from timm.models.eva import Eva
from torch import nn

log = logging.getLogger(__name__)

open_clip.add_model_config(Path(__file__).parent / "open_clip_configs")

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
QUICK_GELU_TAGS = ("openai",)  # OpenAI CLIP weights were trained with QuickGELU


@register_model
def blip2_tiny_eva_patch8_64(pretrained: bool = False, **kwargs) -> Eva:
    """A tiny EVA trunk (width 64, 4 blocks, 4 heads, patch 8, 64 px) for tests and the demo."""
    kwargs.pop("pretrained_cfg", None)
    kwargs.pop("pretrained_cfg_overlay", None)
    kwargs.pop("cache_dir", None)
    args = dict(img_size=64, patch_size=8, embed_dim=64, depth=4, num_heads=4, mlp_ratio=4.0, qkv_bias=True)
    args.update(kwargs)
    return Eva(**args)


def _load_error(cfg, err: Exception) -> RuntimeError:
    pretrained = cfg.pretrained
    if os.path.exists(str(pretrained)) or str(pretrained).endswith((".bin", ".pt", ".pth", ".safetensors")):
        hint = f"the file {pretrained} could not be read as {cfg.model_name} weights"
    else:
        source = open_clip.get_pretrained_cfg(cfg.model_name, pretrained) or {}
        where = source.get("hf_hub") or source.get("url") or "(unknown source)"
        hint = (f"open_clip tag {pretrained!r} of {cfg.model_name} needs a download from {where} "
                f"(open_clip_pytorch_model.bin or open_clip_model.safetensors)")
    return RuntimeError(
        f"Image encoder weights for encoder={cfg.name} could not be loaded: {hint}. "
        f"This machine cannot download them. Fetch the file where there is internet, copy it here and "
        f"pass encoder.pretrained=/path/to/that/file. For a randomly initialised encoder say so "
        f"explicitly with encoder.pretrained=null. ({err.__class__.__name__}: {str(err)[:200]})")


def resolve_weights(cfg) -> str | None:
    """The local weights file for ``encoder.pretrained`` (a path, or an open_clip tag fetched to the
    cache), resolved before the model is built so that a missing file fails in seconds."""
    pretrained = cfg.pretrained
    if not pretrained:
        return None
    if os.path.exists(str(pretrained)):
        return str(pretrained)
    source = open_clip.get_pretrained_cfg(cfg.model_name, pretrained)
    if not source:
        tags = open_clip.list_pretrained_tags_by_model(cfg.model_name)
        raise ValueError(f"encoder.pretrained={pretrained!r} is neither a file nor an open_clip tag of "
                         f"{cfg.model_name}; valid tags: {', '.join(tags) or 'none'}")
    cached = _cached_hub_file(source)
    if cached:
        return cached
    if not _hub_reachable():  # fail in seconds, not after minutes of retries
        raise _load_error(cfg, ConnectionError("the hub cannot be reached from this machine"))
    try:
        return open_clip.download_pretrained(source)
    except Exception as err:  # noqa: BLE001 - hub errors come in many types
        raise _load_error(cfg, err) from err


def _cached_hub_file(source: dict) -> str | None:
    from huggingface_hub import try_to_load_from_cache

    repo = (source.get("hf_hub") or "").strip("/")
    if not repo:
        return None
    for filename in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
        path = try_to_load_from_cache(repo, filename)
        if isinstance(path, str):
            return path
    return None


def _hub_reachable(timeout: float = 3.0) -> bool:
    import socket

    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _create_visual(cfg, device) -> nn.Module:
    weights = None if device == "meta" else resolve_weights(cfg)
    quick_gelu = bool(cfg.pretrained) and any(t in str(cfg.pretrained) for t in QUICK_GELU_TAGS)
    context = torch.device("meta") if device == "meta" else contextlib.nullcontext()
    with context:
        model = open_clip.create_model(cfg.model_name, pretrained=None, force_quick_gelu=quick_gelu,
                                       device="meta" if device == "meta" else "cpu")
    if weights:
        try:
            open_clip.load_checkpoint(model, weights, strict=False)
        except Exception as err:  # noqa: BLE001
            raise _load_error(cfg, err) from err
    return model.visual


class FrozenImageEncoder(nn.Module):
    """Image -> tokens of the second-to-last block, [B, N, W]; frozen unless ``freeze`` is false."""

    def __init__(self, cfg, device: str | torch.device = "cpu"):
        super().__init__()
        self.name = cfg.name
        visual = _create_visual(cfg, device)
        self.kind = "eva" if hasattr(visual, "trunk") else "clip"
        drop = int(cfg.drop_last_blocks)
        if self.kind == "eva":
            trunk = visual.trunk
            if cfg.image_size != trunk.patch_embed.img_size[0]:
                trunk.set_input_size(img_size=(cfg.image_size, cfg.image_size))
            trunk.blocks = trunk.blocks[: len(trunk.blocks) - drop] if drop else trunk.blocks
            trunk.norm = nn.Identity()  # tokens before any final norm
            trunk.fc_norm, trunk.head = nn.Identity(), nn.Identity()
            self.vit = trunk
            self.width = trunk.embed_dim
            grid = trunk.patch_embed.grid_size
            self.num_tokens = grid[0] * grid[1] + trunk.num_prefix_tokens
        else:
            if cfg.image_size != visual.image_size[0]:
                _resize_clip_positions(visual, cfg.image_size)
            blocks = visual.transformer.resblocks
            visual.transformer.resblocks = blocks[: len(blocks) - drop] if drop else blocks
            visual.ln_post, visual.proj = nn.Identity(), None
            self.vit = visual
            self.width = visual.transformer.width
            grid = visual.grid_size
            self.num_tokens = grid[0] * grid[1] + 1
        self.image_size = int(cfg.image_size)
        self.frozen = bool(cfg.freeze)
        self.dtype = DTYPES[cfg.precision]
        if device != "meta":
            self.vit.to(self.dtype)
        if self.frozen:
            self.vit.requires_grad_(False)
            self.vit.eval()

    def train(self, mode: bool = True):
        """A frozen encoder stays in eval mode whatever is asked (no dropout, fixed statistics)."""
        super().train(mode and not self.frozen)
        if self.frozen:
            self.vit.eval()
        return self

    def _tokens(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.dtype)
        if self.kind == "eva":
            return self.vit.forward_features(images)
        x = self.vit._embeds(images)  # patchify, class token, positions, ln_pre
        return self.vit.transformer(x)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> [B, N, W] in the encoder's precision (detached when frozen)."""
        if not self.frozen:
            return self._tokens(images)
        with torch.no_grad(), torch.autocast(images.device.type, enabled=False):
            return self._tokens(images).detach()


def _resize_clip_positions(visual: nn.Module, image_size: int) -> None:
    """Bicubic interpolation of CLIP's grid position embedding to a new image size."""
    pos = visual.positional_embedding  # [1 + g*g, W]
    old = int((pos.shape[0] - 1) ** 0.5)
    new = image_size // visual.patch_size[0]
    grid = pos[1:].reshape(1, old, old, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid.float(), size=(new, new), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(new * new, -1).to(pos.dtype)
    visual.positional_embedding = nn.Parameter(torch.cat([pos[:1], grid]), requires_grad=pos.requires_grad)
    visual.grid_size = (new, new)
    visual.image_size = (image_size, image_size)


def build_image_encoder(cfg, device: str | torch.device = "cpu") -> FrozenImageEncoder:
    """Build the encoder described by ``cfg`` (an EncoderConfig); ``device="meta"`` for shapes only."""
    if cfg.model_name not in open_clip.list_models():
        raise ValueError(f"encoder.model_name={cfg.model_name!r} is not an open_clip model; "
                         f"see open_clip.list_models() or add a JSON config")
    return FrozenImageEncoder(cfg, device=device)


__all__ = ["build_image_encoder", "FrozenImageEncoder", "timm"]
