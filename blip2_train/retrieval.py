"""Zero-shot image-text retrieval: ITC ranking, ITM re-ranking of the top k, recall@k.

Rows are images (one per ``image_id``), columns are captions; ``relevant[i, j]`` is True when
caption j describes image i, so images with several captions count a hit on any of them.
``txt`` metrics rank captions for each image (image->text), ``img`` metrics rank images for
each caption (text->image).
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def group_by_image(image_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Evaluation samples (one per caption) -> images: the first sample of each ``image_id``, in
    input order, and ``relevant [Ni, Nt]``, True where caption t belongs to image i.

    COCO / Flickr30K val sets hold five captions per image; the image's own captions need not be
    adjacent.
    """
    unique, inverse = image_ids.unique(return_inverse=True)
    positions = torch.arange(image_ids.numel())
    first = torch.full((unique.numel(),), image_ids.numel(), dtype=torch.long)
    first = first.scatter_reduce(0, inverse, positions, reduce="amin").sort().values  # [Ni]
    relevant = image_ids[first][:, None] == image_ids[None, :]  # [Ni, Nt]
    return first, relevant


def recall_at_k(scores_i2t: torch.Tensor, relevant: torch.Tensor, ks=(1, 5, 10)) -> dict[str, float]:
    """scores_i2t [Ni, Nt], relevant [Ni, Nt] bool -> {'txt_r1': ..., 'img_r1': ..., ...}."""
    out = {}
    order_i2t = scores_i2t.argsort(dim=1, descending=True)  # [Ni, Nt]
    hits_i2t = relevant.gather(1, order_i2t)
    order_t2i = scores_i2t.t().argsort(dim=1, descending=True)  # [Nt, Ni]
    hits_t2i = relevant.t().gather(1, order_t2i)
    for k in ks:
        out[f"txt_r{k}"] = hits_i2t[:, :k].any(dim=1).float().mean().item()
        out[f"img_r{k}"] = hits_t2i[:, :k].any(dim=1).float().mean().item()
    out["txt_r_mean"] = sum(out[f"txt_r{k}"] for k in ks) / len(ks)
    out["img_r_mean"] = sum(out[f"img_r{k}"] for k in ks) / len(ks)
    return out


def rerank_with_itm(sim_i2t: torch.Tensor, k: int,
                    pair_scores: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """LAVIS's re-ranking: for each image its top-k captions by ITC (and for each caption its
    top-k images) get ITM positive logit + ITC similarity; everything else scores -100.

    ``pair_scores(image_index [P], text_index [P]) -> [P]`` computes ITM positive logits; every
    distinct pair is scored once even when both directions ask for it.
    Returns (scores_i2t [Ni, Nt], scores_t2i given as [Ni, Nt] too).
    """
    num_images, num_texts = sim_i2t.shape
    k_i2t, k_t2i = min(k, num_texts), min(k, num_images)
    top_txt = sim_i2t.topk(k_i2t, dim=1).indices  # [Ni, k]
    top_img = sim_i2t.t().topk(k_t2i, dim=1).indices  # [Nt, k]
    img_a = torch.arange(num_images).repeat_interleave(k_i2t)
    txt_a = top_txt.reshape(-1)
    img_b = top_img.reshape(-1)
    txt_b = torch.arange(num_texts).repeat_interleave(k_t2i)
    flat = torch.cat([img_a * num_texts + txt_a, img_b * num_texts + txt_b])
    unique, inverse = flat.unique(return_inverse=True)
    itm = pair_scores(unique // num_texts, unique % num_texts).float()
    itm_a, itm_b = itm[inverse[: img_a.numel()]], itm[inverse[img_a.numel():]]
    scores_i2t = torch.full_like(sim_i2t, -100.0)
    scores_i2t[img_a, txt_a] = itm_a + sim_i2t[img_a, txt_a]
    scores_t2i = torch.full_like(sim_i2t, -100.0)
    scores_t2i[img_b, txt_b] = itm_b + sim_i2t[img_b, txt_b]
    return scores_i2t, scores_t2i


def retrieval_metrics(sim_i2t: torch.Tensor, relevant: torch.Tensor, k_test: int,
                      pair_scores: Callable | None) -> dict[str, float]:
    """Flat metrics: itc/{txt,img}_r{1,5,10} and, with ``pair_scores``, itm/... after re-ranking."""
    metrics = {f"itc/{name}": value for name, value in recall_at_k(sim_i2t, relevant).items()}
    if pair_scores is not None:
        scores_i2t, scores_t2i = rerank_with_itm(sim_i2t, k_test, pair_scores)
        i2t = recall_at_k(scores_i2t, relevant)
        t2i = recall_at_k(scores_t2i, relevant)
        for name in i2t:
            source = i2t if name.startswith("txt") else t2i
            metrics[f"itm/{name}"] = source[name]
    return metrics
