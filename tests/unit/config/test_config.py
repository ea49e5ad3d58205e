"""Every shipped config composes; wrong keys and values fail with the valid choices named."""

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from blip2_train.config import (
    CONF_DIR,
    NAMED_GROUPS,
    VALID,
    group_choices,
    normalize_overrides,
    register_configs,
    validate,
)

register_configs()


def make(*overrides, conf=CONF_DIR):
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        return compose("config", overrides=normalize_overrides(list(overrides)))


def choices(group):
    return sorted(p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml"))


def test_default_is_the_smoke_experiment():
    default, smoke = make(), make("experiment=smoke")
    for cfg in (default, smoke):
        cfg.run_dir = "x"
        cfg.experiment_name = "smoke"
    assert OmegaConf.to_container(default, resolve=True) == OmegaConf.to_container(smoke, resolve=True)
    assert default.stage.name == 1 and default.encoder.name == "tiny_eva" and default.data.name == "synthetic"
    assert default.qformer.hidden_size == 128 and default.optim.lr == 1e-3  # tiny preset's optimizer


@pytest.mark.parametrize("group", ["encoder", "data", "trainer", "logger", "experiment", "stage", "llm", "bridge"])
def test_every_preset_composes_and_validates(group):
    options = choices(group)
    assert options, f"no presets in conf/{group}"
    for option in options:
        extra = []
        if group == "stage" and option == "2":
            extra = ["llm=tiny_opt"]
        if group == "llm" and option != "none":
            extra = ["stage=2"]
        if group == "data" and option == "synthetic_qa":  # questions: the VQA task's data
            extra = ["stage=2", "llm=tiny_opt", "stage.task=vqa"]
        if group == "bridge":
            extra = ["stage=2", "llm=tiny_opt"]
        if group == "experiment" and make(f"experiment={option}").requires_init_from:
            extra = ["init_from=runs/earlier/checkpoints/last.ckpt"]  # stage 2 and fine-tuning recipes
        cfg = make(f"{group}={option}", *extra)
        if group in NAMED_GROUPS:  # the preset's name field is its file name, or that of the preset it extends
            import yaml

            parents = [d for d in yaml.safe_load((Path(CONF_DIR) / group / f"{option}.yaml").read_text()).get("defaults", [])
                       if isinstance(d, str) and d != "_self_"]
            assert str(cfg[group].name) in (option, *parents)
        if cfg.data.name == "webdataset" and not cfg.data.sources:
            cfg.data.train_shards = "/data/shards"
        validate(cfg)


def test_real_encoders_pull_the_bert_base_qformer_and_lavis_optimizer():
    cfg = make("stage=1", "encoder=eva")
    assert cfg.encoder.model_name == "EVA01-g-14" and cfg.qformer.hidden_size == 768
    assert cfg.qformer.bert == "bert-base-uncased" and cfg.optim.lr == 1e-4 and cfg.optim.warmup_steps == 5000
    assert make("encoder=clip").encoder.model_name == "ViT-L-14"


def test_paper_recipes():
    g = make("experiment=blip2_vitg_stage1")
    assert g.encoder.name == "eva" and g.data.global_batch_size == 1680 and g.trainer.max_steps == 250000
    assert g.optim.lr == 1e-4 and g.optim.min_lr == 1e-5 and g.optim.warmup_start_lr == 1e-6
    assert g.optim.weight_decay == 0.05 and list(g.optim.betas) == [0.9, 0.98]
    assert make("experiment=blip2_vitl_stage1").data.global_batch_size == 2320


def test_global_batch_is_split_over_devices():
    from blip2_train.training.fit import per_device_batch

    cfg = make("experiment=blip2_vitg_stage1")
    assert per_device_batch(cfg, 16) == 105
    with pytest.raises(ValueError, match="does not split over 11 devices"):
        per_device_batch(cfg, 11)


def test_misspelt_key_fails_at_composition():
    with pytest.raises((ConfigCompositionException, ConfigKeyError)) as err:
        make("trainer.max_stepz=3")
    assert "max_stepz" in str(err.value) or "max_stepz" in str(err.value.__cause__)


def test_wrong_type_fails_at_composition():
    with pytest.raises((ConfigCompositionException, ValidationError)):
        make("trainer.max_steps=many")


def test_unknown_group_value_names_the_valid_ones():
    with pytest.raises(ConfigCompositionException) as err:
        make("encoder=evaa")
    message = str(err.value)
    assert "tiny_eva" in message and "clip" in message


def test_unknown_value_of_a_checked_field_names_the_valid_ones():
    cfg = make("logger.name=mlflow")
    with pytest.raises(ValueError, match=r"logger.name='mlflow' is not a preset .*csv, none, tensorboard, wandb"):
        validate(cfg)


def test_group_choices_are_the_yaml_files_of_the_conf_tree():
    assert group_choices("encoder") == ("clip", "eva", "tiny_clip", "tiny_eva")
    assert group_choices("stage") == ("1", "2")
    assert group_choices("llm") == ("flant5", "none", "opt", "tiny_opt", "tiny_t5")
    assert not set(VALID) & {f"{group}.name" for group in NAMED_GROUPS}  # listed once: in the tree


def test_a_new_encoder_yaml_is_a_valid_choice_with_no_python_change(tmp_path, monkeypatch):
    """A preset dropped into a copy of the tree (BLIP2_CONF_DIR) composes, validates and builds; the
    shipped tree rejects the same name, naming its valid presets."""
    import shutil

    from blip2_train.models.encoders import build_image_encoder

    conf = tmp_path / "conf"
    shutil.copytree(CONF_DIR, conf)
    preset = (conf / "encoder" / "tiny_eva.yaml").read_text()
    preset = preset.replace("name: tiny_eva", "name: tiny_eva_96").replace("image_size: 64", "image_size: 96")
    (conf / "encoder" / "tiny_eva_96.yaml").write_text(preset)

    monkeypatch.setenv("BLIP2_CONF_DIR", str(conf))
    cfg = make("encoder=tiny_eva_96", conf=conf)
    validate(cfg)
    assert cfg.encoder.name == "tiny_eva_96" and "tiny_eva_96" in group_choices("encoder")
    encoder = build_image_encoder(cfg.encoder)
    assert encoder(torch.zeros(1, 3, 96, 96)).shape[1] == (96 // 8) ** 2 + 1  # 145 tokens at 96 px

    monkeypatch.delenv("BLIP2_CONF_DIR")
    with pytest.raises(ValueError, match=r"encoder.name='tiny_eva_96' .* clip, eva, tiny_clip, tiny_eva"):
        validate(cfg)


@pytest.mark.parametrize("override,valid", [
    ("qformer.dropout_masks=bernoulli", "packed, torch"),
    ("optim.implementation=apex", "fused, foreach, for_loop"),
    ("trainer.compile_mode=fastest", "default, reduce-overhead, max-autotune, max-autotune-no-cudagraphs"),
])
def test_speed_switches_name_their_valid_values(override, valid):
    with pytest.raises(ValueError, match=f"{override.split('=')[0]}='.*'.*{valid}"):
        validate(make(override, "trainer.compile=true"))


def test_compile_mode_without_compile_is_a_clear_error():
    with pytest.raises(ValueError, match="trainer.compile_mode=reduce-overhead .* add trainer.compile=true"):
        validate(make("trainer.compile_mode=reduce-overhead"))
    validate(make("trainer.compile_mode=reduce-overhead", "trainer.compile=true"))


def test_compile_mode_reaches_torch_compile(tmp_path):
    """trainer.compile_mode is the mode the Q-Former encoder is compiled with (CUDA graphs under
    reduce-overhead); compiled in place, so the module's parameter names stay. Under the CUDA-graph
    modes every training batch starts a new step for CUDA graph trees."""
    from unittest import mock

    from blip2_train.training.stage1 import Stage1Module

    cfg = make(f"cache_dir={tmp_path}", f"run_dir={tmp_path / 'run'}", "qformer.num_hidden_layers=2",
               "trainer.compile=true", "trainer.compile_mode=reduce-overhead")
    with mock.patch("torch.compile", side_effect=lambda fn, **kwargs: fn) as compile_:
        module = Stage1Module(cfg)
    assert compile_.call_count == 1
    assert compile_.call_args.kwargs == {"dynamic": True, "mode": "reduce-overhead"}
    assert compile_.call_args.args[0].__self__ is module.model.qformer
    assert "model.qformer.encoder.layer.0.attention.attention.query.weight" in module.state_dict()
    with mock.patch("torch.compiler.cudagraph_mark_step_begin") as mark:
        module.on_train_batch_start({}, 0)
        module.on_train_batch_start({}, 1)
        assert mark.call_count == 2
        module.cfg.trainer.compile_mode = "max-autotune-no-cudagraphs"
        module.on_train_batch_start({}, 2)
        assert mark.call_count == 2


def test_webdataset_without_shards_is_a_clear_error():
    cfg = make("data=webdataset")
    with pytest.raises(ValueError, match="data.train_shards"):
        validate(cfg)


def test_stage2_without_llm_is_a_clear_error():
    with pytest.raises(ValueError, match="llm=flant5, llm=opt, llm=tiny_opt, llm=tiny_t5"):
        validate(make("stage=2"))


def test_stage_given_as_a_number_is_a_group_choice():
    assert normalize_overrides(["stage=2", "stage=1,2", "encoder=eva"]) == ["stage='2'", "stage='1','2'",
                                                                           "encoder=eva"]


def test_stage2_recipes_need_a_stage1_checkpoint():
    cfg = make("experiment=blip2_vitg_opt27_stage2")
    with pytest.raises(ValueError, match="init_from="):
        validate(cfg)
    opt = make("experiment=blip2_vitg_opt27_stage2", "init_from=x.ckpt")
    assert opt.llm.model == "facebook/opt-2.7b" and opt.data.global_batch_size == 1920
    assert opt.optim.warmup_steps == 2000 and opt.trainer.max_steps == 80000
    t5 = make("experiment=blip2_vitg_flant5xl_stage2", "init_from=x.ckpt")
    assert t5.llm.model == "google/flan-t5-xl" and t5.llm.precision == "bf16" and t5.data.global_batch_size == 1520


def test_bridge_ablation_sweeps_bridge_tokens_lr_and_seed_and_each_job_validates():
    cfg = make("experiment=bridge_ablation")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        hydra_cfg = compose("config", overrides=["experiment=bridge_ablation"], return_hydra_config=True).hydra
    params = hydra_cfg.sweeper.params
    assert str(hydra_cfg.mode) == "RunMode.MULTIRUN" and set(params) == {"bridge", "bridge.num_tokens", "optim.lr", "seed"}
    assert cfg.data.synthetic.kind == "scenes" and cfg.llm.tiny.corpus == "scenes" and not cfg.data.train_augment
    for bridge in params["bridge"].split(","):
        for tokens in params["bridge.num_tokens"].split(","):
            job = make("experiment=bridge_ablation", f"bridge={bridge}", f"bridge.num_tokens={tokens}")
            validate(job)
            assert job.bridge.name == bridge.removesuffix("_stage1") and job.bridge.num_tokens == int(tokens)
            # the Q-Former arms: from scratch, and from a stage 1 of as many steps as stage 2 (bridge=qformer_stage1)
            assert job.bridge.stage1_steps == (job.trainer.max_steps if bridge == "qformer_stage1" else 0)
            if bridge.startswith("qformer"):
                assert job.qformer.num_query_tokens == int(tokens)
    assert set(params["bridge"].split(",")) == {"qformer", "qformer_stage1", "pool_mlp"}
    assert len(params["optim.lr"].split(",")) >= 2 and len(params["seed"].split(",")) >= 2
    assert hydra_cfg.job.env_set.OMP_NUM_THREADS == "1"


def test_a_query_count_alone_sets_the_qformer_bridges_visual_tokens():
    """qformer.num_query_tokens=N on the command line (as before bridges existed) still composes and
    validates in stage 2: the Q-Former bridge's token count follows it; other bridges keep their own."""
    cfg = make("stage=2", "llm=tiny_opt", "qformer.num_query_tokens=8")
    assert cfg.qformer.num_query_tokens == 8 and cfg.bridge.num_tokens == 8
    validate(cfg)
    assert normalize_overrides(["bridge=pool_mlp", "qformer.num_query_tokens=8"]) == [
        "bridge=pool_mlp", "qformer.num_query_tokens=8"]
    cfg = make("stage=2", "llm=tiny_opt", "bridge.num_tokens=16")
    assert cfg.qformer.num_query_tokens == 16
