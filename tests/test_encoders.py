"""Frozen open_clip encoders: penultimate tokens, frozen semantics, real sizes on the meta device."""

import time

import pytest
import torch
from omegaconf import OmegaConf

from blip2_train.config import CONF_DIR
from blip2_train.models.encoders import build_image_encoder


def encoder_cfg(name, **kw):
    cfg = OmegaConf.load(CONF_DIR / "encoder" / f"{name}.yaml")
    cfg.pop("defaults", None)
    cfg.update(kw)
    return cfg


@pytest.mark.parametrize("name", ["tiny_eva", "tiny_clip"])
def test_tiny_encoders_are_frozen_and_deterministic(name):
    torch.manual_seed(0)
    enc = build_image_encoder(encoder_cfg(name))
    torch.manual_seed(0)
    again = build_image_encoder(encoder_cfg(name))
    images = torch.randn(2, 3, 64, 64)
    out = enc(images)
    assert out.shape == (2, 65, 64) and enc.num_tokens == 65 and enc.width == 64
    assert torch.equal(out, again(images))
    assert not any(p.requires_grad for p in enc.parameters())
    assert not out.requires_grad
    enc.train()
    assert not enc.training and not enc.vit.training
    assert torch.equal(enc(images), out)  # no dropout / drop-path in "train" mode


def test_tiny_eva_is_a_timm_eva_trunk_cut_before_its_last_block():
    from timm.models.eva import Eva

    torch.manual_seed(0)
    full = build_image_encoder(encoder_cfg("tiny_eva", drop_last_blocks=0))
    torch.manual_seed(0)
    cut = build_image_encoder(encoder_cfg("tiny_eva"))
    assert isinstance(cut.vit, Eva) and len(full.vit.blocks) == 4 and len(cut.vit.blocks) == 3
    captured = {}
    full.vit.blocks[2].register_forward_hook(lambda m, i, o: captured.setdefault("x", o))
    images = torch.randn(2, 3, 64, 64)
    full(images)
    assert torch.allclose(cut(images), captured["x"], atol=1e-6)


def test_tiny_clip_applies_ln_pre_and_drops_ln_post():
    torch.manual_seed(0)
    enc = build_image_encoder(encoder_cfg("tiny_clip"))
    assert len(enc.vit.transformer.resblocks) == 3
    assert isinstance(enc.vit.ln_post, torch.nn.Identity) and enc.vit.proj is None


@pytest.mark.parametrize("name,width,blocks", [("eva", 1408, 39), ("clip", 1024, 23)])
def test_real_encoders_on_meta_device(name, width, blocks):
    enc = build_image_encoder(encoder_cfg(name), device="meta")
    assert enc.width == width and enc.num_tokens == 257
    depth = len(enc.vit.blocks) if enc.kind == "eva" else len(enc.vit.transformer.resblocks)
    assert depth == blocks
    big = build_image_encoder(encoder_cfg(name, image_size=364), device="meta")
    assert big.num_tokens == 677


def test_missing_weights_fail_fast_with_instructions():
    start = time.time()
    with pytest.raises(RuntimeError) as err:
        build_image_encoder(encoder_cfg("eva"))
    message = str(err.value)
    assert "laion400m_s11b_b41k" in message and "encoder.pretrained" in message
    assert time.time() - start < 30


def test_unknown_tag_names_the_valid_ones():
    with pytest.raises(ValueError, match="laion400m_s11b_b41k"):
        build_image_encoder(encoder_cfg("eva", pretrained="no_such_tag"))


def test_local_weights_file(tmp_path):
    torch.manual_seed(0)
    import open_clip

    full = open_clip.create_model("blip2-tiny-eva")
    path = tmp_path / "tiny.pt"
    torch.save(full.state_dict(), path)
    enc = build_image_encoder(encoder_cfg("tiny_eva", pretrained=str(path)))
    for name, value in enc.vit.state_dict().items():
        assert torch.equal(value, full.visual.trunk.state_dict()[name])


def test_precision_casts_the_frozen_weights():
    enc = build_image_encoder(encoder_cfg("tiny_eva", precision="bf16"))
    assert next(enc.parameters()).dtype == torch.bfloat16
    assert enc(torch.randn(1, 3, 64, 64)).dtype == torch.bfloat16
