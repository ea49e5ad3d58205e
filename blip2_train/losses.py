"""Stage-1 losses as pure functions (docs/blip2_numerics.md section 2).

Nothing here knows about Lightning or distributed training: the caller passes the local features
and the features gathered over every rank (with gradient), plus this rank's offset in the
gathered batch. With one process the gathered tensors are the local ones and the offset is 0.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient for this rank's slice."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.rank, ctx.world = dist.get_rank(), dist.get_world_size()
        parts = [torch.empty_like(x) for _ in range(ctx.world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)  # every rank's loss depends on this rank's features
        return grad.chunk(ctx.world, dim=0)[ctx.rank]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` over all ranks along dim 0; gradients flow back to every rank's part.

    With DDP's gradient averaging this gives exactly the gradient of the loss computed in one
    process on the concatenated batch (tests/unit/pure/test_losses.py checks it with 2 processes).
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` over all ranks along dim 0, without gradient (ids, masks)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def itc_similarities(image_feats: torch.Tensor, text_feats_all: torch.Tensor,
                     text_feats: torch.Tensor, image_feats_all: torch.Tensor):
    """Max-over-queries similarities of local rows against the global batch.

    image_feats [B, Q, D], text_feats_all [N, D] -> sim_i2t [B, N]
    text_feats [B, D], image_feats_all [N, Q, D] -> sim_t2i [B, N]
    """
    sim_i2t = torch.einsum("bqd,nd->bnq", image_feats, text_feats_all).amax(dim=-1)
    sim_t2i = torch.einsum("bd,nqd->bnq", text_feats, image_feats_all).amax(dim=-1)
    return sim_i2t, sim_t2i


def positive_mask(image_ids: torch.Tensor, image_ids_all: torch.Tensor) -> torch.Tensor:
    """[B, N] True where local row b and global column n show the same image."""
    return image_ids[:, None] == image_ids_all[None, :]


def itc_loss(sim_i2t: torch.Tensor, sim_t2i: torch.Tensor, temperature: torch.Tensor,
             positives: torch.Tensor, label_smoothing: float = 0.1) -> torch.Tensor:
    """Symmetric InfoNCE over the global batch, both directions averaged.

    ``positives`` [B, N] marks every pair that shows the same image (the diagonal block at this
    rank's offset at least); targets spread evenly over them. With unique images this is LAVIS's
    ``cross_entropy(sim / temp, rank * B + arange(B), label_smoothing=0.1)``.
    """
    targets = positives.float()
    targets = targets / targets.sum(dim=1, keepdim=True)
    loss_i2t = F.cross_entropy(sim_i2t.float() / temperature, targets, label_smoothing=label_smoothing)
    loss_t2i = F.cross_entropy(sim_t2i.float() / temperature, targets, label_smoothing=label_smoothing)
    return (loss_i2t + loss_t2i) / 2


@torch.no_grad()
def hard_negative_indices(sim: torch.Tensor, positives: torch.Tensor,
                          generator: torch.Generator | None = None):
    """Sample one hard negative column per row from softmax(sim) with positives masked out.

    sim [B, N] (already divided by the temperature), positives [B, N] ->
    (indices [B] long, valid [B] bool). A row whose every column is a positive (batch size 1, or
    one image everywhere) has no negative: ``valid`` is False there and its index is arbitrary.
    Weights are computed in fp32; LAVIS's +1e-4 floor keeps every non-positive column possible.
    """
    weights = torch.softmax(sim.float(), dim=1) + 1e-4
    weights = weights.masked_fill(positives, 0.0)
    valid = ~positives.all(dim=1)
    weights = torch.where(valid[:, None], weights, torch.ones_like(weights))
    weights = torch.nan_to_num(weights, nan=1.0, posinf=1.0, neginf=0.0)
    indices = torch.multinomial(weights, 1, generator=generator).squeeze(1)
    return indices, valid


def itm_loss(logits: torch.Tensor, num_positive: int, weights: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the 3B ITM batch [pos; neg image; neg text].

    logits [3B, 2]; labels 1 for the first ``num_positive`` rows and 0 after; ``weights`` [3B]
    drops negatives that do not exist (rows with no valid negative).
    """
    labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    labels[:num_positive] = 1
    per_row = F.cross_entropy(logits.float(), labels, reduction="none")
    return (per_row * weights).sum() / weights.sum()


def itg_loss(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
             label_smoothing: float = 0.1) -> torch.Tensor:
    """Causal LM loss of the text positions: logits predict input_ids shifted by one.

    ``logits``: [B, T - 1, V] for positions 0..T-2 (what stage 1 computes: the last position
    predicts nothing), or [B, T, V], whose last position is then dropped. Padding is ignored
    (-100), the first token ([DEC]) is never a target; mean over targets.
    """
    labels = input_ids.masked_fill(attention_mask == 0, -100)[:, 1:]
    length = input_ids.shape[1]
    if logits.shape[1] not in (length - 1, length):
        raise ValueError(f"logits of {logits.shape[1]} positions for {length} tokens: give T - 1 or T")
    shifted = (logits if logits.shape[1] == length - 1 else logits[:, :-1]).float()
    return F.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), labels.reshape(-1),
                           ignore_index=-100, label_smoothing=label_smoothing)
