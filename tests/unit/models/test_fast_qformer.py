"""Our Q-Former (models/fast_qformer.py) equals transformers' Blip2QFormerModel; cached K/V change nothing."""

import pytest
import torch
from hydra import compose, initialize_config_dir
from transformers import Blip2QFormerConfig
from transformers.models.blip_2.modeling_blip_2 import Blip2QFormerModel

from blip2_train.config import CONF_DIR, normalize_overrides, register_configs
from blip2_train.models.fast_qformer import Dropout, FastQFormerModel, MultiHeadAttention, packed_keep_mask
from blip2_train.models.qformer import itg_mask, itm_mask

register_configs()
WIDTH, VISION, QUERIES, TEXT, TOKENS = 32, 48, 8, 7, 5


def hf_config(text_input=True):
    config = Blip2QFormerConfig(vocab_size=50, hidden_size=WIDTH, num_hidden_layers=4, num_attention_heads=4,
                                intermediate_size=64, encoder_hidden_size=VISION, cross_attention_frequency=2,
                                use_qformer_text_input=text_input)
    config._attn_implementation = "sdpa"
    return config


def pair(text_input=True):
    """transformers' module and ours, each built after the same seed."""
    torch.manual_seed(0)
    hf = Blip2QFormerModel(hf_config(text_input))
    torch.manual_seed(0)
    return hf, FastQFormerModel(hf_config(text_input))


def inputs(batch=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(batch, TOKENS, VISION, generator=g)
    queries = torch.randn(batch, QUERIES, WIDTH, generator=g)
    text = torch.randn(batch, TEXT, WIDTH, generator=g)
    mask = torch.ones(batch, TEXT, dtype=torch.long)
    mask[1, 4:] = 0
    return image, queries, text, mask


def passes(image, queries, text, mask):
    """The four kinds of pass stage 1 runs, as keyword arguments of both modules."""
    joint = torch.cat([queries, text], dim=1)
    return {
        "query_only": {"query_embeds": queries, "query_length": QUERIES, "encoder_hidden_states": image},
        "text_only": {"query_embeds": text, "query_length": 0,
                      "attention_mask": mask.bool()[:, None, None, :]},
        "itg": {"query_embeds": joint, "query_length": QUERIES, "attention_mask": itg_mask(mask, QUERIES),
                "encoder_hidden_states": image},
        "itm": {"query_embeds": joint, "query_length": QUERIES, "attention_mask": itm_mask(mask, QUERIES),
                "encoder_hidden_states": image},
    }


@pytest.mark.parametrize("text_input", [True, False])
def test_same_parameter_names_and_seeded_weights_as_transformers(text_input):
    hf, fast = pair(text_input)
    a, b = hf.state_dict(), fast.state_dict()
    assert list(a) == list(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert "encoder.layer.2.crossattention.attention.key.weight" in b
    assert ("encoder.layer.1.intermediate.dense.weight" in b) == text_input


def test_state_dicts_load_both_ways():
    hf, fast = pair()
    torch.manual_seed(3)
    other = FastQFormerModel(hf_config())
    hf.load_state_dict(other.state_dict(), strict=True)
    fast.load_state_dict(hf.state_dict(), strict=True)
    assert all(torch.equal(v, other.state_dict()[k]) for k, v in fast.state_dict().items())


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("kind", ["query_only", "text_only", "itg", "itm"])
def test_passes_equal_transformers(kind, train):
    """Outputs (and with dropout on, the dropout draws) equal transformers' for the same weights."""
    hf, fast = pair()
    hf.train(train)
    fast.train(train)
    kwargs = passes(*inputs())[kind]
    torch.manual_seed(5)
    expected = hf(**kwargs).last_hidden_state
    torch.manual_seed(5)
    got = fast(**kwargs).last_hidden_state
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, atol=1e-5)


def probe_loss(hidden: torch.Tensor) -> torch.Tensor:
    """A fixed random linear read-out of the outputs. (Not ``hidden.square().sum()``: the outputs
    come out of a LayerNorm at its initial affine, so that sum is a constant, its gradients noise.)"""
    probe = torch.randn(hidden.shape, generator=torch.Generator().manual_seed(11))
    return (hidden * probe).sum()


def test_cached_kv_indexed_by_image_equals_recomputing_forward_and_backward():
    """ITM's [images; negatives; images] through an index into cached K/V: same outputs and gradients."""
    _, fast = pair()
    fast.eval()  # no dropout: the two runs draw differently
    image, queries, text, mask = inputs(batch=4)
    index = torch.tensor([0, 1, 2, 3, 2, 0, 3, 1, 0, 1, 2, 3])  # [3B]
    joint = torch.cat([queries, text], dim=1)[index % 4]
    itm = itm_mask(mask[index % 4], QUERIES)

    def run(cached: bool):
        fast.zero_grad()
        embeds = image.clone().requires_grad_(True)
        if cached:
            out = fast(joint, QUERIES, itm, cross_kv=fast.cross_attention_kv(embeds), image_index=index)
        else:
            out = fast(joint, QUERIES, itm, encoder_hidden_states=embeds[index])
        probe_loss(out.last_hidden_state).backward()
        return out.last_hidden_state, embeds.grad, {n: p.grad.clone() for n, p in fast.named_parameters()
                                                   if p.grad is not None}

    out_a, img_a, grads_a = run(cached=False)
    out_b, img_b, grads_b = run(cached=True)
    assert torch.allclose(out_a, out_b, atol=1e-5)
    assert torch.allclose(img_a, img_b, atol=1e-5)
    assert grads_a.keys() == grads_b.keys() and "encoder.layer.0.crossattention.attention.key.weight" in grads_a
    assert grads_a["encoder.layer.0.crossattention.attention.key.weight"].abs().max() > 1e-4
    assert img_a.abs().max() > 1e-4
    for name in grads_a:
        assert torch.allclose(grads_a[name], grads_b[name], atol=1e-5), name


@pytest.mark.parametrize("train", [False, True])
def test_chunked_kv_equals_gathered_kv_with_the_same_dropout_draws(train):
    """ITM chunks [0, negatives, 0] share K/V without copies: same outputs, gradients and draws."""
    _, fast = pair()
    fast.train(train)
    image, queries, text, mask = inputs(batch=4)
    negatives = torch.tensor([2, 0, 3, 1])
    index = torch.cat([torch.arange(4), negatives, torch.arange(4)])  # [3B]
    joint = torch.cat([queries, text], dim=1)[index % 4]
    itm = itm_mask(mask[index % 4], QUERIES)

    def run(image_index):
        fast.zero_grad()
        embeds = image.clone().requires_grad_(True)
        torch.manual_seed(9)
        out = fast(joint, QUERIES, itm, cross_kv=fast.cross_attention_kv(embeds), image_index=image_index)
        (out.last_hidden_state * torch.linspace(-1, 1, WIDTH)).square().sum().backward()
        return out.last_hidden_state, embeds.grad, {n: p.grad.clone() for n, p in fast.named_parameters()
                                                   if p.grad is not None}

    out_a, img_a, grads_a = run(index)
    out_b, img_b, grads_b = run([0, negatives, 0])
    if train:  # dropout really acted: a different seed changes the output
        fast.zero_grad()
        torch.manual_seed(10)
        other = fast(joint, QUERIES, itm, cross_kv=fast.cross_attention_kv(image), image_index=index)
        assert (other.last_hidden_state - out_a).abs().max() > 1e-2
    assert torch.allclose(out_a, out_b, atol=1e-5)
    assert torch.allclose(img_a, img_b, atol=1e-5)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        assert torch.allclose(grads_a[name], grads_b[name], atol=1e-5), name


def test_chunks_with_offsets_read_the_right_kv_rows():
    """Several ranks: K/V [local; negatives] ([2B]) and chunks [0, B, 0] == gathering [local, B + local, local]."""
    _, fast = pair()
    fast.eval()
    image, queries, text, mask = inputs(batch=8)  # rows 4..7 stand for gathered negatives
    index = torch.cat([torch.arange(4), torch.arange(4) + 4, torch.arange(4)])
    joint = torch.cat([queries[:4], text[:4]], dim=1).repeat(3, 1, 1)
    itm = itm_mask(mask[:4].repeat(3, 1), QUERIES)
    kv = fast.cross_attention_kv(image)
    a = fast(joint, QUERIES, itm, cross_kv=kv, image_index=index).last_hidden_state
    b = fast(joint, QUERIES, itm, cross_kv=kv, image_index=[0, 4, 0]).last_hidden_state
    assert torch.allclose(a, b, atol=1e-5)
    with pytest.raises(ValueError, match="equal chunks"):
        fast(joint[:10], QUERIES, itm[:10], cross_kv=kv, image_index=[0, 4, 0])


@pytest.mark.parametrize("masks", ["torch", "packed"])
def test_gradient_checkpointing_keeps_gradients(masks):
    """Recomputed layers redraw the same dropout masks (torch restores the generator), packed ones too."""
    _, fast = pair()
    fast.set_dropout_masks(masks)
    kwargs = passes(*inputs())["itg"]
    fast.train()
    grads = []
    for checkpointing in (False, True):
        fast.gradient_checkpointing = checkpointing
        fast.zero_grad()
        torch.manual_seed(7)
        probe_loss(fast(**kwargs).last_hidden_state).backward()
        grads.append([p.grad.clone() for p in fast.parameters()])
    assert max(a.abs().max() for a in grads[0]) > 1e-2
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-5)


# ------------------------------------------------------------------------ stage-1 losses
def stage1_module(tmp_path, impl):
    from blip2_train.training.stage1 import Stage1Module

    overrides = [f"cache_dir={tmp_path}", f"run_dir={tmp_path / 'run'}", f"qformer.impl={impl}",
                 "qformer.dropout_masks=torch",  # transformers' draws, so train mode compares exactly
                 "qformer.num_hidden_layers=2", "qformer.num_query_tokens=8"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=normalize_overrides(overrides))
    torch.manual_seed(0)
    module = Stage1Module(cfg)
    module._pad_for_gather = lambda ids, mask: (ids, mask)  # asks the Trainer (none here) for the world size
    return module


def stage1_batch(module, batch=4):
    g = torch.Generator().manual_seed(0)
    size = module.cfg.encoder.image_size
    ids = torch.randint(5, len(module.tokenizer), (batch, 9), generator=g)
    ids[:, 0] = module.tokenizer.cls_token_id
    mask = torch.ones(batch, 9, dtype=torch.long)
    mask[2, 6:] = 0
    return {"image": torch.randn(batch, 3, size, size, generator=g), "input_ids": ids,
            "attention_mask": mask, "image_id": torch.tensor([0, 1, 1, 3])}  # one shared image


def losses_and_grads(module, batch, train):
    module.train(train)
    module.encoder.eval()
    module.zero_grad()
    module.itm_generator = torch.Generator().manual_seed(11)  # the same hard negatives
    torch.manual_seed(5)  # the same dropout draws
    losses = module.stage1_losses(batch)
    losses["loss"].backward()
    grads = {n: p.grad.clone() for n, p in module.model.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in losses.items()}, grads


@pytest.mark.parametrize("several_ranks", [False, True])
def test_stage1_losses_and_gradients_equal_transformers(tmp_path, monkeypatch, several_ranks):
    """impl=fast (K/V once per image, ITM by index) gives impl=hf's losses and every gradient.

    ``several_ranks`` runs the multi-process branch (K/V of the B negatives computed apart) in one
    process: a gather that returns a copy stands in for all_gather.
    """
    hf, fast = stage1_module(tmp_path, "hf"), stage1_module(tmp_path, "fast")
    fast.load_state_dict(hf.state_dict())
    batch = stage1_batch(hf)
    for train in (False, True):
        expected, expected_grads = losses_and_grads(hf, batch, train)
        if several_ranks:
            monkeypatch.setattr("blip2_train.models.objectives.gather_with_grad", lambda x: x.clone())
        got, grads = losses_and_grads(fast, batch, train)
        monkeypatch.undo()
        for name in expected:
            assert torch.allclose(got[name], expected[name], atol=1e-5), name
        assert grads.keys() == expected_grads.keys()
        assert "ln_vision.weight" in grads and "qformer.encoder.layer.0.crossattention.attention.key.weight" in grads
        for name in expected_grads:
            assert torch.allclose(grads[name], expected_grads[name], atol=1e-5), name


# ------------------------------------------------------------------ packed dropout masks
def test_packed_keep_mask_rate_lanes_and_seeding():
    """P(keep) = round(0.9 * 2^16) / 2^16 in every one of the four int16 lanes of a word; seeded."""
    torch.manual_seed(0)
    mask = packed_keep_mask((1000, 4000), 0.1, torch.device("cpu"))
    assert mask.dtype == torch.bool and mask.shape == (1000, 4000)
    expected = 58982 / 65536
    sigma = (expected * (1 - expected) / 1e6) ** 0.5
    lanes = mask.flatten().view(-1, 4).float().mean(0)  # lane j: bits 16j..16j+15 of each word
    assert ((lanes - expected).abs() < 4 * sigma).all(), lanes
    rows = mask.float().mean(1)  # no structure along the rows either: binomial spread
    assert rows.std().item() == pytest.approx((expected * (1 - expected) / 4000) ** 0.5, rel=0.1)
    torch.manual_seed(0)
    assert torch.equal(packed_keep_mask((1000, 4000), 0.1, torch.device("cpu")), mask)
    odd = packed_keep_mask((3, 5, 7), 0.5, torch.device("cpu"))  # 105 elements: not a multiple of 4
    assert odd.shape == (3, 5, 7) and 0.3 < odd.float().mean().item() < 0.7
    assert not packed_keep_mask((64,), 1.0, torch.device("cpu")).any()
    assert packed_keep_mask((64,), 0.0, torch.device("cpu")).all()


def test_packed_dropout_scales_kept_values_and_masks_the_gradient():
    drop = Dropout(0.25)
    drop.masks = "packed"
    x = torch.randn(64, 96, requires_grad=True)
    torch.manual_seed(1)
    y = drop(x)
    torch.manual_seed(1)
    keep = packed_keep_mask(x.shape, 0.25, x.device)
    assert torch.allclose(y, x.detach() * keep / 0.75, rtol=1e-6, atol=0) and (y[~keep] == 0).all()
    assert 0.65 < keep.float().mean().item() < 0.85
    y.backward(torch.ones_like(y))
    assert torch.allclose(x.grad, keep.float() / 0.75, rtol=1e-6, atol=0)
    drop.eval()
    assert drop(x) is x


def test_packed_attention_dropout_acts_on_the_probabilities():
    """Scores -> softmax -> keep mask -> @ V / (1 - p): the mask drawn right after the softmax."""
    _, fast = pair()
    attention = fast.encoder.layer[0].attention.attention
    assert isinstance(attention, MultiHeadAttention)
    fast.set_dropout_masks("packed")
    fast.train()
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(3, 4, 6, 8, generator=g) for _ in range(3))
    torch.manual_seed(4)
    got = attention.attend(q, k, v, None)
    torch.manual_seed(4)
    keep = packed_keep_mask((3, 4, 6, 6), attention.dropout, q.device)
    probs = (q @ k.transpose(-1, -2) / 8 ** 0.5).softmax(-1)
    assert torch.allclose(got, (probs * keep / (1 - attention.dropout)) @ v, atol=1e-6)
    assert not keep.all()


def test_packed_masks_change_only_the_draws():
    """Eval: identical to torch's masks; train: seeded, repeatable, and the loss scale is unchanged."""
    hf, fast = pair()
    fast.set_dropout_masks("packed")
    kwargs = passes(*inputs())["itm"]
    fast.eval()
    hf.eval()
    assert torch.equal(fast(**kwargs).last_hidden_state, hf(**kwargs).last_hidden_state)
    fast.train()
    outs = []
    for seed in (5, 5, 6):
        torch.manual_seed(seed)
        outs.append(fast(**kwargs).last_hidden_state)
    assert torch.equal(outs[0], outs[1]) and not torch.allclose(outs[0], outs[2], atol=1e-3)
    with pytest.raises(ValueError, match="packed, torch"):
        fast.set_dropout_masks("bernoulli")


# ------------------------------------------------------------- outputs only where they are read
@pytest.mark.parametrize("kind,length", [("itm", QUERIES), ("text_only", 1)])
def test_output_length_computes_only_the_rows_read_with_the_same_values_and_gradients(kind, length):
    """ITM reads the query outputs, ITC the text's [CLS]: the last layer computes those rows only
    (fewer FLOPs), with transformers' values and input gradients for them."""
    from torch.utils.flop_counter import FlopCounterMode

    hf, fast = pair()
    hf.eval()
    fast.eval()
    kwargs = passes(*inputs())[kind]
    leaf = kwargs["query_embeds"].clone().requires_grad_()
    kwargs = {**kwargs, "query_embeds": leaf}
    expected = hf(**kwargs).last_hidden_state[:, :length]
    (expected_grad,) = torch.autograd.grad(expected.square().sum(), leaf)
    with FlopCounterMode(display=False) as full:
        fast(**kwargs)
    with FlopCounterMode(display=False) as pruned:
        got = fast(**kwargs, output_length=length).last_hidden_state
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, atol=1e-5)
    (grad,) = torch.autograd.grad(got.square().sum(), leaf)
    assert torch.allclose(grad, expected_grad, atol=1e-5)
    # the last layer's FFN, output and query projections of the other rows are gone
    saved = full.get_total_flops() - pruned.get_total_flops()
    rows = leaf.shape[0] * (leaf.shape[1] - length)
    ffn = 2 * rows * 2 * WIDTH * hf.config.intermediate_size
    assert saved >= ffn, (saved, ffn)


def test_output_length_keeps_torch_dropout_draws_in_training():
    """With torch masks the whole last layer still runs in training: the draws stay transformers'."""
    hf, fast = pair()
    hf.train()
    fast.train()
    kwargs = passes(*inputs())["itm"]
    torch.manual_seed(3)
    expected = hf(**kwargs).last_hidden_state[:, :QUERIES]
    torch.manual_seed(3)
    got = fast(**kwargs, output_length=QUERIES).last_hidden_state
    assert torch.allclose(got, expected, atol=1e-5)
    fast.set_dropout_masks("packed")  # packed: the rows are pruned, the output still [B, Q, H]
    assert fast(**kwargs, output_length=QUERIES).last_hidden_state.shape == expected.shape


def test_gpu_attention_dropout_is_drawn_inside_sdpa(monkeypatch):
    """On a GPU under packed masks, attention dropout is SDPA's own (``dropout_p``): no mask is drawn
    by us and no [L, N] probabilities are stored. Forced here on the CPU (SDPA's fallback draws there)."""
    import torch.nn.functional as F

    from blip2_train.models import fast_qformer

    monkeypatch.setattr(fast_qformer, "_fused", lambda masks, x: masks == "packed")
    monkeypatch.setattr(MultiHeadAttention, "keep_mask", lambda *args: pytest.fail("a mask was drawn outside SDPA"))
    _, fast = pair()
    fast.set_dropout_masks("packed")
    fast.train()
    attention = fast.encoder.layer[0].attention.attention
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(3, 4, 6, 8, generator=g) for _ in range(3))
    torch.manual_seed(4)
    got = attention.attend(q, k, v, None)
    torch.manual_seed(4)
    assert torch.equal(got, F.scaled_dot_product_attention(q, k, v, dropout_p=attention.dropout, scale=8 ** -0.5))
    plain = F.scaled_dot_product_attention(q, k, v, scale=8 ** -0.5)
    assert (got - plain).abs().max() > 1e-2  # dropout acted
    mean = torch.stack([attention.attend(q, k, v, None) for _ in range(2000)]).mean(0)
    assert (mean - plain).abs().max() < 0.05 * plain.abs().max()  # unbiased: 1 / (1 - p) applied

    # the whole model, ITM chunks over shared K/V included: trains without a mask drawn by us
    image, queries, text, mask = inputs(batch=4)
    index = torch.tensor([0, 1, 2, 3, 2, 0, 3, 1, 0, 1, 2, 3])
    joint = torch.cat([queries, text], dim=1)[index % 4]
    embeds = image.clone().requires_grad_(True)
    out = fast(joint, QUERIES, itm_mask(mask[index % 4], QUERIES), cross_kv=fast.cross_attention_kv(embeds),
               image_index=[0, torch.tensor([2, 0, 3, 1]), 0]).last_hidden_state
    probe_loss(out).backward()
    assert out.shape == (12, QUERIES + TEXT, WIDTH) and torch.isfinite(embeds.grad).all()
    assert embeds.grad.abs().sum() > 0


@pytest.mark.parametrize("gpu_path", [False, True])
def test_compiled_qformer_captures_each_pass_as_one_graph(tmp_path, monkeypatch, gpu_path):
    """trainer.compile=true: each of the step's three Q-Former passes (joint, text, ITM) is traced as
    one graph, without graph breaks (CUDA graphs under trainer.compile_mode=reduce-overhead replay whole
    graphs; a break leaves eager launches between them), and the compiled step gives the eager losses
    and gradients. ``gpu_path``: attention dropout inside SDPA, the branch a GPU takes. Dynamo's eager
    backend: the tracing is what is tested, not inductor's code generation (minutes on this CPU)."""
    from torch._dynamo.utils import counters

    if gpu_path:
        monkeypatch.setattr("blip2_train.models.fast_qformer._fused", lambda masks, x: masks == "packed")
    module = stage1_module(tmp_path, "fast")
    module.model.qformer.set_dropout_masks("packed")
    batch = stage1_batch(module)
    expected, expected_grads = losses_and_grads(module, batch, train=False)
    torch._dynamo.reset()
    module.model.qformer.compile(dynamic=True, backend="eager")
    try:
        counters.clear()
        losses_and_grads(module, batch, train=True)  # training: the dropout branches
        assert dict(counters["graph_break"]) == {}
        assert counters["stats"]["unique_graphs"] == 3
        got, grads = losses_and_grads(module, batch, train=False)
    finally:
        torch._dynamo.reset()
    for name in expected:
        assert torch.allclose(got[name], expected[name], atol=1e-6), name
    assert grads.keys() == expected_grads.keys() and len(grads) > 20
    for name in expected_grads:
        assert torch.allclose(grads[name], expected_grads[name], atol=1e-6), name


def test_the_dropout_mask_implementations_are_the_configs_choices():
    """models/ never imports config, so the module keeps its own list; the schema validates against VALID."""
    from blip2_train.config import VALID
    from blip2_train.models.fast_qformer import DROPOUT_MASKS

    assert DROPOUT_MASKS == VALID["qformer.dropout_masks"]
