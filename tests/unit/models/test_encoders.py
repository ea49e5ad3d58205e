"""Frozen open_clip encoders: penultimate tokens, frozen semantics, precision, weights, real sizes."""

import dataclasses
import time

import open_clip
import pytest
import torch
from omegaconf import OmegaConf

from blip2_train.config import CONF_DIR, EncoderConfig
from blip2_train.models import encoders
from blip2_train.models.encoders import build_image_encoder, resolve_weights


def encoder_cfg(name, **kw):
    cfg = OmegaConf.load(CONF_DIR / "encoder" / f"{name}.yaml")
    cfg.pop("defaults", None)
    cfg.update(kw)
    return cfg


def seeded(name, seed=0, **kw):
    torch.manual_seed(seed)
    return build_image_encoder(encoder_cfg(name, **kw))


def images(batch=2, size=64, seed=1):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def offline_hub(monkeypatch, tmp_path):
    """An empty Hugging Face cache and HF_HUB_OFFLINE=1: no test ever downloads."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "hf_cache"


@pytest.mark.parametrize("name", ["tiny_eva", "tiny_clip"])
def test_tiny_encoders_are_frozen_deterministic_and_graph_free(name):
    enc, again = seeded(name), seeded(name)
    x = images().requires_grad_()
    out = enc(x)
    assert out.shape == (2, 65, 64) and (enc.num_tokens, enc.width, enc.image_size) == (65, 64, 64)
    assert out.dtype == torch.float32
    assert torch.equal(out, again(x))
    assert not any(p.requires_grad for p in enc.parameters())
    assert not out.requires_grad and out.grad_fn is None  # no graph even for an input with grad
    enc.train()
    assert not enc.training and not any(m.training for m in enc.modules())
    assert torch.equal(enc(x), out)
    assert not torch.equal(seeded(name, seed=1)(x), out)  # the seed is what makes it deterministic


def test_tiny_eva_is_a_timm_eva_trunk_cut_before_its_last_block():
    """The kept tokens are the output of block 3 of 4 of the full trunk, with no final norm."""
    from timm.models.eva import Eva

    full = seeded("tiny_eva", drop_last_blocks=0)
    cut = seeded("tiny_eva")
    assert isinstance(cut.vit, Eva) and (full.depth, cut.depth) == (4, 3)
    captured = {}
    full.vit.blocks[2].register_forward_hook(lambda m, i, o: captured.setdefault("x", o))
    full(images())
    assert torch.allclose(cut(images()), captured["x"], atol=1e-6)


def test_tiny_clip_keeps_ln_pre_and_stops_before_its_last_block():
    """Against open_clip's own full visual forward: same embeddings + ln_pre, 3 of 4 blocks, no ln_post."""
    torch.manual_seed(0)
    reference = open_clip.create_model("blip2-tiny-clip").visual.eval()
    cut = seeded("tiny_clip")
    captured = {}
    reference.transformer.resblocks[2].register_forward_hook(lambda m, i, o: captured.setdefault("x", o))
    reference(images())
    assert cut.depth == 3 and cut.vit.proj is None and isinstance(cut.vit.ln_post, torch.nn.Identity)
    assert torch.allclose(cut(images()), captured["x"], atol=1e-5)


@pytest.mark.parametrize("name,width,blocks", [("eva", 1408, 39), ("clip", 1024, 23)])
def test_real_encoders_on_meta_device(name, width, blocks):
    enc = build_image_encoder(encoder_cfg(name), device="meta")
    assert (enc.width, enc.num_tokens, enc.depth, enc.image_size) == (width, 257, blocks, 224)
    assert all(p.is_meta for p in enc.parameters()) and not any(p.requires_grad for p in enc.parameters())
    assert build_image_encoder(encoder_cfg(name, image_size=364), device="meta").num_tokens == 677


def test_eva_g_is_the_timm_giant_trunk_without_final_norm():
    enc = build_image_encoder(encoder_cfg("eva"), device="meta")
    assert enc.kind == "eva" and len(enc.vit.blocks[0].attn.qkv.weight) == 3 * 1408
    assert enc.vit.blocks[0].mlp.fc1.out_features == 6144  # EVA-g's MLP width
    assert isinstance(enc.vit.norm, torch.nn.Identity) and isinstance(enc.vit.head, torch.nn.Identity)


def test_openai_clip_uses_quick_gelu_and_tiny_clip_does_not():
    acts = {type(m).__name__ for m in build_image_encoder(encoder_cfg("clip"), device="meta").modules()}
    assert "QuickGELU" in acts
    assert "QuickGELU" not in {type(m).__name__ for m in seeded("tiny_clip").modules()}


def test_dataclass_config_is_accepted():
    cfg = EncoderConfig(name="tiny_eva", model_name="blip2-tiny-eva", image_size=64)
    torch.manual_seed(0)
    assert torch.equal(build_image_encoder(cfg)(images()), seeded("tiny_eva")(images()))
    assert dataclasses.asdict(cfg).keys() == set(encoder_cfg("tiny_eva").keys())


@pytest.mark.parametrize("name", ["eva", "clip", "tiny_eva", "tiny_clip"])
def test_yaml_keys_are_the_schema_and_pull_a_qformer(name):
    raw = OmegaConf.load(CONF_DIR / "encoder" / f"{name}.yaml")
    assert set(raw.keys()) - {"defaults"} == {f.name for f in dataclasses.fields(EncoderConfig)}
    size = "tiny" if name.startswith("tiny") else "base"
    assert list(raw.defaults) == [{"/qformer": size}, "_self_"]
    assert (CONF_DIR / "encoder" / f"{name}.yaml").read_text().startswith("# @package encoder")


def lavis_interpolate(pos, old, new):
    """LAVIS's interpolate_pos_embed: [1 + old*old, W] -> [1 + new*new, W], bicubic, no antialias."""
    grid = pos[1:].reshape(1, old, old, -1).permute(0, 3, 1, 2)
    grid = torch.nn.functional.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
    return torch.cat([pos[:1], grid.permute(0, 2, 3, 1).reshape(new * new, -1)])


@pytest.mark.parametrize("name,size,tokens", [("tiny_eva", 80, 101), ("tiny_clip", 96, 145)])
def test_position_embeddings_are_interpolated_like_lavis(name, size, tokens):
    def positions(enc):
        return (enc.vit.pos_embed[0] if enc.kind == "eva" else enc.vit.positional_embedding).detach()

    enc = seeded(name, image_size=size)
    assert enc.num_tokens == tokens and enc(images(1, size)).shape == (1, tokens, 64)
    expected = lavis_interpolate(positions(seeded(name)), 8, size // 8)
    assert torch.allclose(positions(enc), expected, atol=1e-6)


def test_missing_weights_fail_fast_with_instructions(offline_hub):
    start = time.time()
    with pytest.raises(RuntimeError) as err:
        build_image_encoder(encoder_cfg("eva"))
    message = str(err.value)
    assert time.time() - start < 10
    for part in ("EVA01-g-14", "laion400m_s11b_b41k", "encoder.pretrained=",
                 "timm/eva_giant_patch14_clip_224.laion400m_s11b_b41k", "open_clip_pytorch_model.bin"):
        assert part in message


def test_unreachable_hub_fails_fast_without_offline_flag(monkeypatch, offline_hub):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(encoders, "_hub_offline", lambda: False)
    monkeypatch.setattr(encoders, "_hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setattr(open_clip, "download_pretrained", lambda *a, **k: pytest.fail("tried to download"))
    with pytest.raises(RuntimeError, match="cannot be reached.*encoder.pretrained="):
        build_image_encoder(encoder_cfg("clip"))


def test_tag_found_in_the_hub_cache_is_used(offline_hub):
    snapshot = offline_hub / "models--timm--vit_large_patch14_clip_224.openai" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    (snapshot / "open_clip_pytorch_model.bin").write_bytes(b"x")
    (offline_hub / "models--timm--vit_large_patch14_clip_224.openai" / "refs").mkdir()
    (offline_hub / "models--timm--vit_large_patch14_clip_224.openai" / "refs" / "main").write_text("abc")
    assert resolve_weights(encoder_cfg("clip")) == str(snapshot / "open_clip_pytorch_model.bin")


def test_unknown_tag_and_missing_file_say_what_is_valid():
    with pytest.raises(ValueError, match="laion400m_s11b_b41k"):
        build_image_encoder(encoder_cfg("eva", pretrained="no_such_tag"), device="meta")
    with pytest.raises(RuntimeError, match="no such file"):
        build_image_encoder(encoder_cfg("eva", pretrained="/nowhere/eva.bin"))


@pytest.mark.parametrize("name", ["tiny_eva", "tiny_clip"])
@pytest.mark.parametrize("fmt", ["full.pt", "full.safetensors", "visual.pt"])
def test_local_weights_file_gives_the_same_tokens(tmp_path, name, fmt):
    """A saved open_clip model (full or image tower only) loads strictly; built without random init."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = open_clip.create_model(encoder_cfg(name).model_name)
    reference = seeded(name)  # same seed -> same weights as `model`
    state = model.visual.state_dict() if fmt.startswith("visual") else model.state_dict()
    path = tmp_path / fmt
    if fmt.endswith(".safetensors"):
        save_file({k: v.contiguous() for k, v in state.items()}, path)
    else:
        torch.save(state, path)
    torch.manual_seed(123)  # a different seed: the tokens must come from the file
    loaded = build_image_encoder(encoder_cfg(name, pretrained=str(path)))
    assert torch.equal(loaded(images()), reference(images()))
    assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.training


def test_weights_of_another_model_are_refused(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "clip.pt"
    torch.save(open_clip.create_model("blip2-tiny-clip").state_dict(), path)
    with pytest.raises(RuntimeError, match="does not hold blip2-tiny-eva image-tower weights"):
        build_image_encoder(encoder_cfg("tiny_eva", pretrained=str(path)))


@pytest.mark.parametrize("name", ["tiny_eva", "tiny_clip"])
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_low_precision_casts_matmul_weights_and_returns_fp32(name, precision):
    dtype = encoders.DTYPES[precision]
    reference, enc = seeded(name), seeded(name, precision=precision)
    linear = next(m for m in enc.modules() if isinstance(m, torch.nn.Linear))
    norm = next(m for m in enc.modules() if isinstance(m, torch.nn.LayerNorm))
    assert linear.weight.dtype == dtype and norm.weight.dtype == torch.float32
    out = enc(images())
    assert out.dtype == torch.float32  # the residual stream stays fp32
    tol = 0.02 if precision == "fp16" else 0.1
    assert torch.allclose(out, reference(images()), atol=tol) and not torch.equal(out, reference(images()))


def test_fp32_encoder_ignores_an_outer_autocast():
    enc = seeded("tiny_eva")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = enc(images())
    assert out.dtype == torch.float32 and torch.equal(out, enc(images()))


def test_unfrozen_encoder_trains():
    enc = seeded("tiny_eva", freeze=False)
    enc.train()
    assert enc.training and enc.vit.training and all(p.requires_grad for p in enc.parameters())
    enc(images()).sum().backward()
    assert enc.vit.blocks[0].attn.qkv.weight.grad is not None
    with pytest.raises(ValueError, match="encoder.precision=fp32"):
        build_image_encoder(encoder_cfg("tiny_eva", freeze=False, precision="fp16"))


@pytest.mark.parametrize("name", ["tiny_eva", "tiny_clip"])
def test_gradient_checkpointing_of_an_unfrozen_encoder_keeps_gradients(name):
    """encoder.gradient_checkpointing recomputes the blocks in backward: same loss, same gradients."""
    grads = []
    for checkpointing in (False, True):
        enc = seeded(name, freeze=False, gradient_checkpointing=checkpointing).eval()  # eval: no drop-path
        assert enc.gradient_checkpointing == checkpointing
        loss = enc(images()).square().mean()
        loss.backward()
        grads.append((loss.detach(), {n: p.grad for n, p in enc.named_parameters()}))
    (loss_a, a), (loss_b, b) = grads
    assert torch.allclose(loss_a, loss_b, atol=1e-6) and a.keys() == b.keys() and len(a) > 10
    for n in a:
        assert a[n] is not None and torch.allclose(a[n], b[n], atol=1e-6), n
    with pytest.raises(ValueError, match="needs encoder.freeze=false"):
        seeded(name, gradient_checkpointing=True)


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="multiple of the patch size 8"):
        build_image_encoder(encoder_cfg("tiny_eva", image_size=60))
    with pytest.raises(ValueError, match="multiple of the patch size 14"):
        build_image_encoder(encoder_cfg("clip", image_size=230), device="meta")
    with pytest.raises(ValueError, match="drop_last_blocks=4"):
        build_image_encoder(encoder_cfg("tiny_clip", drop_last_blocks=4))


@pytest.mark.parametrize("with_head", [True, False])
def test_timm_trunk_checkpoint_loads_into_the_eva_trunk(tmp_path, with_head):
    torch.manual_seed(0)
    trunk = open_clip.create_model("blip2-tiny-eva").visual.trunk
    state = {k: v for k, v in trunk.state_dict().items() if with_head or not k.startswith("head.")}
    torch.save(state, tmp_path / "timm.pt")
    loaded = build_image_encoder(encoder_cfg("tiny_eva", pretrained=str(tmp_path / "timm.pt")))
    assert torch.equal(loaded(images()), seeded("tiny_eva")(images()))


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
def test_torchscript_archive_like_openai_vit_l_14_pt_loads(tmp_path):
    torch.manual_seed(0)
    open_clip.create_model("blip2-tiny-clip", jit=True).save(str(tmp_path / "jit.pt"))
    loaded = build_image_encoder(encoder_cfg("tiny_clip", pretrained=str(tmp_path / "jit.pt")))
    assert torch.equal(loaded(images()), seeded("tiny_clip")(images()))
