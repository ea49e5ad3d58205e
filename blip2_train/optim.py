"""AdamW parameter groups and the LAVIS learning-rate schedule (linear warmup, cosine decay)."""

from __future__ import annotations

import math

import torch
from torch import nn

from blip2_train.config import VALID


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: biases and 1-D parameters (norms, temperature) get none."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or name.endswith(".bias") else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


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
    optimizer = torch.optim.AdamW(param_groups(model, optim_cfg.weight_decay), lr=optim_cfg.lr,
                                  betas=tuple(optim_cfg.betas), eps=optim_cfg.eps,
                                  **IMPLEMENTATIONS[implementation])
    peak = optim_cfg.lr

    def factor(step: int) -> float:
        return lr_at(step, optim_cfg.warmup_steps, max_steps, peak, optim_cfg.min_lr,
                     optim_cfg.warmup_start_lr) / peak

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
