"""Bridges: image-encoder tokens [B, N, W] -> soft visual prompts of the LLM [B, M, D_llm].

Three, behind one interface (``forward(vision_tokens)``, ``num_tokens`` = M), chosen by the
``bridge`` config group (docs/blip2_numerics.md section 8):

- :class:`QFormerBridge` (``qformer``, BLIP-2): M learned queries cross-attend to all N tokens through
  the Q-Former, then ``language_projection`` (Linear). M = ``qformer.num_query_tokens``.
- :class:`MLPBridge` (``mlp``, LLaVA-1.5): Linear, GELU, Linear applied to every patch token
  (CLS dropped, as LLaVA-1.5 does; ``keep_cls`` keeps it). M = the patch grid (64 for the tiny
  64-px encoders, 256 for ViT-L/14 at 224 px).
- :class:`PooledMLPBridge` (``pool_mlp``, DeCo): the patch grid is 2D adaptive-average-pooled to
  ``num_tokens`` (a square, s x s), then the same MLP. CLS is dropped by default: it is not a cell
  of the grid, and DeCo pools LLaVA's CLS-free features; ``keep_cls`` puts it (unpooled) in front,
  M = s * s + 1. Pooling to the full grid is the identity, so ``pool_mlp`` at the grid's size is
  exactly ``mlp``.

The encoders here (open_clip CLIP and timm EVA, cut to their second-to-last block) put one CLS
token in front of a square grid of patch tokens; that is the layout the MLP bridges assume.
torch only: the LightningModule builds a bridge from plain numbers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

NUM_PREFIX_TOKENS = 1  # CLS in front of the patch grid (open_clip ViT, timm EVA)


def patch_grid(num_encoder_tokens: int, num_prefix_tokens: int = NUM_PREFIX_TOKENS) -> int:
    """Side of the square patch grid behind ``num_encoder_tokens`` (prefix tokens first)."""
    patches = num_encoder_tokens - num_prefix_tokens
    side = math.isqrt(max(patches, 0))
    if patches < 1 or side * side != patches:
        raise ValueError(f"an encoder with {num_encoder_tokens} tokens ({num_prefix_tokens} prefix) has no square "
                         f"patch grid; the MLP bridges need one")
    return side


class QFormerBridge(nn.Module):
    """BLIP-2's bridge: Q-Former query outputs [B, Q, H] -> ``language_projection`` -> [B, Q, D_llm].

    Holds the modules it is given (the stage-1-initialisable ``QFormer`` and the projection); the
    LightningModule keeps them registered under their BLIP-2 names (``model.*``,
    ``language_projection.*``), so checkpoints, ``init_from`` a stage-1 run and the transformers / LAVIS
    name maps are those of BLIP-2.
    """

    def __init__(self, qformer: nn.Module, language_projection: nn.Linear):
        super().__init__()
        self.qformer = qformer
        self.language_projection = language_projection

    @property
    def num_tokens(self) -> int:
        return self.qformer.num_query_tokens

    def forward(self, vision_tokens: torch.Tensor) -> torch.Tensor:
        """[B, N, W] -> [B, Q, D_llm]."""
        states = self.qformer.image_states(vision_tokens)  # ln_vision folded into K/V under impl=fast
        query_output = self.qformer.query_forward(states, self.qformer.cross_attention_kv(states))  # [B, Q, H]
        return self.language_projection(query_output)


class MLPBridge(nn.Module):
    """LLaVA-1.5's projector over every patch token: [B, N, W] -> [B, g*g (+1), D_llm].

    ``linear_1`` / ``linear_2`` are named as in transformers' ``LlavaMultiModalProjector``; the hidden
    width is the LLM's unless ``hidden_size`` says otherwise; the GELU is the exact (erf) one.
    """

    def __init__(self, vision_width: int, llm_width: int, num_encoder_tokens: int, hidden_size: int | None = None,
                 keep_cls: bool = False):
        super().__init__()
        self.grid = patch_grid(num_encoder_tokens)
        self.keep_cls = bool(keep_cls)
        hidden = int(hidden_size or llm_width)
        self.linear_1 = nn.Linear(vision_width, hidden)
        self.linear_2 = nn.Linear(hidden, llm_width)

    @property
    def num_tokens(self) -> int:
        return self.grid * self.grid + int(self.keep_cls)

    def select(self, vision_tokens: torch.Tensor) -> torch.Tensor:
        """The tokens the MLP sees: [B, N, W] -> [B, M, W]."""
        return vision_tokens if self.keep_cls else vision_tokens[:, NUM_PREFIX_TOKENS:]

    def project(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.gelu(self.linear_1(tokens)))

    def forward(self, vision_tokens: torch.Tensor) -> torch.Tensor:
        return self.project(self.select(vision_tokens.float()))


def pool_patch_grid(patches: torch.Tensor, side: int) -> torch.Tensor:
    """2D adaptive average pooling of a row-major square patch grid: [B, g*g, W] -> [B, side*side, W]."""
    batch, count, width = patches.shape
    grid = math.isqrt(count)
    image = patches.transpose(1, 2).reshape(batch, width, grid, grid)  # [B, W, g, g]
    pooled = F.adaptive_avg_pool2d(image, side)  # [B, W, side, side]
    return pooled.flatten(2).transpose(1, 2)  # [B, side*side, W], row-major


class PooledMLPBridge(MLPBridge):
    """DeCo: the patch grid average-pooled to ``num_tokens`` (a square), then the MLP."""

    def __init__(self, vision_width: int, llm_width: int, num_encoder_tokens: int, num_tokens: int,
                 hidden_size: int | None = None, keep_cls: bool = False):
        super().__init__(vision_width, llm_width, num_encoder_tokens, hidden_size, keep_cls)
        side = math.isqrt(max(int(num_tokens), 0))
        if side < 1 or side * side != num_tokens or side > self.grid:
            squares = ", ".join(str(s * s) for s in range(1, self.grid + 1))
            raise ValueError(f"bridge.num_tokens={num_tokens} for bridge=pool_mlp must be a square no larger than "
                             f"the {self.grid}x{self.grid} patch grid; choose one of: {squares}")
        self.side = side

    @property
    def num_tokens(self) -> int:
        return self.side * self.side + int(self.keep_cls)

    def select(self, vision_tokens: torch.Tensor) -> torch.Tensor:
        pooled = pool_patch_grid(vision_tokens[:, NUM_PREFIX_TOKENS:], self.side)  # [B, s*s, W]
        if self.keep_cls:
            pooled = torch.cat([vision_tokens[:, :NUM_PREFIX_TOKENS], pooled], dim=1)
        return pooled


def build_mlp_bridge(name: str, vision_width: int, llm_width: int, num_encoder_tokens: int,
                     num_tokens: int | None = None, hidden_size: int | None = None,
                     keep_cls: bool = False) -> MLPBridge:
    """``mlp`` or ``pool_mlp`` from plain numbers (the Q-Former bridge is built from its modules)."""
    if name == "mlp":
        grid = patch_grid(num_encoder_tokens)
        if num_tokens not in (None, grid * grid):
            raise ValueError(f"bridge=mlp feeds every patch token ({grid * grid} here): leave bridge.num_tokens "
                             f"null, or use bridge=pool_mlp to choose a count (got {num_tokens})")
        return MLPBridge(vision_width, llm_width, num_encoder_tokens, hidden_size, keep_cls)
    if name == "pool_mlp":
        if num_tokens is None:
            raise ValueError("bridge=pool_mlp needs bridge.num_tokens (a square, e.g. 16)")
        return PooledMLPBridge(vision_width, llm_width, num_encoder_tokens, num_tokens, hidden_size, keep_cls)
    raise ValueError(f"bridge={name!r} is not an MLP bridge (mlp, pool_mlp)")
