"""data.feature_cache: frozen encoder tokens written once, read instead of images, same losses."""

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from blip2_train.config import CONF_DIR, normalize_overrides, register_configs
from blip2_train.data import expand_urls
from blip2_train.data.feature_cache import cache_path, encoder_signature, write_feature_cache
from blip2_train.data.stages import DataLayoutError
from blip2_train.data.synthetic import write_synthetic_shards

register_configs()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from blip2_train.training.fit import build_datamodule
    from blip2_train.training.stage1 import Stage1Module

    root = tmp_path_factory.mktemp("fc")
    write_synthetic_shards(root / "set", num_train=40, num_val=0, image_size=64, samples_per_shard=20, seed=5)
    overrides = [f"cache_dir={root / 'cache'}", f"data.train_shards={root / 'set' / 'train'}", "data.batch_size=8",
                 "data.num_workers=0", "data.samples_per_epoch=16", "data.train_augment=false",
                 "qformer.num_hidden_layers=2", "data.shuffle_buffer=20"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=normalize_overrides(overrides))
    module = Stage1Module(cfg).eval()  # no dropout: losses comparable
    urls = expand_urls(cfg.data.train_shards)
    summary = write_feature_cache(module.encoder, cfg.encoder, urls, str(root / "features"), batch_size=16,
                                  progress=False)
    plain = build_datamodule(cfg, module)
    cached_cfg = cfg.copy()
    with open_dict(cached_cfg):
        cached_cfg.data.feature_cache = str(root / "features")
    return {"cfg": cfg, "cached_cfg": cached_cfg, "module": module, "summary": summary, "urls": urls,
            "plain": plain, "cached": build_datamodule(cached_cfg, module), "root": root}


def test_cache_holds_every_sample_once_at_the_documented_size(setup):
    summary, encoder = setup["summary"], setup["module"].encoder
    tokens, width = encoder.num_tokens, encoder.width
    assert summary == {"shards": 2, "kept": 0, "samples": 40, "bytes_per_sample": tokens * width * 4}  # fp32
    assert all(cache_path(str(setup["root"] / "features"), u).stat().st_size > 20 * tokens * width * 4
               for u in setup["urls"])
    again = write_feature_cache(encoder, setup["cfg"].encoder, setup["urls"], str(setup["root"] / "features"),
                                progress=False)
    assert again["kept"] == 2 and again["shards"] == 0  # written once


def test_cached_batches_carry_the_encoder_tokens_of_the_eval_transform(setup):
    plain, cached = next(iter(setup["plain"].train_dataloader())), next(iter(setup["cached"].train_dataloader()))
    assert plain["key"] == cached["key"] and "image" not in cached  # same seeded order, no image decoded
    expected = setup["module"].encoder(plain["image"])  # [8, T, W]
    assert cached["vision_tokens"].shape == expected.shape
    torch.testing.assert_close(cached["vision_tokens"], expected, rtol=1e-5, atol=1e-5)


def test_stage1_losses_with_cache_equal_losses_from_images_and_skip_the_encoder(setup, monkeypatch):
    module = setup["module"]
    monkeypatch.setattr(module, "_pad_for_gather", lambda ids, mask: (ids, mask))  # no Trainer: one process
    plain, cached = next(iter(setup["plain"].train_dataloader())), next(iter(setup["cached"].train_dataloader()))
    module.itm_generator = torch.Generator().manual_seed(0)
    expected = module.stage1_losses(plain)

    def no_encoder(*args, **kwargs):
        raise AssertionError("the encoder ran although the batch holds its tokens")

    monkeypatch.setattr(module.encoder, "forward", no_encoder)
    module.itm_generator = torch.Generator().manual_seed(0)
    got = module.stage1_losses(cached)
    for name in ("itc", "itm", "itg", "loss"):
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-5)


def test_missing_or_foreign_cache_is_a_clear_error(setup, tmp_path):
    from blip2_train.data.feature_cache import LookupFeatures
    from blip2_train.data.stages import SkipCounter
    from blip2_train.training.fit import build_datamodule

    cfg = setup["cached_cfg"].copy()
    cfg.data.feature_cache = str(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match=r"2 of 2 training shards have no features in data.feature_cache="
                                                r".*python -m blip2_train.data.feature_cache"):
        build_datamodule(cfg, setup["module"]).train_dataloader()
    other = dict(encoder_signature(setup["cfg"].encoder), image_size="224")
    lookup = LookupFeatures(str(setup["root"] / "features"), other, 50, SkipCounter())
    sample = {"__key__": "000000000", "__url__": setup["urls"][0], "txt": b"a caption"}
    with pytest.raises(DataLayoutError, match=r"another encoder setting .*'image_size': \('64', '224'\)"):
        next(lookup(iter([sample])))


def test_command_writes_the_cache_of_the_composed_run(setup, tmp_path):
    from blip2_train.data.feature_cache import main

    root = setup["root"]
    summary = main([f"cache_dir={root / 'cache'}", f"data.train_shards={root / 'set' / 'train'}",
                    f"data.feature_cache={tmp_path / 'f'}", "trainer=cpu"])
    assert summary["shards"] == 2 and summary["samples"] == 40
    assert sorted(p.name.split("-")[0] for p in (tmp_path / "f").iterdir()) == ["00000", "00001"]


def test_stage2_loss_from_cached_features_equals_the_loss_from_images(setup, tmp_path, monkeypatch):
    """Stage 2 fed the cache's tokens: the same visual prompts and language-model loss as from the images,
    without running the encoder."""
    from blip2_train.training.fit import build_datamodule
    from blip2_train.training.stage2 import Stage2Module

    root = setup["root"]
    overrides = [f"cache_dir={root / 'cache'}", f"data.train_shards={root / 'set' / 'train'}", "data.batch_size=8",
                 "data.num_workers=0", "data.samples_per_epoch=16", "data.train_augment=false",
                 "qformer.num_hidden_layers=2", "data.shuffle_buffer=20", "stage=2", "llm=tiny_opt",
                 "llm.tiny.pretrain_steps=0"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=normalize_overrides(overrides))
    module = Stage2Module(cfg).eval()
    write_feature_cache(module.encoder, cfg.encoder, setup["urls"], str(tmp_path / "features"), batch_size=16,
                        progress=False)
    cached_cfg = cfg.copy()
    with open_dict(cached_cfg):
        cached_cfg.data.feature_cache = str(tmp_path / "features")
    plain = next(iter(build_datamodule(cfg, module).train_dataloader()))
    cached = next(iter(build_datamodule(cached_cfg, module).train_dataloader()))
    assert plain["key"] == cached["key"] and "image" not in cached
    with torch.no_grad():
        expected = module.lm_loss(module.visual_prompts(plain["image"]), plain)

        def no_encoder(*args, **kwargs):
            raise AssertionError("the encoder ran although the batch holds its tokens")

        monkeypatch.setattr(module.encoder, "forward", no_encoder)
        # what Stage2Module.training_step computes from a batch
        got = module.lm_loss(module.visual_prompts(cached.get("image"), cached.get("vision_tokens")), cached)
    assert 0.5 < float(expected) < 20
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
