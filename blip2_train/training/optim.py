"""AdamW parameter groups and the LAVIS learning-rate schedule (linear warmup, cosine decay)."""

from __future__ import annotations

import math

import torch
from torch import nn

from blip2_train.config import VALID


def vit_lr_scales(encoder: nn.Module, layer_decay: float) -> dict[str, float]:
    """Learning-rate scale of each trainable encoder parameter under layer-wise decay (LAVIS's rule).

    With L kept blocks, LAVIS numbers the ViT's parameters 0 (patch/class/position embeddings, and CLIP's
    ``ln_pre``), i + 1 (block i, 0-based) and L (anything else) and scales layer n by
    ``layer_decay ** (L + 1 - n)``: block i gets ``layer_decay ** (L - i)`` (the last block
    ``layer_decay``), the embeddings ``layer_decay ** (L + 1)``. Names are relative to ``encoder``."""
    depth = encoder.depth
    scales = {}
    for name, param in encoder.named_parameters():
        if param.requires_grad:
            scales[name] = layer_decay ** (depth + 1 - encoder.layer_index(name))
    return scales


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float = 1.0) -> list[dict]:
    """Weight decay on matrices only: biases and 1-D parameters (norms, temperature) get none.

    ``layer_decay`` < 1 with a trainable image encoder (``model.encoder``): its parameters go to groups
    of their own whose ``lr_scale`` (see :func:`vit_lr_scales`) multiplies the scheduled learning rate.
    The groups at scale 1 come first, so ``param_groups[0]`` carries the base learning rate."""
    encoder = getattr(model, "encoder", None)
    scales = {}
    if layer_decay != 1.0 and encoder is not None and hasattr(encoder, "layer_index"):
        scales = {"encoder." + name: scale for name, scale in vit_lr_scales(encoder, layer_decay).items()}
    groups: dict[tuple[float, bool], list] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decays = not (param.ndim < 2 or name.endswith(".bias"))
        groups.setdefault((scales.get(name, 1.0), decays), []).append(param)
    if not scales:  # the two groups of old, both present even when empty
        return [{"params": groups.get((1.0, True), []), "weight_decay": weight_decay},
                {"params": groups.get((1.0, False), []), "weight_decay": 0.0}]
    order = sorted(groups, key=lambda key: (-key[0], not key[1]))  # scale 1 first, decay before no-decay
    return [{"params": groups[key], "weight_decay": weight_decay if key[1] else 0.0, "lr_scale": key[0]}
            for key in order]


def lr_at(step: int, warmup_steps: int, max_steps: int, peak: float, minimum: float, start: float) -> float:
    """Linear warmup from ``start`` to ``peak`` over ``warmup_steps``, then cosine to ``minimum``."""
    if step < warmup_steps:
        return start + (peak - start) * step / max(1, warmup_steps)
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return minimum + (peak - minimum) * 0.5 * (1.0 + math.cos(math.pi * progress))


# optim.implementation (names: config.VALID) -> torch.optim.AdamW keyword arguments
IMPLEMENTATIONS = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for_loop": {"foreach": False}}
assert tuple(IMPLEMENTATIONS) == VALID["optim.implementation"]


def build_optimizer(model: nn.Module, optim_cfg, max_steps: int):
    """AdamW (``optim.implementation``) + a per-step LambdaLR following :func:`lr_at` (Lightning config dict)."""
    implementation = getattr(optim_cfg, "implementation", "fused")
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"optim.implementation={implementation!r} is not valid; choose one of "
                         f"{', '.join(VALID['optim.implementation'])}")
    layer_decay = float(getattr(optim_cfg, "layer_decay", 1.0))
    if not 0.0 < layer_decay <= 1.0:
        raise ValueError(f"optim.layer_decay={layer_decay} must be in (0, 1]: the ViT's last block trains at "
                         f"lr x layer_decay and each earlier one at a further factor (LAVIS 0.95; 1.0 = off)")
    groups = param_groups(model, optim_cfg.weight_decay, layer_decay)
    for group in groups:  # LambdaLR scales each group's own initial lr: the ViT groups keep their ratio
        group["lr"] = optim_cfg.lr * group.get("lr_scale", 1.0)
    optimizer = torch.optim.AdamW(groups, lr=optim_cfg.lr,
                                  betas=tuple(optim_cfg.betas), eps=optim_cfg.eps,
                                  **IMPLEMENTATIONS[implementation])
    peak = optim_cfg.lr

    def factor(step: int) -> float:
        return lr_at(step, optim_cfg.warmup_steps, max_steps, peak, optim_cfg.min_lr,
                     optim_cfg.warmup_start_lr) / peak

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
