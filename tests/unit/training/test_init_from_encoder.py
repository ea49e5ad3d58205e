"""init_from and a frozen pretrained encoder (issue 17): the source's vision tower is skipped with a word
in the report, or loaded with init_from_encoder=true (and then kept in the run's checkpoints)."""

import pytest
import torch
from tiny_runs import tiny_run_cfg


def make_cfg(run_dir, cache, *overrides):
    return tiny_run_cfg(run_dir, cache, *overrides, max_steps=0)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """An open_clip checkpoint of the tiny EVA: encoder.pretrained=FILE makes the encoder frozen-pretrained."""
    import open_clip

    import blip2_train.models.encoders  # noqa: F401 - registers blip2-tiny-eva with open_clip

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "tiny_eva.pt"
    torch.save(open_clip.create_model("blip2-tiny-eva").state_dict(), path)
    return path


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, cache, pretrained):
    """A source whose ViT differs from encoder.pretrained (as a fine-tuned LAVIS ViT does): a .ckpt file."""
    from blip2_train.training.stage1 import Stage1Module

    torch.manual_seed(1)
    source = Stage1Module(make_cfg("unused", cache, f"encoder.pretrained={pretrained}"))
    with torch.no_grad():
        for p in source.encoder.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path = tmp_path_factory.mktemp("source") / "tuned.ckpt"
    torch.save({"state_dict": source.state_dict()}, path)
    return path, {k: v for k, v in source.state_dict().items() if k.startswith("encoder.")}


def test_init_from_reports_the_frozen_encoder_it_skips(cache, pretrained, tuned, capsys):
    from blip2_train.training.checkpoints import load_init
    from blip2_train.training.stage1 import Stage1Module

    path, source_encoder = tuned
    module = Stage1Module(make_cfg("unused", cache, f"encoder.pretrained={pretrained}"))
    before = {k: v.clone() for k, v in module.state_dict().items() if k.startswith("encoder.")}
    report = load_init(module, path)
    printed = capsys.readouterr().out
    assert report["skipped"]["encoder."] == sorted(source_encoder)
    assert f"skipped: encoder.* ({len(source_encoder)} keys" in printed and "init_from_encoder=true" in printed
    assert not any(k.startswith("encoder.") for k in report["matched"] + report["missing"] + report["unexpected"])
    after = module.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())  # encoder.pretrained's weights stay


def test_init_from_encoder_loads_the_sources_vision_tower(cache, pretrained, tuned, tmp_path, capsys):
    from blip2_train.training.fit import train
    from blip2_train.training.modules import module_from_checkpoint

    path, source_encoder = tuned
    cfg = make_cfg(tmp_path / "run", cache, f"encoder.pretrained={pretrained}", f"init_from={path}",
                   "init_from_encoder=true")
    train(cfg)
    printed = capsys.readouterr().out
    assert "0 missing, 0 unexpected, 0 shape mismatches" in printed and "skipped: encoder" not in printed
    # the run's checkpoint keeps the loaded ViT (it cannot be rebuilt from encoder.pretrained)
    saved = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    module, _ = module_from_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")
    state = module.state_dict()
    for key, value in source_encoder.items():
        assert torch.equal(saved[key], value) and torch.equal(state[key], value), key
    assert not any(p.requires_grad for p in module.encoder.parameters())  # still frozen


@pytest.mark.parametrize("extra, message", [([], "init_from_encoder=true needs init_from"),
                                            (["init_from=x.ckpt", "data.feature_cache=cache_dir"],
                                             "data.feature_cache")])
def test_init_from_encoder_is_validated(cache, extra, message):
    from blip2_train.config import validate

    with pytest.raises(ValueError, match=message):
        validate(make_cfg("unused", cache, "init_from_encoder=true", *extra))
