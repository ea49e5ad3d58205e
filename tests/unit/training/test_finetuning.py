"""Fine-tuning (issue 19): a trainable image encoder with layer-wise lr decay, init_from of a fine-tuned ViT
from every source, the caption / retrieval recipes at real sizes on the meta device, and the tiny
fine-tuning runs that must beat their starts."""

import math

import open_clip
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from blip2_train.config import CONF_DIR, normalize_overrides, register_configs, validate
from blip2_train.models.encoders import build_image_encoder
from blip2_train.training.optim import build_optimizer

register_configs()


def make(*overrides):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=normalize_overrides(list(overrides)))


def encoder_cfg(name, **kw):
    cfg = OmegaConf.load(CONF_DIR / "encoder" / f"{name}.yaml")
    cfg.pop("defaults", None)
    cfg.update(kw)
    return cfg



class _WithEncoder(torch.nn.Module):
    """An encoder beside a head, as Stage1Module / Stage2Module hold them (``encoder.`` + the rest)."""

    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder
        self.head = torch.nn.Linear(encoder.width, 3)


def _lr_of(optimizer):
    return {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}


def _wd_of(optimizer):
    return {id(p): group["weight_decay"] for group in optimizer.param_groups for p in group["params"]}


# ------------------------------------------------------------------------------ layer-wise decay
@pytest.mark.parametrize("name", ["tiny_eva", "tiny_clip"])
def test_layer_decay_gives_each_vit_block_lavis_rate(name):
    """3 kept blocks, decay 0.5, lr 1e-3 (LAVIS: block i at decay^(L - i), embeddings at decay^(L + 1))."""
    torch.manual_seed(0)
    model = _WithEncoder(build_image_encoder(encoder_cfg(name, freeze=False)))
    optim = OmegaConf.create({"lr": 1e-3, "min_lr": 0.0, "warmup_start_lr": 1e-3, "warmup_steps": 0,
                              "weight_decay": 0.05, "betas": [0.9, 0.98], "eps": 1e-8,
                              "implementation": "for_loop", "layer_decay": 0.5})
    config = build_optimizer(model, optim, max_steps=100)
    optimizer, lr = config["optimizer"], _lr_of(config["optimizer"])
    params = dict(model.named_parameters())
    if name == "tiny_eva":
        block = "encoder.vit.blocks.{}.attn.qkv.weight"
        embeddings = ["encoder.vit.cls_token", "encoder.vit.pos_embed", "encoder.vit.patch_embed.proj.weight"]
    else:
        block = "encoder.vit.transformer.resblocks.{}.attn.in_proj_weight"
        embeddings = ["encoder.vit.class_embedding", "encoder.vit.positional_embedding", "encoder.vit.conv1.weight",
                      "encoder.vit.ln_pre.weight"]
    expected = {block.format(0): 1.25e-4, block.format(1): 2.5e-4, block.format(2): 5e-4,  # 1e-3 x 0.5^(3 - i)
                "head.weight": 1e-3, "head.bias": 1e-3, **{e: 6.25e-5 for e in embeddings}}  # 1e-3 x 0.5^4
    for key, value in expected.items():
        assert lr[id(params[key])] == pytest.approx(value, rel=1e-12), key
    assert optimizer.param_groups[0]["lr"] == 1e-3  # the base rate comes first (train/lr logs group 0)
    wd = _wd_of(optimizer)  # LAVIS's rule inside the ViT groups too: matrices (the position table too) decay
    norm = "encoder.vit.blocks.1.norm1.weight" if name == "tiny_eva" else "encoder.vit.transformer.resblocks.1.ln_1.weight"
    assert wd[id(params[block.format(1)])] == 0.05 and wd[id(params[embeddings[1]])] == 0.05
    assert wd[id(params[norm])] == 0.0 and lr[id(params[norm])] == pytest.approx(2.5e-4, rel=1e-12)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(params)  # every parameter once
    # the schedule scales every group alike: the per-block ratios hold at every step
    scheduler = config["lr_scheduler"]["scheduler"]
    for _ in range(30):
        optimizer.step()
        scheduler.step()
    lr = _lr_of(optimizer)
    base = lr[id(params["head.weight"])]
    assert base == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 30 / 100)))
    assert lr[id(params[block.format(0)])] == pytest.approx(base * 0.125, rel=1e-12)
    assert lr[id(params[embeddings[0]])] == pytest.approx(base * 0.0625, rel=1e-12)


def test_layer_decay_off_keeps_two_groups_and_needs_a_trainable_encoder():
    torch.manual_seed(0)
    model = _WithEncoder(build_image_encoder(encoder_cfg("tiny_eva", freeze=False)))
    optim = OmegaConf.create({"lr": 1e-3, "min_lr": 0.0, "warmup_start_lr": 1e-3, "warmup_steps": 0,
                              "weight_decay": 0.05, "betas": [0.9, 0.98], "eps": 1e-8, "layer_decay": 1.0})
    optimizer = build_optimizer(model, optim, 10)["optimizer"]
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.05, 0.0]
    assert {g["lr"] for g in optimizer.param_groups} == {1e-3}
    optim.layer_decay = 1.5
    with pytest.raises(ValueError, match=r"optim.layer_decay=1.5 must be in \(0, 1\]"):
        build_optimizer(model, optim, 10)
    with pytest.raises(ValueError, match="add encoder.freeze=false"):
        validate(make("optim.layer_decay=0.9"))
    validate(make("optim.layer_decay=0.9", "encoder.freeze=false"))
    with pytest.raises(ValueError, match="drop data.feature_cache"):
        validate(make("encoder.freeze=false", "data.feature_cache=/x"))


# ---------------------------------------------------------------------- trainable vs frozen encoder
def _stage1(cache, *overrides):
    from blip2_train.training.stage1 import Stage1Module

    cfg = make(f"cache_dir={cache}", "qformer.num_hidden_layers=2", *overrides)
    torch.manual_seed(0)
    module = Stage1Module(cfg)
    module._pad_for_gather = lambda ids, mask: (ids, mask)  # no trainer: one process, equal lengths
    return module


def _batch(module, size=6, length=10):
    g = torch.Generator().manual_seed(3)
    return {"image": torch.randn(size, 3, 64, 64, generator=g), "image_id": torch.arange(size),
            "input_ids": torch.randint(5, len(module.tokenizer), (size, length), generator=g),
            "attention_mask": torch.ones(size, length, dtype=torch.long)}


@pytest.mark.parametrize("freeze", [False, True])
def test_a_few_steps_change_the_encoder_only_when_it_is_trainable(cache, freeze):
    module = _stage1(cache, f"encoder.freeze={str(freeze).lower()}", "optim.warmup_steps=0").train()
    assert module.encoder.training != freeze and module.encoder.vit.training != freeze
    before = {k: v.clone() for k, v in module.encoder.state_dict().items()}
    qformer_before = module.model.query_tokens.detach().clone()
    optimizer = module.configure_optimizers()["optimizer"]
    batch = _batch(module)
    for _ in range(3):
        optimizer.zero_grad()
        module.stage1_losses(batch)["loss"].backward()
        optimizer.step()
    moved = {k: (v - before[k]).norm().item() for k, v in module.encoder.state_dict().items()}
    assert not torch.equal(module.model.query_tokens, qformer_before)  # the Q-Former trains either way
    if freeze:
        assert all(change == 0.0 for change in moved.values())
        assert all(p.grad is None for p in module.encoder.parameters())
    else:
        weights = [k for k in moved if k.endswith("weight")]
        assert len(weights) > 10 and all(moved[k] > 0 for k in weights), [k for k in weights if not moved[k] > 0]


def test_gradient_checkpointing_gives_the_stage1_loss_and_gradients_of_no_checkpointing(cache):
    results = []
    for checkpointing in ("false", "true"):
        module = _stage1(cache, "encoder.freeze=false", f"encoder.gradient_checkpointing={checkpointing}",
                         "qformer.hidden_dropout_prob=0", "qformer.attention_probs_dropout_prob=0")
        module.itm_generator = torch.Generator().manual_seed(1)
        module.train()
        loss = module.stage1_losses(_batch(module))["loss"]
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in module.named_parameters()
                                        if n.startswith("encoder.") and p.grad is not None}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert loss_a == pytest.approx(loss_b.item(), abs=1e-6)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 20
    for name, grad in grads_a.items():
        assert torch.allclose(grad, grads_b[name], atol=1e-6, rtol=1e-5), name
    assert max(g.abs().max().item() for g in grads_a.values()) > 1e-4


def test_checkpoint_holds_a_trainable_encoder_with_pretrained_weights(cache, tmp_path):
    weights = _tiny_eva_weights(tmp_path)
    for freeze, kept in (("true", False), ("false", True)):
        module = _stage1(cache, f"encoder.pretrained={weights}", f"encoder.freeze={freeze}")
        checkpoint = {"state_dict": module.state_dict()}
        module.on_save_checkpoint(checkpoint)
        assert any(k.startswith("encoder.") for k in checkpoint["state_dict"]) == kept


# ------------------------------------------------------------------ init_from of a fine-tuned ViT
def _tiny_eva_weights(tmp_path):
    """An open_clip tiny-EVA weights file: encoder.pretrained for the tests below."""
    path = tmp_path / "tiny_eva.pt"
    if not path.exists():
        torch.manual_seed(11)
        torch.save(open_clip.create_model("blip2-tiny-eva").state_dict(), path)
    return path


def _fine_tuned_source(cache, tmp_path):
    """A stage-1 module whose ViT moved away from the pretrained file (as after fine-tuning)."""
    module = _stage1(cache, f"encoder.pretrained={_tiny_eva_weights(tmp_path)}", "encoder.freeze=false")
    with torch.no_grad():
        g = torch.Generator().manual_seed(5)
        for p in module.encoder.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return module


def _write_source(kind, module, tmp_path):
    if kind == "ours":
        path = tmp_path / "ours.ckpt"
        checkpoint = {"state_dict": module.state_dict()}
        module.on_save_checkpoint(checkpoint)
        torch.save(checkpoint, path)
    elif kind == "transformers":
        from blip2_train.interop.hf_export import export_module

        path = export_module(module, tmp_path / "hf")
    else:  # LAVIS: visual_encoder.* (timm's EVA names), ln_vision, the Q-Former under Qformer.bert
        state = module.state_dict()
        lavis = {"visual_encoder." + k[len("encoder.vit."):]: v for k, v in state.items()
                 if k.startswith("encoder.vit.")}
        lavis.update({"ln_vision." + k.rsplit(".", 1)[1]: v for k, v in state.items()
                      if k.startswith("model.ln_vision.")})
        lavis["query_tokens"] = state["model.query_tokens"]
        path = tmp_path / "lavis.pth"
        torch.save({"model": lavis}, path)
    return path


@pytest.mark.parametrize("kind", ["ours", "transformers", "lavis"])
def test_init_from_loads_a_fine_tuned_vit_exactly_when_the_encoder_trains(cache, tmp_path, kind, capsys):
    """encoder.freeze=false: init_from's ViT replaces the pretrained file's; frozen: the file's stays."""
    from blip2_train.training.checkpoints import load_init

    source = _fine_tuned_source(cache, tmp_path)
    path = _write_source(kind, source, tmp_path)
    expected = source.encoder.state_dict()
    weights = _tiny_eva_weights(tmp_path)
    trained = _stage1(cache, f"encoder.pretrained={weights}", "encoder.freeze=false")
    report = load_init(trained, path)
    capsys.readouterr()
    loaded = trained.encoder.state_dict()
    params = [k for k, _ in trained.encoder.named_parameters()]
    assert all(f"encoder.{k}" in report["matched"] for k in params)
    for key in params:
        assert torch.equal(loaded[key], expected[key]), key
    frozen = _stage1(cache, f"encoder.pretrained={weights}")
    pretrained = {k: v.clone() for k, v in frozen.encoder.state_dict().items()}
    report = load_init(frozen, path)
    assert not any(k.startswith("encoder.") for k in report["matched"])
    assert all(torch.equal(v, pretrained[k]) for k, v in frozen.encoder.state_dict().items())
    assert not torch.equal(pretrained["vit.blocks.0.attn.qkv.weight"], expected["vit.blocks.0.attn.qkv.weight"])


def test_init_from_resamples_the_position_embedding_of_another_image_size(cache, tmp_path, capsys):
    """A ViT fine-tuned at 64 px (8 x 8 patches + CLS) initialises one at 96 px (12 x 12): bicubic resampling
    of the patch grid (align_corners=False, no antialias, as LAVIS's interpolate_pos_embed), CLS kept."""
    from blip2_train.training.checkpoints import load_init

    source = _stage1(cache, "encoder.freeze=false")
    path = tmp_path / "s.ckpt"
    torch.save({"state_dict": source.state_dict()}, path)
    target = _stage1(cache, "encoder.freeze=false", "encoder.image_size=96")
    report = load_init(target, path)
    capsys.readouterr()
    assert "encoder.vit.pos_embed" in report["matched"] and not report["mismatched"]
    old = source.encoder.vit.pos_embed.detach()  # [1, 1 + 64, 64]
    grid = old[:, 1:].reshape(1, 8, 8, 64).permute(0, 3, 1, 2)
    resized = torch.nn.functional.interpolate(grid, size=(12, 12), mode="bicubic", align_corners=False)
    expected = torch.cat([old[:, :1], resized.permute(0, 2, 3, 1).reshape(1, 144, 64)], dim=1)
    assert torch.allclose(target.encoder.vit.pos_embed, expected, atol=1e-6)
    assert torch.equal(target.encoder.vit.blocks[1].mlp.fc1.weight, source.encoder.vit.blocks[1].mlp.fc1.weight)


# ------------------------------------------------------------------------------------- recipes
def test_recipes_compose_with_the_paper_values():
    cap = make("experiment=blip2_caption_coco_ft", "init_from=x.ckpt")
    validate(_with_shards(cap))
    assert (cap.stage.name, cap.encoder.name, cap.llm.name, cap.encoder.image_size) == (2, "eva", "opt", 364)
    assert not cap.encoder.freeze and cap.encoder.gradient_checkpointing and cap.encoder.precision == "fp32"
    assert cap.llm.prompt == "a photo of " and cap.generation.prompt == "a photo of"
    assert (cap.generation.num_beams, cap.generation.min_new_tokens, cap.generation.max_new_tokens) == (5, 8, 30)
    assert (cap.optim.lr, cap.optim.min_lr, cap.optim.warmup_start_lr, cap.optim.warmup_steps) == (1e-5, 0, 1e-8, 1000)
    assert cap.optim.weight_decay == 0.05 and cap.data.global_batch_size == 16 * 16
    assert cap.trainer.max_steps == 5 * 2214  # 5 epochs of 566,747 captions at 256 a step
    ret = make("experiment=blip2_retrieval_coco_ft", "init_from=x.ckpt")
    validate(_with_shards(ret))
    assert (ret.stage.name, ret.encoder.image_size, ret.optim.layer_decay, ret.retrieval.k_test) == (1, 364, 0.95, 128)
    assert not ret.encoder.freeze and ret.data.global_batch_size == 14 * 16 and ret.trainer.max_steps == 5 * 2531
    flickr = make("experiment=blip2_retrieval_flickr_ft", "init_from=x.ckpt")
    assert flickr.data.samples_per_epoch == 145000 and flickr.trainer.max_steps == 5 * 648
    for name in ("blip2_caption_coco_ft", "blip2_retrieval_coco_ft", "blip2_retrieval_flickr_ft",
                 "blip2_caption_ft_tiny", "blip2_retrieval_ft_tiny"):
        with pytest.raises(ValueError, match="init_from="):
            validate(_with_shards(make(f"experiment={name}")))


def _with_shards(cfg):
    if cfg.data.name == "webdataset":
        cfg.data.train_shards = "/data/shards"
    return cfg


@pytest.mark.parametrize("recipe, tokens", [("blip2_caption_coco_ft", 26 * 26 + 1), ("blip2_retrieval_coco_ft", 26 * 26 + 1),
                                           ("blip2_vitg_opt27_vqa_from_stage2", 35 * 35 + 1)])
def test_recipes_build_at_real_size_on_the_meta_device(recipe, tokens):
    """ViT-g at 364 px (490 for VQA; trainable, checkpointed), the BERT-base Q-Former and, for stage 2, the
    OPT-2.7B sizes, without weights; with layer decay (retrieval, VQA) the ViT groups at 0.95^(39 - i) and 0.95^40."""
    from transformers import OPTConfig, OPTForCausalLM

    from blip2_train.models.qformer import QFormer, num_parameters

    cfg = make(f"experiment={recipe}", "init_from=x.ckpt")
    encoder = build_image_encoder(cfg.encoder, device="meta")
    assert (encoder.depth, encoder.num_tokens, encoder.width) == (39, tokens, 1408)
    assert encoder.gradient_checkpointing and encoder.vit.grad_checkpointing and not encoder.frozen
    assert all(p.is_meta and p.requires_grad and p.dtype == torch.float32 for p in encoder.parameters())
    with torch.device("meta"):
        qformer = QFormer(cfg.qformer, vision_width=encoder.width, vocab_size=30523, pad_token_id=0,
                          query_only=cfg.stage.name == 2 and cfg.stage.task == "caption")
    model = _WithEncoder(encoder)
    model.model = qformer
    assert 980e6 < num_parameters(encoder) < 990e6  # EVA-g's 39 kept blocks, 40.4M per block x 39 + embeddings
    if cfg.stage.name == 2:
        opt = OPTConfig(hidden_size=2560, num_hidden_layers=32, num_attention_heads=32, ffn_dim=10240,
                        vocab_size=50272, max_position_embeddings=2048, word_embed_proj_dim=2560)
        with torch.device("meta"):
            llm = OPTForCausalLM(opt)
        assert 2.6e9 < sum(p.numel() for p in llm.parameters()) < 2.7e9
    optimizer = build_optimizer(model, cfg.optim, cfg.trainer.max_steps)["optimizer"]
    lr = {id(p): group["initial_lr"] for group in optimizer.param_groups for p in group["params"]}  # peak rates
    params = dict(model.named_parameters())
    base = cfg.optim.lr
    if cfg.optim.layer_decay == 1.0:
        assert set(lr.values()) == {base}
    else:
        assert lr[id(params["encoder.vit.blocks.38.mlp.fc2.weight"])] == pytest.approx(base * 0.95)
        assert lr[id(params["encoder.vit.blocks.0.mlp.fc2.weight"])] == pytest.approx(base * 0.95 ** 39)
        assert lr[id(params["encoder.vit.pos_embed"])] == pytest.approx(base * 0.12851215656510308)  # 0.95^40
        assert lr[id(params["model.query_tokens"])] == base
        assert len(optimizer.param_groups) == 2 + 40 * 2  # Q-Former (decay, no decay) + 40 ViT layers x 2


# ------------------------------------------------------------- the tiny fine-tuning runs (done-when)
# The tiny chain on synthetic data: stage 1 -> stage 2 -> caption fine-tuning (experiment=blip2_caption_ft_tiny),
# stage 1 -> retrieval fine-tuning (experiment=blip2_retrieval_ft_tiny). The starts validate with the
# recipes' evaluation settings (k_test 16; beam 2, 4 to 24 tokens, no prompt), so their metrics are
# the fine-tuning runs' starting points.
CHAIN = ["trainer=cpu", "trainer.enable_progress_bar=false", "logger=none", "data.num_workers=0",
         "qformer.num_hidden_layers=2", "data.batch_size=16", "data.synthetic.num_train=512",
         "data.synthetic.num_val=50", "data.synthetic.samples_per_shard=256", "data.samples_per_epoch=512"]
START_STEPS = 60
CAPTION_EVAL = ["generation.num_beams=2", "generation.max_new_tokens=24", "generation.min_new_tokens=4",
                "generation.prompt=''"]  # blip2_caption_ft_tiny's generation settings


@pytest.fixture(scope="module")
def tiny_starts(tmp_path_factory):
    """A tiny stage-1 run and a stage-2 run from it, START_STEPS steps each: (root, stage 1, stage 2 metrics)."""
    from blip2_train.training.fit import train

    root = tmp_path_factory.mktemp("chain")
    common = [f"cache_dir={root / 'cache'}", *CHAIN, f"trainer.max_steps={START_STEPS}"]
    stage1 = train(make(*common, f"run_dir={root / 's1'}", "retrieval.k_test=16"))
    stage2 = train(make(*common, f"run_dir={root / 's2'}", "stage=2", "llm=tiny_opt",
                        f"init_from={root / 's1' / 'checkpoints' / 'last.ckpt'}", *CAPTION_EVAL))
    return root, stage1, stage2


def _finetune(root, recipe, start, name, *extra):
    from blip2_train.training.fit import train

    return train(make(f"experiment={recipe}", f"cache_dir={root / 'cache'}", *CHAIN, f"run_dir={root / name}",
                      f"init_from={root / start / 'checkpoints' / 'last.ckpt'}", *extra))


def _state(root, run):
    return torch.load(root / run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]


@pytest.mark.slow  # the stage-1 and stage-2 starts and the fine-tuning: minutes on 2 cores
def test_caption_finetuning_trains_the_encoder_and_raises_cider(tiny_starts):
    root, _, stage2 = tiny_starts
    tuned = _finetune(root, "blip2_caption_ft_tiny", "s2", "caption_ft")
    start, end = _state(root, "s2"), _state(root, "caption_ft")
    encoder = [k for k in start if k.startswith("encoder.vit.") and k.endswith("weight")]
    change = sum(((end[k] - start[k]) ** 2).sum() for k in encoder).sqrt().item()
    print(f"caption fine-tuning: CIDEr {stage2['cider']:.4f} -> {tuned['cider']:.4f}, BLEU-4 {stage2['bleu4']:.4f} "
          f"-> {tuned['bleu4']:.4f}, val loss {stage2['val/loss']:.4f} -> {tuned['val/loss']:.4f}, "
          f"encoder weight change norm {change:.3f}")
    assert len(encoder) == 1 + 3 * 6  # patch embedding + 3 kept blocks x (2 norms, qkv, proj, fc1, fc2): all moved
    assert all(not torch.equal(start[k], end[k]) for k in encoder)
    # measured 0.921 -> 1.105 and 0.498 -> 0.483; both write one caption for every image (docs/finetuning.md)
    assert tuned["cider"] > stage2["cider"] + 0.1 and tuned["val/loss"] < stage2["val/loss"]


@pytest.mark.slow
def test_retrieval_finetuning_raises_r1_over_its_stage1_start(tiny_starts):
    root, stage1, _ = tiny_starts
    tuned = _finetune(root, "blip2_retrieval_ft_tiny", "s1", "retrieval_ft")
    start, end = _state(root, "s1"), _state(root, "retrieval_ft")
    change = sum(((end[k] - start[k]) ** 2).sum() for k in start if k.startswith("encoder.")).sqrt().item()
    r1 = {name: {k: m[f"{k}_r1"] for k in ("itm/txt", "itm/img", "itc/txt", "itc/img")}
          for name, m in (("start", stage1), ("tuned", tuned))}
    print(f"retrieval fine-tuning: R@1 {r1['start']} -> {r1['tuned']}, encoder weight change norm {change:.3f}")
    mean = {name: (r["itm/txt"] + r["itm/img"]) / 2 for name, r in r1.items()}  # the re-ranked R@1
    assert mean["tuned"] > mean["start"] + 0.1 and change > 0  # measured 0.02 -> 0.18 (120 steps)
