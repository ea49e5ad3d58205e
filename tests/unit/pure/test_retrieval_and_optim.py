"""Recall@k with image_id grouping, ITM re-ranking, parameter groups and the lr schedule."""

import itertools
import math

import pytest
import torch
from torch import nn

from blip2_train.retrieval import group_by_image, recall_at_k, rerank_with_itm, retrieval_metrics
from blip2_train.training.optim import build_optimizer, lr_at, param_groups


def test_recall_counts_any_caption_of_the_image():
    # 2 images, 4 captions: image 0 owns captions 0, 1; image 1 owns 2, 3
    relevant = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1]], dtype=torch.bool)
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.0], [0.8, 0.0, 0.1, 0.2]])
    r = recall_at_k(scores, relevant, ks=(1, 2))
    assert r["txt_r1"] == 0.5  # image 0 hits caption 1; image 1 ranks caption 0 first
    assert r["txt_r2"] == 1.0  # image 1 ranks caption 0, then its own caption 3
    # captions -> images: c0 ranks image 1 first (miss), c1 image 0 (hit), c2 image 0 (miss), c3 image 1 (hit)
    assert r["img_r1"] == 0.5
    assert r["img_r2"] == 1.0


def test_rerank_scores_topk_pairs_once_and_fills_the_rest():
    sim = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.8, 0.3]])
    calls = []

    def itm(img, txt):
        calls.append(len(img))
        return (img * 10 + txt).float()

    i2t, t2i = rerank_with_itm(sim, k=1, pair_scores=itm)
    assert i2t[0, 0] == 0.9 + 0 and i2t[1, 1] == 0.8 + 11
    assert (i2t == -100).sum() == 4
    # texts 0, 1, 2 pick images 0, 1, 0: pairs (0,0) and (1,1) are shared with i2t
    assert t2i[0, 2] == 0.5 + 2
    assert sum(calls) == 3


def test_retrieval_metrics_names():
    sim = torch.eye(5) + 0.01 * torch.randn(5, 5)
    relevant = torch.eye(5, dtype=torch.bool)
    m = retrieval_metrics(sim, relevant, 3, lambda i, t: torch.zeros(len(i)))
    assert m["itc/txt_r1"] == 1.0 and m["itm/img_r1"] == 1.0
    assert {"itc/txt_r5", "itc/img_r10", "itm/txt_r10"} <= set(m)


def test_lr_warmup_then_cosine():
    assert lr_at(0, 10, 110, 1e-4, 1e-5, 1e-6) == 1e-6
    assert math.isclose(lr_at(5, 10, 110, 1e-4, 1e-5, 1e-6), 1e-6 + (1e-4 - 1e-6) / 2)
    assert math.isclose(lr_at(10, 10, 110, 1e-4, 1e-5, 1e-6), 1e-4)
    assert math.isclose(lr_at(60, 10, 110, 1e-4, 1e-5, 1e-6), 1e-5 + (1e-4 - 1e-5) / 2)
    assert math.isclose(lr_at(110, 10, 110, 1e-4, 1e-5, 1e-6), 1e-5)


def test_no_weight_decay_on_biases_and_1d_params():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    model.register_parameter("temp", nn.Parameter(torch.tensor(0.07)))
    frozen = nn.Linear(4, 4)
    frozen.requires_grad_(False)
    model.add_module("frozen", frozen)
    decay, no_decay = param_groups(model, 0.05)
    assert [p.shape for p in decay["params"]] == [torch.Size([4, 4])]
    assert len(no_decay["params"]) == 4  # linear bias, LN weight + bias, temp
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0


def test_scheduler_steps_per_optimizer_step():
    from omegaconf import OmegaConf

    model = nn.Linear(2, 2)
    cfg = OmegaConf.create({"lr": 1e-3, "min_lr": 1e-4, "warmup_start_lr": 1e-5, "warmup_steps": 4,
                           "weight_decay": 0.05, "betas": [0.9, 0.98], "eps": 1e-8})
    built = build_optimizer(model, cfg, max_steps=20)
    opt, sched = built["optimizer"], built["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert math.isclose(lrs[0], 1e-5) and math.isclose(lrs[4], 1e-3)
    assert all(a >= b for a, b in itertools.pairwise(lrs[4:]))
    assert opt.param_groups[0]["betas"] == (0.9, 0.98)


def test_recall_with_several_captions_per_image_uses_best_caption_and_unique_images():
    # captions (one sample each) of images 10, 20, 30, two per image, not adjacent in the val order
    image_ids = torch.tensor([10, 20, 10, 30, 20, 30])
    first, relevant = group_by_image(image_ids)
    assert first.tolist() == [0, 1, 3]  # one row per image, its first sample
    assert relevant.int().tolist() == [[1, 0, 1, 0, 0, 0], [0, 1, 0, 0, 1, 0], [0, 0, 0, 1, 0, 1]]
    # scores [3 images, 6 captions]; columns in sample order (caption of image: 10 20 10 30 20 30)
    scores = torch.tensor([[5.0, 8.0, 9.0, 2.0, 1.0, 3.0],   # image 10: best own caption c2 at rank 1
                           [9.0, 7.0, 8.0, 6.0, 1.5, 5.0],   # image 20: c0, c2, then own c1: rank 3
                           [7.0, 3.0, 2.0, 6.5, 4.0, 1.0]])  # image 30: c0, then own c3: rank 2
    # text -> image, rank of the caption's image among the 3 images (column, its image's score):
    # c0 (10): 9, 7, 5 -> 3; c1 (20): 8, 7, 3 -> 2; c2 (10): 9, 8, 2 -> 1; c3 (30): 6.5, 6, 2 -> 1;
    # c4 (20): 4, 1.5, 1 -> 2; c5 (30): 5, 3, 1 -> 3
    r = recall_at_k(scores, relevant, ks=(1, 2, 3))
    assert [r["txt_r1"], r["txt_r2"], r["txt_r3"]] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert [r["img_r1"], r["img_r2"], r["img_r3"]] == pytest.approx([2 / 6, 4 / 6, 1.0])
    assert r["txt_r_mean"] == pytest.approx(2 / 3) and r["img_r_mean"] == pytest.approx(2 / 3)


def test_adamw_implementations_agree_and_bad_names_are_refused():
    """optim.implementation fused / foreach / for_loop: the same AdamW update (to rounding)."""
    from omegaconf import OmegaConf

    from blip2_train.config import OptimConfig

    results = {}
    for implementation in ("fused", "foreach", "for_loop"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 4))
        cfg = OmegaConf.structured(OptimConfig(implementation=implementation, lr=1e-2, warmup_steps=0))
        optimizer = build_optimizer(model, cfg, max_steps=10)["optimizer"]
        assert bool(optimizer.defaults["fused"]) is (implementation == "fused")
        g = torch.Generator().manual_seed(1)
        for _ in range(4):
            model(torch.randn(32, 8, generator=g)).square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()
        results[implementation] = torch.cat([p.detach().flatten() for p in model.parameters()])
    torch.manual_seed(0)
    initial = torch.cat([p.detach().flatten() for p in
                         nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 4)).parameters()])
    assert (results["for_loop"] - initial).abs().max() > 1e-2  # the steps moved the weights
    assert torch.allclose(results["fused"], results["for_loop"], atol=1e-6)
    assert torch.allclose(results["foreach"], results["for_loop"], atol=1e-6)
    with pytest.raises(ValueError, match="fused, foreach, for_loop"):
        build_optimizer(model, OmegaConf.structured(OptimConfig(implementation="adam8bit")), max_steps=10)
