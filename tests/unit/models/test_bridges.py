"""Bridges (models/bridges.py): shapes, DeCo's pooling by hand, and stage 2 training / evaluating
with each bridge and each LLM kind."""

import itertools
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from blip2_train.config import CONF_DIR, normalize_overrides, register_configs, validate
from blip2_train.models.bridges import (
    MLPBridge,
    PooledMLPBridge,
    QFormerBridge,
    build_mlp_bridge,
    pool_patch_grid,
)

register_configs()
CAPTIONS = ["a large red circle at the top on a green background",
            "a small blue bar at the bottom on a white background",
            "a small pink ring in the middle on a black background",
            "a large gray cross at the top on a yellow background"]


def cfg_for(llm, cache, *extra):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=normalize_overrides(
            ["stage=2", f"llm={llm}", f"cache_dir={cache}", "encoder=tiny_clip", "qformer.num_hidden_layers=2",
             "llm.tiny.pretrain_steps=0", *extra]))


def test_mlp_bridges_map_encoder_tokens_to_llm_prompts():
    tokens = torch.randn(2, 65, 24)  # CLS + an 8x8 grid, width 24
    assert MLPBridge(24, 40, 65)(tokens).shape == (2, 64, 40)  # every patch token, CLS dropped
    assert MLPBridge(24, 40, 65, keep_cls=True)(tokens).shape == (2, 65, 40)
    assert MLPBridge(24, 40, 65, hidden_size=7).linear_1.out_features == 7
    for count, side in ((1, 1), (4, 2), (16, 4), (9, 3)):
        bridge = PooledMLPBridge(24, 40, 65, count)
        assert bridge(tokens).shape == (2, side * side, 40) and bridge.num_tokens == count
    assert PooledMLPBridge(24, 40, 65, 4, keep_cls=True)(tokens).shape == (2, 5, 40)


def test_qformer_bridge_gives_one_prompt_per_query():
    from blip2_train.config import QFormerConfig
    from blip2_train.models.qformer import QFormer

    cfg = OmegaConf.structured(QFormerConfig(bert=None, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                             intermediate_size=64, num_query_tokens=6))
    bridge = QFormerBridge(QFormer(cfg, vision_width=24, vocab_size=0, query_only=True), torch.nn.Linear(32, 40))
    assert bridge.num_tokens == 6 and bridge.eval()(torch.randn(3, 65, 24)).shape == (3, 6, 40)


def test_pooling_equals_a_hand_computation():
    # a 4x4 grid of 2-wide tokens, row-major: token (r, c) = [10 r + c, -(10 r + c)]
    grid = [[10 * r + c for c in range(4)] for r in range(4)]
    patches = torch.tensor([[[v, -v] for row in grid for v in row]], dtype=torch.float32)  # [1, 16, 2]
    pooled = pool_patch_grid(patches, 2)  # 2x2 blocks
    block_means = [(0 + 1 + 10 + 11) / 4, (2 + 3 + 12 + 13) / 4, (20 + 21 + 30 + 31) / 4, (22 + 23 + 32 + 33) / 4]
    assert pooled[0, :, 0].tolist() == block_means and pooled[0, :, 1].tolist() == [-m for m in block_means]
    # 4 -> 3: adaptive windows overlap, rows/cols [0, 2), [1, 3), [2, 4)
    windows = [(0, 2), (1, 3), (2, 4)]
    by_hand = [sum(grid[r][c] for r in range(*wr) for c in range(*wc)) / 4 for wr in windows for wc in windows]
    assert pool_patch_grid(patches, 3)[0, :, 0].tolist() == pytest.approx(by_hand, abs=1e-6)
    # through the bridge: CLS dropped, then the same pooled tokens enter the MLP
    bridge = PooledMLPBridge(2, 3, 17, 4)
    tokens = torch.cat([torch.full((1, 1, 2), 99.0), patches], 1)
    assert torch.allclose(bridge.select(tokens), pooled)
    assert torch.allclose(bridge(tokens), bridge.project(pooled))


def test_pooling_to_the_full_grid_is_the_llava_mlp():
    torch.manual_seed(0)
    mlp = MLPBridge(24, 40, 65)
    pooled = PooledMLPBridge(24, 40, 65, 64)
    pooled.load_state_dict(mlp.state_dict())
    tokens = torch.randn(2, 65, 24)
    assert torch.allclose(mlp(tokens), pooled(tokens), atol=1e-6)


def test_bad_token_counts_name_the_valid_ones():
    with pytest.raises(ValueError, match="square no larger than the 8x8 patch grid; choose one of: 1, 4, 9"):
        build_mlp_bridge("pool_mlp", 24, 40, 65, num_tokens=10)
    with pytest.raises(ValueError, match="bridge=mlp feeds every patch token"):
        build_mlp_bridge("mlp", 24, 40, 65, num_tokens=16)
    with pytest.raises(ValueError, match="set bridge.num_tokens=8"):
        validate(cfg_for("tiny_opt", "/tmp", "qformer.num_query_tokens=8", "bridge.num_tokens=16"))
    with pytest.raises(ValueError, match="choose one of: mlp, pool_mlp, qformer"):
        cfg = cfg_for("tiny_opt", "/tmp")
        cfg.bridge.name = "perceiver"
        validate(cfg)


def test_bridge_num_tokens_sets_the_qformer_queries():
    cfg = cfg_for("tiny_opt", "/tmp", "bridge.num_tokens=4")
    validate(cfg)
    assert cfg.qformer.num_query_tokens == 4


@pytest.mark.parametrize("llm", ["tiny_opt", "tiny_t5"])
@pytest.mark.parametrize("bridge", ["qformer", "mlp", "pool_mlp"])
def test_each_bridge_trains_in_stage2(bridge, llm, cache):
    from blip2_train.training.stage2 import Stage2Module

    torch.manual_seed(0)
    module = Stage2Module(cfg_for(llm, cache, f"bridge={bridge}"))
    expected = {"qformer": 32, "mlp": 64, "pool_mlp": 16}[bridge]
    assert module.visual_tokens == expected
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    prefix = ("model.", "language_projection.") if bridge == "qformer" else ("bridge.",)
    assert trainable and all(n.startswith(prefix) for n in trainable)  # encoder and LLM frozen
    images = torch.randn(4, 3, 64, 64)
    batch = module.text_collates()[0](CAPTIONS)
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-2)
    module.train()
    losses = []
    for _ in range(5):
        prompts = module.visual_prompts(images)
        assert prompts.shape[:2] == (4, expected)
        loss = module.lm_loss(prompts, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    # a frozen random tiny LLM (no pretraining here, for speed) moves little: OPT ~6.68 -> ~6.54, T5 ~33 -> ~25
    assert all(b < a for a, b in itertools.pairwise(losses)) and losses[-1] < losses[0] - 0.1, losses


@pytest.mark.parametrize("bridge,llm,data", [("mlp", "tiny_opt", "synthetic"), ("pool_mlp", "tiny_t5", "synthetic_scenes")])
def test_mlp_bridge_run_evaluates(bridge, llm, data, tmp_path, cache):
    """A 2-step run with an MLP bridge: checkpoint, evaluate (same val/loss); the bridge's visual tokens and
    trainable parameters reach metrics.json, and on the scenes the fine-grained metrics."""
    from blip2_train.evaluate import evaluate
    from blip2_train.training.fit import train

    overrides = [f"bridge={bridge}", f"data={data}", f"run_dir={tmp_path / 'run'}", "trainer=cpu", "trainer.max_steps=2",
                 "trainer.enable_progress_bar=false", "logger=none", "data.batch_size=4", "data.num_workers=0",
                 "data.synthetic.num_train=8", "data.synthetic.num_val=4", "data.synthetic.samples_per_shard=8",
                 "data.samples_per_epoch=8", "generation.num_beams=1", "generation.max_new_tokens=4",
                 "generation.min_new_tokens=1", "trainer.log_every_n_steps=1"]
    metrics = train(cfg_for(llm, cache, *overrides))
    module_tokens = {"mlp": 64, "pool_mlp": 16}[bridge]
    assert metrics["bridge/visual_tokens"] == module_tokens and metrics["global_step"] == 2
    assert metrics["bridge/trainable_params"] == sum(
        p.numel() for p in build_mlp_bridge(bridge, 64, 64, 65, None if bridge == "mlp" else 16).parameters())
    assert metrics["train/samples_per_s_mean"] > 0
    # LLM tokens per sample: the bridge's visual tokens plus the caption's (at most llm.max_text_len: 48, 32)
    per_sample = metrics["train/llm_tokens_per_s_mean"] / metrics["train/samples_per_s_mean"]
    assert module_tokens + 5 < per_sample <= module_tokens + 48
    scene_keys = {"val/attr_acc", "val/attr_acc/color", "val/count_acc", "val/hallucination"}
    assert scene_keys <= set(metrics) if data == "synthetic_scenes" else not scene_keys & set(metrics)
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    assert "bridge.linear_1.weight" in state and not any(k.startswith("model.") for k in state)
    result = evaluate(str(ckpt), ["generation.num_beams=1"])
    assert result["metrics"]["val/loss"] == pytest.approx(metrics["val/loss"], rel=1e-5)
    assert len(result["predictions"]) == 4
    # generate (the CLI's function) captions an image file with the checkpoint's bridge: the module's own caption
    from PIL import Image

    from blip2_train.data.transforms import eval_transform
    from blip2_train.generate import generate
    from blip2_train.training.checkpoints import load_init
    from blip2_train.training.modules import module_from_checkpoint
    from blip2_train.training.stage2 import Stage2Module

    Image.fromarray((torch.rand(64, 64, 3) * 255).to(torch.uint8).numpy()).save(tmp_path / "img.png")
    module, _ = module_from_checkpoint(ckpt)
    pixels = eval_transform(64)(Image.open(tmp_path / "img.png").convert("RGB"))[None]
    assert generate(str(ckpt), str(tmp_path / "img.png")) == module.generate(pixels)[0]
    # init_from a run of the same bridge: every bridge weight is the checkpoint's
    fresh = Stage2Module(cfg_for(llm, cache, *overrides[:2]))
    report = load_init(fresh, ckpt)
    assert sorted(k for k in report["matched"] if k.startswith("bridge.")) == sorted(
        k for k in state if k.startswith("bridge."))
    assert all(torch.equal(fresh.state_dict()[k], state[k]) for k in state if k.startswith("bridge."))
    # init_from a run of another bridge matches nothing of this one: the error names both bridges
    qformer = Stage2Module(cfg_for(llm, cache, *overrides[1:2]))
    with pytest.raises(ValueError, match="trained with bridge=mlp or bridge=pool_mlp, and this model.s is bridge=qformer"):
        load_init(qformer, ckpt)


def test_qformer_stage1_arm_trains_stage1_once_and_starts_stage2_from_it(tmp_path, cache):
    """bridge=qformer_stage1: a stage 1 is trained first (cached by its config) and loaded as init_from; a
    second run of the arm (another lr and seed) reuses it; another query count trains its own."""
    import yaml

    from blip2_train.training.fit import stage1_init_dir, train

    def run(name, *extra):
        overrides = ["bridge=qformer_stage1", "bridge.stage1_steps=2", "data=synthetic_scenes", "trainer=cpu",
                     f"run_dir={tmp_path / name}", "trainer.max_steps=0", "trainer.enable_progress_bar=false",
                     "logger=none", "data.batch_size=4", "data.num_workers=0", "data.synthetic.num_train=8",
                     "data.synthetic.num_val=4", "data.synthetic.samples_per_shard=8", "data.samples_per_epoch=8",
                     "generation.num_beams=0", "retrieval.k_test=4", *extra]
        train(cfg_for("tiny_opt", cache, *overrides))
        return yaml.safe_load((tmp_path / name / "config.yaml").read_text())

    first = run("a", "bridge.num_tokens=4", "optim.lr=1e-3", "seed=0")
    init = first["init_from"]
    stage1_dir = Path(init).parent.parent
    assert stage1_dir.parent == cache / "stage1_init" and stage1_dir.name.isalnum()
    stage1 = yaml.safe_load((stage1_dir / "config.yaml").read_text())
    assert stage1["stage"]["name"] == 1 and stage1["llm"]["name"] == "none" and stage1["trainer"]["max_steps"] == 2
    assert stage1["qformer"]["num_query_tokens"] == 4 and stage1["seed"] == 0 and stage1["bridge"]["stage1_steps"] == 0
    # max_steps=0 writes the stage-2 model as initialised: its Q-Former is stage 1's, tensor for tensor
    s1 = torch.load(init, map_location="cpu", weights_only=True)["state_dict"]
    s2 = torch.load(tmp_path / "a" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    shared = [k for k in s2 if k.startswith("model.")]
    assert len(shared) > 10 and all(torch.equal(s1[k], s2[k]) for k in shared)
    assert "model.query_tokens" in shared and "language_projection.weight" not in s1
    written = (stage1_dir / "checkpoints" / "last.ckpt").stat().st_mtime_ns
    second = run("b", "bridge.num_tokens=4", "optim.lr=3e-3", "seed=1")
    assert second["init_from"] == init and (stage1_dir / "checkpoints" / "last.ckpt").stat().st_mtime_ns == written
    assert [p.name for p in (cache / "stage1_init").iterdir()] == [stage1_dir.name]
    # another query count (or encoder, data, stage-1 length) is another stage 1
    other = cfg_for("tiny_opt", cache, "bridge=qformer_stage1", "bridge.stage1_steps=2", "data=synthetic_scenes",
                    "trainer=cpu", "bridge.num_tokens=9")
    assert stage1_init_dir(other).parent == stage1_dir.parent and stage1_init_dir(other) != stage1_dir


def test_stage1_steps_is_refused_where_it_cannot_apply(cache):
    with pytest.raises(ValueError, match="needs stage=2 and bridge=qformer"):
        validate(cfg_for("tiny_opt", cache, "bridge=pool_mlp", "bridge.stage1_steps=5"))
    with pytest.raises(ValueError, match="drop one of them"):
        validate(cfg_for("tiny_opt", cache, "bridge=qformer_stage1", "init_from=/tmp/x.ckpt"))
    with pytest.raises(ValueError, match="run stage 1 on its own"):
        validate(cfg_for("tiny_opt", cache, "bridge=qformer_stage1", "trainer=fsdp"))
