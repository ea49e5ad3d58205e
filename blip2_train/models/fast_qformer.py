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

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

# Per cross-attention layer, in layer order: (key, value), each [B, heads, N, head_dim].
CrossKV = list[tuple[torch.Tensor, torch.Tensor]]
# The rows of a pass in equal chunks of C rows; per chunk, where its images' K/V are: an int
# offset o (row b reads K/V row o + b: a view) or a LongTensor [C] of K/V rows (a gather).
# ITM on one process: [0, negative_images, 0]; on several: K/V [local; negatives] and [0, B, 0].
Chunks = list  # list[int | torch.Tensor]
# (gamma [W], beta [W]): a LayerNorm's affine applied to the images, folded into K/V (folded_linear).
Affine = tuple[torch.Tensor, torch.Tensor]


# the dropout-mask implementations this module has; config.VALID["qformer.dropout_masks"] lists the same
# (tests/unit/models/test_fast_qformer.py checks they agree: models/ never imports config)
DROPOUT_MASKS = ("packed", "torch")


def packed_keep_mask(shape: tuple[int, ...], p: float, device: torch.device) -> torch.Tensor:
    """Bool mask, True with probability round((1 - p) * 2^16) / 2^16: four draws per random 64-bit word.

    torch's CPU ``bernoulli_`` spends one generator call and a double compare per element (about
    13 ns); slicing full-range random int64 words into int16 lanes and comparing them with one
    threshold is about 6x faster, and the mask is one byte per element instead of four.
    """
    numel = math.prod(shape)
    threshold = round((1.0 - p) * 65536) - 32768  # int16 lanes are uniform on [-32768, 32767]
    if threshold > 32767:  # p ~ 0: keep all (the int16 compare could not express it)
        return torch.ones(shape, dtype=torch.bool, device=device)
    words = torch.empty((numel + 3) // 4, dtype=torch.int64, device=device).random_(-2**63, None)
    return (words.view(torch.int16)[:numel] < threshold).view(shape)


def _packed(masks: str, x: torch.Tensor) -> bool:
    return masks == "packed" and x.device.type == "cpu" and not torch.compiler.is_compiling()


def _fused(masks: str, x: torch.Tensor) -> bool:
    """Attention dropout inside SDPA's kernel (GPU, ``masks="packed"``): the probabilities are never
    written out. On the CPU SDPA's math fallback would draw and apply a mask the slow way."""
    return masks == "packed" and x.device.type != "cpu"


def folded_linear(states: torch.Tensor, linear: nn.Linear, gamma: torch.Tensor,
                  beta: torch.Tensor) -> torch.Tensor:
    """``linear(states * gamma + beta)`` as ``states @ (W * gamma)^T + (W beta + b)``.

    The same function, but autograd now needs no gradient of ``states`` when they have none: for
    the frozen image tokens under ``ln_vision`` (a LayerNorm's affine), the gradients of gamma and
    beta come from the weight-sized products, and the [B*N, H] x [H, W] input-gradient product of
    every cross-attention K/V projection (107 GFLOP of a B=16 stage-1 step) is never computed.
    """
    weight = linear.weight * gamma  # [H, W]
    bias = torch.addmv(linear.bias, linear.weight, beta) if linear.bias is not None else linear.weight @ beta
    return F.linear(states, weight, bias)


class Dropout(nn.Dropout):
    """``nn.Dropout`` whose CPU masks can be drawn packed (``masks="packed"``, see :func:`packed_keep_mask`)."""

    masks = "torch"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0 or not _packed(self.masks, x):
            return super().forward(x)
        return x.mul(packed_keep_mask(x.shape, self.p, x.device)).mul_(1.0 / (1.0 - self.p))


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
        self.masks = "torch"  # see Dropout
        kv_width = config.encoder_hidden_size if is_cross_attention else config.hidden_size
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(kv_width, config.hidden_size)
        self.value = nn.Linear(kv_width, config.hidden_size)

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        """[B, L, H] -> [B, heads, L, head_dim] (a view)."""
        return x.view(*x.shape[:-1], self.num_heads, self.head_dim).transpose(1, 2)

    def key_value(self, states: torch.Tensor, affine: Affine | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of ``states`` [B, N, W]; with ``affine`` = (gamma, beta), of
        ``states * gamma + beta``, folded into the projections (see :func:`folded_linear`)."""
        if affine is None:
            return self.heads(self.key(states)), self.heads(self.value(states))
        return (self.heads(folded_linear(states, self.key, *affine)),
                self.heads(folded_linear(states, self.value, *affine)))

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None,
                kv: tuple[torch.Tensor, torch.Tensor] | None = None, chunks: Chunks | None = None,
                rows: int | None = None) -> torch.Tensor:
        """hidden [B, L, H] attends to itself, or to ``kv`` (cross-attention) -> [B, L, H].

        ``chunks`` (cross-attention only): the rows come in ``len(chunks)`` equal chunks, each
        naming its images in ``kv`` (see :data:`Chunks`). ``rows``: only the first ``rows``
        positions ask (all positions are still keys/values) -> [B, rows, H].
        """
        key, value = kv if kv is not None else self.key_value(hidden)
        asking = hidden if rows is None else hidden[:, :rows]
        if rows is not None and mask is not None and mask.shape[-2] > 1:
            mask = mask[..., :rows, :]
        query = self.heads(self.query(asking))  # [B, h, L, d]
        if chunks is None:
            out = self.attend(query, key, value, mask)
        else:
            out = self.attend_chunks(query, key, value, chunks)
        return out.transpose(1, 2).reshape(*asking.shape[:-1], -1)  # [B, L, H]

    def attend(self, query, key, value, mask, keep=None) -> torch.Tensor:
        """softmax(q k^T * scale + mask) (dropout) v: [B, h, L, d].

        Without dropout, and with dropout on a GPU under ``masks="packed"``: SDPA (its fused
        kernels; on the GPU they draw the dropout mask themselves, so the [L, N] probabilities are
        never stored). Otherwise written out: SDPA's CPU math fallback would scale both q and k and
        copy k^T; here k^T stays a strided view and the scale goes onto the [L, N] scores. ``keep``:
        a mask drawn by the caller in another layout, bool (packed: the 1 / (1 - p) goes onto the
        [L, d] output) or float (kept / (1 - p)).
        """
        p = self.dropout if self.training else 0.0
        if keep is None and (p == 0.0 or _fused(self.masks, query)):
            return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=p,
                                                  scale=self.head_dim ** -0.5)
        scores = torch.matmul(query, key.transpose(-1, -2)).mul_(self.head_dim ** -0.5)  # [B, h, L, N]
        if mask is not None:
            scores = scores.masked_fill_(~mask, torch.finfo(scores.dtype).min)
        probs = scores.softmax(dim=-1)
        if keep is None:
            if not _packed(self.masks, probs):  # torch's dropout: on the GPU its fused kernel
                return torch.matmul(F.dropout(probs, p), value)
            keep = self.keep_mask(probs.shape, probs)
        if keep.dtype == torch.bool:
            return torch.matmul(probs.mul(keep), value).mul_(1.0 / (1.0 - p))
        return torch.matmul(probs * keep, value)

    def keep_mask(self, shape, like: torch.Tensor) -> torch.Tensor:
        """Dropout mask for attention probabilities of ``shape``: bool (packed) or kept / (1 - p)
        (torch: the draws ``F.dropout`` makes on the CPU)."""
        p = self.dropout
        if _packed(self.masks, like):
            return packed_keep_mask(shape, p, like.device)
        return torch.empty(shape, dtype=like.dtype, device=like.device).bernoulli_(1 - p).div_(1 - p)

    def attend_chunks(self, query, key, value, chunks: Chunks) -> torch.Tensor:
        """Cross-attention of rows in chunks over shared K/V without copying K/V per row.

        Chunks that read the same contiguous K/V rows (an ``int`` offset) are stacked along the
        query axis, so one [B, h, k*Q, N] product serves k chunks; a chunk given as an index
        tensor gathers its own K/V. Dropout draws as for the [R, h, Q, N] probabilities at once.
        """
        n = len(chunks)
        rows = query.shape[0] // n
        if rows * n != query.shape[0]:
            raise ValueError(f"{query.shape[0]} rows do not split into {n} equal chunks")
        q = query.unflatten(0, (n, rows))  # [n, C, h, Q, d]
        heads, length = query.shape[1], query.shape[2]
        keep = None
        p = self.dropout if self.training else 0.0
        if p > 0.0 and not _fused(self.masks, query):  # the draws dropout on [R, h, Q, N] probabilities
            # would make, in that layout (on a GPU under packed masks SDPA draws them per product)
            keep = self.keep_mask((query.shape[0], heads, length, key.shape[2]), query).unflatten(0, (n, rows))
        outs: list[torch.Tensor | None] = [None] * n
        groups: dict[int, list[int]] = {}
        for i, chunk in enumerate(chunks):
            if isinstance(chunk, int):
                groups.setdefault(chunk, []).append(i)
            else:  # an index tensor [C] into the K/V batch
                outs[i] = self.attend(q[i], key[chunk], value[chunk], None,
                                      None if keep is None else keep[i])
        for offset, members in groups.items():
            k, v = key[offset: offset + rows], value[offset: offset + rows]  # views
            stacked = torch.cat([q[i] for i in members], dim=2)  # [C, h, k*Q, d]
            mask = None if keep is None else torch.cat([keep[i] for i in members], dim=2)
            out = self.attend(stacked, k, v, None, mask)
            for j, i in enumerate(members):
                outs[i] = out[:, :, j * length: (j + 1) * length]
        return torch.stack(outs).flatten(0, 1)  # [R, h, Q, d]


class DenseResidual(nn.Module):
    """``*.output`` / ``output_query``: dense -> dropout -> LayerNorm(x + residual)."""

    def __init__(self, in_size: int, config):
        super().__init__()
        self.dense = nn.Linear(in_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = Dropout(config.hidden_dropout_prob)

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

    def forward(self, hidden, mask=None, kv=None, chunks=None, rows=None):
        residual = hidden if rows is None else hidden[:, :rows]
        return self.output(self.attention(hidden, mask, kv, chunks, rows), residual)


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

    def cross_key_value(self, image_embeds: torch.Tensor, affine: Affine | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's cross-attention (key, value) of the images (a method of the layer, so that
        FSDP can gather the layer's weights around it: see blip2_train/training/fsdp.py); ``affine``: see
        :meth:`FastQFormerModel.cross_attention_kv`."""
        return self.crossattention.attention.key_value(image_embeds, affine)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None, query_length: int,
                kv: tuple[torch.Tensor, torch.Tensor] | None, chunks: Chunks | None = None,
                rows: int | None = None) -> torch.Tensor:
        """``rows``: only the first ``rows`` positions' outputs are computed (the others still serve
        as keys/values of the self-attention) -> [B, rows, H]."""
        attended = self.attention(hidden, mask, rows=rows)  # [B, L or rows, H]
        if query_length == 0:
            return self.output(self.intermediate(attended), attended)
        text = None
        if attended.shape[1] > query_length:  # split: one cat in backward, not two zero-padded slices
            queries, text = attended.split([query_length, attended.shape[1] - query_length], dim=1)
        else:
            queries = attended  # [B, Q, H]
        if self.has_cross_attention:
            if kv is None:
                raise ValueError("this layer cross-attends: pass encoder_hidden_states or cross_kv")
            queries = self.crossattention(queries, kv=kv, chunks=chunks)
        out = self.output_query(self.intermediate_query(queries), queries)
        if text is not None:  # [B, T, H]
            out = torch.cat([out, self.output(self.intermediate(text), text)], dim=1)
        return out


class Encoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.layer = nn.ModuleList([QFormerLayer(config, i) for i in range(config.num_hidden_layers)])


class FastQFormerModel(nn.Module):
    """Drop-in for ``Blip2QFormerModel`` (same state dict) whose passes can share cross-attention K/V."""

    def __init__(self, config, dropout_masks: str = "torch"):
        """``config``: a transformers ``Blip2QFormerConfig`` (only its sizes and flags are read).
        ``dropout_masks``: "torch" (transformers' draws) or "packed" (see :class:`Dropout`)."""
        super().__init__()
        self.config = config
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = Dropout(config.hidden_dropout_prob)
        self.encoder = Encoder(config)
        self.gradient_checkpointing = False
        self._init_weights(config.initializer_range)
        self.set_dropout_masks(dropout_masks)

    def set_dropout_masks(self, kind: str) -> None:
        if kind not in DROPOUT_MASKS:
            raise ValueError(f"qformer.dropout_masks={kind!r} is not valid; choose one of {', '.join(DROPOUT_MASKS)}")
        self.dropout_masks = kind
        for module in self.modules():
            if isinstance(module, (Dropout, MultiHeadAttention)):
                module.masks = kind

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

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        """Recompute each layer in backward (transformers' method name, so callers need not care)."""
        self.gradient_checkpointing = True

    def cross_layers(self) -> list[QFormerLayer]:
        return [layer for layer in self.encoder.layer if layer.has_cross_attention]

    def cross_attention_kv(self, image_embeds: torch.Tensor,
                           affine: Affine | None = None) -> CrossKV:
        """Keys/values of every cross-attention layer: [B, N, W] -> per layer ([B, h, N, d], [B, h, N, d]).

        ``affine`` = (gamma [W], beta [W]): the images are ``image_embeds * gamma + beta`` (a
        LayerNorm's affine, ``ln_vision``), folded into each projection (:func:`folded_linear`).
        """
        image_embeds = image_embeds.to(self.layernorm.weight.dtype)  # the Q-Former is kept in fp32
        return [layer.cross_key_value(image_embeds, affine) for layer in self.cross_layers()]

    def forward(self, query_embeds: torch.Tensor, query_length: int | None = None,
                attention_mask: torch.Tensor | None = None,
                encoder_hidden_states: torch.Tensor | None = None,
                cross_kv: CrossKV | None = None,
                image_index: torch.Tensor | Chunks | None = None,
                output_length: int | None = None) -> QFormerOutput:
        """[queries; text] embeddings [B, L, H] -> [B, L, H].

        The first ``query_length`` positions are queries (they cross-attend). ``attention_mask``:
        boolean, [B, L] (key padding) or prepared 4-D [B, 1, L or 1, L] (True = may attend).
        The image comes as ``encoder_hidden_states`` [B', N, W] or as precomputed ``cross_kv``
        (batch B'); ``image_index`` picks the image of each row, default row b <- b: a LongTensor
        [B] (K/V gathered per row) or :data:`Chunks` (K/V shared by whole chunks, no copies).

        ``output_length``: only the first n positions of the output are wanted -> [B, n, H]. The
        last layer then computes only their outputs (ITM reads the queries, ITC the text's [CLS]:
        the other positions' last FFN, output projection and query projection, 2.5% of the FLOPs
        of a B=16 stage-1 step, were computed for nothing). With ``dropout_masks="torch"`` in
        training the whole last layer still runs, so that the dropout draws stay transformers'/LAVIS's.
        """
        query_length = query_embeds.shape[1] if query_length is None else query_length
        dtype = self.layernorm.weight.dtype
        hidden = self.dropout(self.layernorm(query_embeds.to(dtype)))
        if attention_mask is not None and attention_mask.dim() == 2:
            attention_mask = attention_mask.bool()[:, None, None, :]  # [B, 1, 1, L]
        if query_length > 0 and cross_kv is None and encoder_hidden_states is not None:
            cross_kv = self.cross_attention_kv(encoder_hidden_states)
        kv_iter = iter(cross_kv or [])
        rows = None
        if (output_length is not None and output_length < hidden.shape[1]
                and not (self.training and self.dropout_masks == "torch")):
            rows = output_length
        last = len(self.encoder.layer) - 1
        for index, layer in enumerate(self.encoder.layer):
            kv = next(kv_iter, None) if layer.has_cross_attention and query_length > 0 else None
            chunks = None
            if kv is not None and isinstance(image_index, torch.Tensor):
                kv = (kv[0][image_index], kv[1][image_index])  # [B, h, N, d]
            elif kv is not None and image_index is not None:
                chunks = image_index
            layer_rows = rows if index == last else None
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                hidden = checkpoint(layer, hidden, attention_mask, query_length, kv, chunks, layer_rows,
                                    use_reentrant=False)
            else:
                hidden = layer(hidden, attention_mask, query_length, kv, chunks, layer_rows)
        if output_length is not None:
            hidden = hidden[:, :output_length]
        return QFormerOutput(hidden)
