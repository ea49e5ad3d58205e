"""A Q-Former encoder of our own: transformers' ``Blip2QFormerModel``, plus cached cross-attention K/V.

Same parameter names, same construction and initialisation order (so a seeded model has the
same weights), same numerics and the same dropout draws, in plain torch with SDPA. What it adds:
the cross-attention keys/values of an image depend only on the image, so
:meth:`FastQFormerModel.cross_attention_kv` computes them once per step and every pass reuses
them, indexed by an image index where a pass sees images in another order (ITM's
``[images; negative images; images]``). That removes three of the four projections of the
257 x 1408 image tokens in a stage-1 step, forward and backward (issue 7).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

# Per cross-attention layer, in layer order: (key, value), each [B, heads, N, head_dim].
CrossKV = list[tuple[torch.Tensor, torch.Tensor]]


class QFormerOutput(NamedTuple):
    """What the Q-Former returns; the field name is transformers' so callers need not care which runs."""

    last_hidden_state: torch.Tensor  # [B, L, H]


class MultiHeadAttention(nn.Module):
    """``attention.attention`` / ``crossattention.attention``: query/key/value projections + SDPA."""

    def __init__(self, config, is_cross_attention: bool = False):
        super().__init__()
        if config.hidden_size % config.num_attention_heads:
            raise ValueError(f"hidden_size {config.hidden_size} is not a multiple of num_attention_heads "
                             f"{config.num_attention_heads}; pick sizes where it divides")
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.dropout = config.attention_probs_dropout_prob
        kv_width = config.encoder_hidden_size if is_cross_attention else config.hidden_size
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(kv_width, config.hidden_size)
        self.value = nn.Linear(kv_width, config.hidden_size)

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        """[B, L, H] -> [B, heads, L, head_dim] (a view)."""
        return x.view(*x.shape[:-1], self.num_heads, self.head_dim).transpose(1, 2)

    def key_value(self, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.heads(self.key(states)), self.heads(self.value(states))

    def forward(self, hidden: torch.Tensor, mask: Optional[torch.Tensor],
                kv: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        """hidden [B, L, H] attends to itself, or to ``kv`` (cross-attention) -> [B, L, H]."""
        key, value = kv if kv is not None else self.key_value(hidden)
        out = F.scaled_dot_product_attention(
            self.heads(self.query(hidden)), key, value, attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0, scale=self.head_dim ** -0.5)
        return out.transpose(1, 2).reshape(*hidden.shape[:-1], -1)  # [B, L, H]


class DenseResidual(nn.Module):
    """``*.output`` / ``output_query``: dense -> dropout -> LayerNorm(x + residual)."""

    def __init__(self, in_size: int, config):
        super().__init__()
        self.dense = nn.Linear(in_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(hidden)) + residual)


class Intermediate(nn.Module):
    """``intermediate`` / ``intermediate_query``: dense -> GELU (exact erf, BERT's)."""

    def __init__(self, config):
        super().__init__()
        if config.hidden_act != "gelu":
            raise ValueError(f"FastQFormerModel implements hidden_act='gelu' only, got {config.hidden_act!r}; "
                             f"use qformer.impl=hf for other activations")
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(hidden))


class Attention(nn.Module):
    """``attention`` / ``crossattention``: multi-head attention + its output block."""

    def __init__(self, config, is_cross_attention: bool = False):
        super().__init__()
        self.attention = MultiHeadAttention(config, is_cross_attention)
        self.output = DenseResidual(config.hidden_size, config)

    def forward(self, hidden, mask=None, kv=None):
        return self.output(self.attention(hidden, mask, kv), hidden)


class QFormerLayer(nn.Module):
    """Self-attention over [queries; text]; cross-attention (queries only) every n-th layer; two FFNs."""

    def __init__(self, config, layer_idx: int):
        super().__init__()
        # registration order = transformers' construction order: the seeded init depends on it
        self.attention = Attention(config)
        self.has_cross_attention = layer_idx % config.cross_attention_frequency == 0
        if self.has_cross_attention:
            self.crossattention = Attention(config, is_cross_attention=True)
        self.has_text_ffn = config.use_qformer_text_input
        if self.has_text_ffn:
            self.intermediate = Intermediate(config)
            self.output = DenseResidual(config.intermediate_size, config)
        self.intermediate_query = Intermediate(config)
        self.output_query = DenseResidual(config.intermediate_size, config)

    def cross_key_value(self, image_embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's cross-attention (key, value) of the images (a method of the layer, so that
        FSDP can gather the layer's weights around it: see blip2_train/fsdp.py)."""
        return self.crossattention.attention.key_value(image_embeds)

    def forward(self, hidden: torch.Tensor, mask: Optional[torch.Tensor], query_length: int,
                kv: Optional[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        attended = self.attention(hidden, mask)  # [B, L, H]
        if query_length == 0:
            return self.output(self.intermediate(attended), attended)
        queries = attended[:, :query_length]  # [B, Q, H]
        if self.has_cross_attention:
            if kv is None:
                raise ValueError("this layer cross-attends: pass encoder_hidden_states or cross_kv")
            queries = self.crossattention(queries, kv=kv)
        out = self.output_query(self.intermediate_query(queries), queries)
        if attended.shape[1] > query_length:
            text = attended[:, query_length:]  # [B, T, H]
            out = torch.cat([out, self.output(self.intermediate(text), text)], dim=1)
        return out


class Encoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.layer = nn.ModuleList([QFormerLayer(config, i) for i in range(config.num_hidden_layers)])


class FastQFormerModel(nn.Module):
    """Drop-in for ``Blip2QFormerModel`` (same state dict) whose passes can share cross-attention K/V."""

    def __init__(self, config):
        """``config``: a transformers ``Blip2QFormerConfig`` (only its sizes and flags are read)."""
        super().__init__()
        self.config = config
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.encoder = Encoder(config)
        self.gradient_checkpointing = False
        self._init_weights(config.initializer_range)

    @torch.no_grad()
    def _init_weights(self, std: float) -> None:
        """transformers' default init, in its (module) order, so seeded weights are identical."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                module.weight.normal_(0.0, std)
                module.bias.zero_()
            elif isinstance(module, nn.LayerNorm):
                module.weight.fill_(1.0)
                module.bias.zero_()

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: Optional[dict] = None) -> None:
        """Recompute each layer in backward (transformers' method name, so callers need not care)."""
        self.gradient_checkpointing = True

    def cross_layers(self) -> list[QFormerLayer]:
        return [layer for layer in self.encoder.layer if layer.has_cross_attention]

    def cross_attention_kv(self, image_embeds: torch.Tensor) -> CrossKV:
        """Keys/values of every cross-attention layer: [B, N, W] -> per layer ([B, h, N, d], [B, h, N, d])."""
        image_embeds = image_embeds.to(self.layernorm.weight.dtype)  # the Q-Former is kept in fp32
        return [layer.cross_key_value(image_embeds) for layer in self.cross_layers()]

    def forward(self, query_embeds: torch.Tensor, query_length: Optional[int] = None,
                attention_mask: Optional[torch.Tensor] = None,
                encoder_hidden_states: Optional[torch.Tensor] = None,
                cross_kv: Optional[CrossKV] = None,
                image_index: Optional[torch.Tensor] = None) -> QFormerOutput:
        """[queries; text] embeddings [B, L, H] -> [B, L, H].

        The first ``query_length`` positions are queries (they cross-attend). ``attention_mask``:
        boolean, [B, L] (key padding) or prepared 4-D [B, 1, L or 1, L] (True = may attend).
        The image comes as ``encoder_hidden_states`` [B', N, W] or as precomputed ``cross_kv``
        (batch B'); ``image_index`` [B] (long) picks the image of each row, default row b <- b.
        """
        query_length = query_embeds.shape[1] if query_length is None else query_length
        dtype = self.layernorm.weight.dtype
        hidden = self.dropout(self.layernorm(query_embeds.to(dtype)))
        if attention_mask is not None and attention_mask.dim() == 2:
            attention_mask = attention_mask.bool()[:, None, None, :]  # [B, 1, 1, L]
        if query_length > 0 and cross_kv is None and encoder_hidden_states is not None:
            cross_kv = self.cross_attention_kv(encoder_hidden_states)
        kv_iter = iter(cross_kv or [])
        for layer in self.encoder.layer:
            kv = next(kv_iter, None) if layer.has_cross_attention and query_length > 0 else None
            if kv is not None and image_index is not None:
                kv = (kv[0][image_index], kv[1][image_index])  # [B, h, N, d]
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                hidden = checkpoint(layer, hidden, attention_mask, query_length, kv, use_reentrant=False)
            else:
                hidden = layer(hidden, attention_mask, query_length, kv)
        return QFormerOutput(hidden)
