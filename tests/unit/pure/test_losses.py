"""Stage-1 losses against plain reference computations, and across 2 gloo processes."""

import math
import os
from unittest import mock

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from blip2_train.losses import (
    gather_with_grad,
    hard_negative_indices,
    itc_loss,
    itc_similarities,
    itg_loss,
    itm_loss,
    positive_mask,
)


def features(batch=6, queries=4, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(batch, queries, dim, generator=g), dim=-1)
    text = F.normalize(torch.randn(batch, dim, generator=g), dim=-1)
    return image, text


def reference_itc(image, text, temp, smoothing=0.1):
    """Loops and scalars: the textbook definition, LAVIS's targets with unique images."""
    n = image.shape[0]
    sim_i2t = torch.empty(n, n)
    for i in range(n):
        for j in range(n):
            sim_i2t[i, j] = max(float(image[i, q] @ text[j]) for q in range(image.shape[1]))
    total = 0.0
    for sim in (sim_i2t, sim_i2t.t()):
        for i in range(n):
            logp = torch.log_softmax(sim[i] / temp, dim=0)
            target = torch.full((n,), smoothing / n)
            target[i] += 1 - smoothing
            total += float(-(target * logp).sum()) / n
    return total / 2


def test_itc_equals_reference_computation():
    image, text = features()
    ids = torch.arange(6)
    sim_i2t, sim_t2i = itc_similarities(image, text, text, image)
    loss = itc_loss(sim_i2t, sim_t2i, torch.tensor(0.07), positive_mask(ids, ids))
    assert math.isclose(loss.item(), reference_itc(image, text, 0.07), rel_tol=1e-5)
    assert torch.allclose(sim_t2i, sim_i2t.t())


def test_itc_shared_image_ids_are_soft_positives():
    image, text = features()
    ids = torch.tensor([0, 0, 1, 2, 3, 4])
    sim_i2t, sim_t2i = itc_similarities(image, text, text, image)
    loss = itc_loss(sim_i2t, sim_t2i, torch.tensor(0.1), positive_mask(ids, ids), label_smoothing=0.0)
    target = torch.eye(6)
    target[0, 1] = target[1, 0] = 1
    target = target / target.sum(1, keepdim=True)
    expected = 0.5 * sum(float(-(target * torch.log_softmax(s / 0.1, 1)).sum(1).mean())
                         for s in (sim_i2t, sim_t2i))
    assert math.isclose(loss.item(), expected, rel_tol=1e-5)


def test_hard_negatives_never_pick_a_positive_with_duplicates():
    g = torch.Generator().manual_seed(0)
    ids = torch.tensor([7, 7, 7, 3, 3, 9])
    positives = positive_mask(ids, ids)
    # similarities that strongly favour the duplicates: a naive sampler would pick them
    sim = torch.where(positives, torch.full((6, 6), 50.0), torch.zeros(6, 6))
    for _ in range(200):
        idx, valid = hard_negative_indices(sim, positives, g)
        assert valid.all()
        assert not positives[torch.arange(6), idx].any()


def test_hard_negatives_follow_softmax_weights():
    g = torch.Generator().manual_seed(0)
    ids = torch.arange(3)
    sim = torch.tensor([[0.0, math.log(3.0), 0.0]] * 3)
    counts = torch.zeros(3)
    for _ in range(2000):
        idx, _ = hard_negative_indices(sim, positive_mask(ids, ids), g)
        counts[idx[0]] += 1
    # row 0: column 1 has 3x the weight of column 2; column 0 is the positive
    assert counts[0] == 0
    assert 2.5 < counts[1] / counts[2] < 3.6


def test_hard_negatives_batch_of_one_and_single_image():
    for ids in (torch.tensor([5]), torch.tensor([2, 2, 2])):
        positives = positive_mask(ids, ids)
        sim = torch.randn(len(ids), len(ids))
        idx, valid = hard_negative_indices(sim, positives)
        assert not valid.any()
        assert idx.shape == (len(ids),)


def test_itm_loss_drops_missing_negatives():
    logits = torch.tensor([[0.0, 2.0], [1.0, 0.0], [3.0, -1.0]])
    loss = itm_loss(logits, 1, torch.tensor([1.0, 1.0, 0.0]))
    expected = (F.cross_entropy(logits[:1], torch.tensor([1])) + F.cross_entropy(logits[1:2], torch.tensor([0]))) / 2
    assert math.isclose(loss.item(), expected.item(), rel_tol=1e-6)


def test_itg_loss_shifts_and_ignores_padding():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 10)
    ids = torch.tensor([[1, 4, 5, 6], [1, 7, 0, 0]])
    mask = (ids != 0).long()
    loss = itg_loss(logits, ids, mask, label_smoothing=0.0)
    terms = [F.cross_entropy(logits[0, t:t + 1], ids[0, t + 1:t + 2]) for t in range(3)]
    terms.append(F.cross_entropy(logits[1, 0:1], ids[1, 1:2]))
    assert math.isclose(loss.item(), float(sum(terms) / 4), rel_tol=1e-5)
    # logits of the T - 1 predicting positions only (stage 1's form): the same loss
    assert math.isclose(itg_loss(logits[:, :-1].contiguous(), ids, mask, label_smoothing=0.0).item(),
                        loss.item(), rel_tol=1e-6)
    with pytest.raises(ValueError, match="give T - 1 or T"):
        itg_loss(logits[:, :2], ids, mask)


# --------------------------------------------------------------------------- 2 gloo processes
def _ddp_worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    image, text = features(batch=8)
    image = image.clone().requires_grad_(True)
    ids = torch.arange(8)
    local = slice(rank * 4, rank * 4 + 4)
    li, lt, lids = image[local], text[local], ids[local]
    image_all, text_all = gather_with_grad(li), gather_with_grad(lt)
    ids_all = gather_with_grad(lids)
    sim_i2t, sim_t2i = itc_similarities(li, text_all, lt, image_all)
    loss = itc_loss(sim_i2t, sim_t2i, torch.tensor(0.07), positive_mask(lids, ids_all))
    loss.backward()
    grad = image.grad.clone()
    dist.all_reduce(grad)  # what DDP does with parameter gradients: sum then / world
    out[rank] = torch.cat([loss.detach().reshape(1), (grad / world).reshape(-1)])
    dist.destroy_process_group()


def test_ddp_gathered_itc_equals_single_process(free_port):
    image, text = features(batch=8)
    image = image.clone().requires_grad_(True)
    ids = torch.arange(8)
    sim_i2t, sim_t2i = itc_similarities(image, text, text, image)
    loss = itc_loss(sim_i2t, sim_t2i, torch.tensor(0.07), positive_mask(ids, ids))
    loss.backward()
    ctx = mp.get_context("spawn")
    manager = ctx.Manager()
    out = manager.dict()
    mp.start_processes(_ddp_worker, args=(2, free_port, out), nprocs=2, start_method="spawn")
    for rank in range(2):
        # each rank's loss covers its own rows; their mean is the single-process loss
        assert out[rank].shape[0] == 1 + image.numel()
    mean_loss = (out[0][0] + out[1][0]) / 2
    assert math.isclose(mean_loss.item(), loss.item(), rel_tol=1e-5)
    assert torch.allclose(out[0][1:], image.grad.reshape(-1), atol=1e-6)
    assert torch.allclose(out[1][1:], image.grad.reshape(-1), atol=1e-6)


# The whole stage-1 step on 2 gloo processes: gathered ITC features, ITM negatives from the other
# rank (their K/V from the gathered image states), ln_vision's gradient through the folded K/V
# projections (no gradient of the gathered states). Negatives are fixed (row g of the global batch
# takes g + 1) so that one process on the whole batch sees the same pairs; no dropout. The ranks'
# mean loss and averaged gradients are then the one process's.
STAGE1_PARAMS = ("ln_vision.weight", "ln_vision.bias", "query_tokens", "temp", "itm_head.weight",
                 "embeddings.word_embeddings.weight",
                 "qformer.encoder.layer.0.crossattention.attention.key.weight")


def _stage1_losses(rank: int, world: int, impl: str):
    from omegaconf import OmegaConf

    from blip2_train.config import QFormerConfig, StageConfig
    from blip2_train.models import objectives
    from blip2_train.models.qformer import QFormer

    def fixed_negatives(sim, positives, generator=None):  # row g of the global batch -> g + 1
        rows = torch.arange(sim.shape[0]) + (dist.get_rank() if dist.is_initialized() else 0) * sim.shape[0]
        return (rows + 1) % sim.shape[1], torch.ones(sim.shape[0], dtype=torch.bool)

    cfg = OmegaConf.structured(QFormerConfig(bert=None, impl=impl, hidden_size=32, num_hidden_layers=2,
                                             num_attention_heads=4, intermediate_size=64, num_query_tokens=4,
                                             embed_dim=16, hidden_dropout_prob=0.0,
                                             attention_probs_dropout_prob=0.0))
    torch.manual_seed(0)
    model = QFormer(cfg, vision_width=24, vocab_size=50).train()
    with torch.no_grad():
        model.ln_vision.weight.uniform_(0.5, 1.5)
        model.ln_vision.bias.normal_(0.0, 0.2)
    g = torch.Generator().manual_seed(1)
    batch = {"image": torch.randn(8, 5, 24, generator=g),
             "input_ids": torch.randint(3, 49, (8, 6), generator=g),
             "attention_mask": torch.ones(8, 6, dtype=torch.long), "image_id": torch.arange(8)}
    batch["input_ids"][:, 0] = 1
    if world > 1:
        per = 8 // world
        batch = {k: v[rank * per: (rank + 1) * per] for k, v in batch.items()}
    objective = objectives.Stage1Objective.from_stage(OmegaConf.structured(StageConfig()), dec_token_id=49)
    with mock.patch.object(objectives, "hard_negative_indices", fixed_negatives):  # not left behind in pytest
        loss = objective(model, batch["image"], batch["input_ids"], batch["attention_mask"], batch["image_id"])["loss"]
    loss.backward()
    params = dict(model.named_parameters())
    return loss.detach(), {name: params[name].grad for name in STAGE1_PARAMS}


def _flat(grads: dict) -> torch.Tensor:
    return torch.cat([grads[name].reshape(-1) for name in STAGE1_PARAMS])


def _stage1_worker(rank, world, port, impl, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    loss, grads = _stage1_losses(rank, world, impl)
    flat = _flat(grads)
    dist.all_reduce(flat)  # what DDP does with parameter gradients: sum then / world
    out[rank] = torch.cat([loss.reshape(1), flat / world])
    dist.destroy_process_group()


@pytest.mark.parametrize("impl", ["fast", "hf"])
def test_ddp_stage1_step_equals_single_process(impl, free_port):
    loss, grads = _stage1_losses(0, 1, impl)
    expected = _flat(grads)
    out = mp.get_context("spawn").Manager().dict()
    mp.start_processes(_stage1_worker, args=(2, free_port, impl, out), nprocs=2, start_method="spawn")
    assert math.isclose(((out[0][0] + out[1][0]) / 2).item(), loss.item(), rel_tol=1e-5)
    assert expected.abs().max() > 1e-4 and grads["ln_vision.weight"].abs().max() > 1e-5
    for rank in range(2):
        assert torch.allclose(out[rank][1:], expected, atol=2e-6, rtol=1e-4)


if __name__ == "__main__":
    pytest.main([__file__])
