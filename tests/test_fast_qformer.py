"""Our Q-Former (models/fast_qformer.py) equals transformers' Blip2QFormerModel; cached K/V change nothing."""

import pytest
import torch
from hydra import compose, initialize_config_dir
from transformers import Blip2QFormerConfig
from transformers.models.blip_2.modeling_blip_2 import Blip2QFormerModel

from blip2_train.config import CONF_DIR, normalize_overrides, register_configs
from blip2_train.models.fast_qformer import FastQFormerModel
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
        "query_only": dict(query_embeds=queries, query_length=QUERIES, encoder_hidden_states=image),
        "text_only": dict(query_embeds=text, query_length=0, attention_mask=mask.bool()[:, None, None, :]),
        "itg": dict(query_embeds=joint, query_length=QUERIES, attention_mask=itg_mask(mask, QUERIES),
                    encoder_hidden_states=image),
        "itm": dict(query_embeds=joint, query_length=QUERIES, attention_mask=itm_mask(mask, QUERIES),
                    encoder_hidden_states=image),
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
        out.last_hidden_state.square().sum().backward()
        return out.last_hidden_state, embeds.grad, {n: p.grad.clone() for n, p in fast.named_parameters()
                                                   if p.grad is not None}

    out_a, img_a, grads_a = run(cached=False)
    out_b, img_b, grads_b = run(cached=True)
    assert torch.allclose(out_a, out_b, atol=1e-5)
    assert torch.allclose(img_a, img_b, atol=1e-5)
    assert grads_a.keys() == grads_b.keys() and "encoder.layer.0.crossattention.attention.key.weight" in grads_a
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


def test_gradient_checkpointing_keeps_gradients():
    _, fast = pair()
    kwargs = passes(*inputs())["itg"]
    fast.train()
    grads = []
    for checkpointing in (False, True):
        fast.gradient_checkpointing = checkpointing
        fast.zero_grad()
        torch.manual_seed(7)
        fast(**kwargs).last_hidden_state.square().sum().backward()
        grads.append([p.grad.clone() for p in fast.parameters()])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-5)


# ------------------------------------------------------------------------ stage-1 losses
def stage1_module(tmp_path, impl):
    from blip2_train.stage1 import Stage1Module

    overrides = [f"cache_dir={tmp_path}", f"run_dir={tmp_path / 'run'}", f"qformer.impl={impl}",
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
            monkeypatch.setattr("blip2_train.stage1.gather_with_grad", lambda x: x.clone())
        got, grads = losses_and_grads(fast, batch, train)
        monkeypatch.undo()
        for name in expected:
            assert torch.allclose(got[name], expected[name], atol=1e-5), name
        assert grads.keys() == expected_grads.keys()
        assert "ln_vision.weight" in grads and "qformer.encoder.layer.0.crossattention.attention.key.weight" in grads
        for name in expected_grads:
            assert torch.allclose(grads[name], expected_grads[name], atol=1e-5), name
