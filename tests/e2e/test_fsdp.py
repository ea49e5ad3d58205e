"""trainer=fsdp on 2 CPU processes (gloo): FSDP2 losses and gradients equal DDP's (stage 1 and 2); runs
through the command line save sharded checkpoints, resume from them, consolidate, evaluate."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

SMALL = ["trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.enable_progress_bar=false",
         "data.num_workers=0", "data.batch_size=4", "data.synthetic.num_train=32", "data.synthetic.num_val=8",
         "data.synthetic.samples_per_shard=16", "data.samples_per_epoch=32", "retrieval.k_test=4",
         "qformer.num_hidden_layers=2", "trainer.log_every_n_steps=1"]
STAGE2 = ["stage=2", "llm=tiny_opt", "llm.tiny.pretrain_steps=0", "generation.num_beams=2",
          "generation.max_new_tokens=4", "generation.min_new_tokens=1"]
# fine-tuning (issue 19): the ViT's blocks become trainable units, recomputed in backward
ENCODER_TRAINS = ["encoder.freeze=false", "encoder.gradient_checkpointing=true"]


def _module(cache, stage):
    from hydra import compose, initialize_config_dir

    from blip2_train.config import CONF_DIR, normalize_overrides, register_configs
    from blip2_train.training.modules import build_module

    register_configs()
    stage, _, variant = stage.partition("+")  # "1+encoder": stage 1 with a trainable encoder
    overrides = [f"cache_dir={cache}", "qformer.num_hidden_layers=2", "qformer.hidden_dropout_prob=0",
                 "qformer.attention_probs_dropout_prob=0"] + (STAGE2 if stage == "2" else [])
    overrides += ENCODER_TRAINS if variant == "encoder" else []
    overrides += [f"bridge={variant}"] if variant in ("mlp", "pool_mlp") else []  # "2+mlp": stage 2, an MLP bridge
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=normalize_overrides(overrides))
    torch.manual_seed(0)
    module = build_module(cfg).train()
    module._pad_for_gather = lambda ids, mask: (ids, mask)  # no trainer: the batch is already equal-length
    return module


def _local_batch(rank, module, per_rank=4, length=12):
    from blip2_train.data.synthetic import random_caption

    g = torch.Generator().manual_seed(7)
    total = 2 * per_rank
    batch = {"image": torch.randn(total, 3, 64, 64, generator=g), "image_id": torch.arange(total)}
    if module.cfg.stage.name == 2:
        import random

        rng = random.Random(7)
        batch.update(module.text_collates()[0]([random_caption(rng) for _ in range(total)]))
    else:
        batch["input_ids"] = torch.randint(5, len(module.tokenizer), (total, length), generator=g)
        batch["attention_mask"] = torch.ones(total, length, dtype=torch.long)
        batch["attention_mask"][::3, 8:] = 0  # some padding
    return {k: v[rank * per_rank:(rank + 1) * per_rank] for k, v in batch.items()}


def _losses(module, batch):
    if module.cfg.stage.name == 1:
        return module.stage1_losses(batch)
    return {"loss": module.lm_loss(module.visual_prompts(batch["image"]), batch)}


def _grad_worker(rank, world, port, cache, stage, out):
    """One step of the same batch half through an unsharded replica whose gradients are averaged
    (what DDP does) and through the FSDP-sharded model; the same ITM negatives (same generator).
    The sharded model first runs a forward without backward (a skipped non-finite step)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    from blip2_train.training.fsdp import reshard_trainable, shard_blip2

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    replica, sharded = _module(cache, stage), _module(cache, stage)
    units = shard_blip2(sharded, init_device_mesh("cpu", (world,)))
    batch = _local_batch(rank, replica)
    _losses(sharded, batch)  # a forward without backward first, as a skipped non-finite step leaves
    losses = {}
    for name, module in (("replica", replica), ("fsdp", sharded)):
        module.itm_generator = torch.Generator().manual_seed(100 + rank)
        result = _losses(module, batch)
        result["loss"].backward()
        losses[name] = {k: v.detach() for k, v in result.items()}
    reshard_trainable(units)
    grads = {}
    for (name, p), (_, q) in zip(replica.named_parameters(), sharded.named_parameters()):
        if not p.requires_grad:
            continue
        dist.all_reduce(p.grad)
        full = q.grad.full_tensor() if isinstance(q.grad, DTensor) else q.grad
        grads[name] = ((p.grad / world - full).abs().max().item(), p.grad.abs().max().item() / world)
    out[rank] = {"losses": {k: (losses["replica"][k].item(), losses["fsdp"][k].item()) for k in losses["fsdp"]},
                 "grads": grads, "sharded": all(isinstance(q, DTensor) for q in sharded.parameters()
                                                if q.requires_grad)}
    dist.destroy_process_group()


# the MLP bridges are one trainable unit (blip2_train/fsdp.py); mlp is pool_mlp's class at the full grid
@pytest.mark.parametrize("stage", ["1", "2", "1+encoder", "2+pool_mlp", pytest.param("2+mlp", marks=pytest.mark.slow)])
def test_fsdp_loss_and_gradients_equal_ddp(cache, stage, free_port):
    _module(cache, stage)  # writes the tiny tokenizers once, before two processes race for them
    out = mp.get_context("spawn").Manager().dict()
    mp.start_processes(_grad_worker, args=(2, free_port, str(cache), stage, out), nprocs=2,
                       start_method="spawn")
    for rank in range(2):
        result = out[rank]
        assert result["sharded"]
        for name, (ddp, fsdp) in result["losses"].items():
            assert fsdp == pytest.approx(ddp, abs=1e-5), name
        assert len(result["grads"]) > {"1": 40, "2": 25, "1+encoder": 90, "2+pool_mlp": 3, "2+mlp": 3}[stage]
        assert any(name.startswith("encoder.") for name in result["grads"]) == (stage == "1+encoder")
        if "mlp" in stage:  # the bridge's Linear, GELU, Linear and nothing else trains
            assert sorted(result["grads"]) == [f"bridge.linear_{i}.{w}" for i in (1, 2) for w in ("bias", "weight")]
        worst = max(diff for diff, _ in result["grads"].values())
        print(f"rank {rank}: loss {result['losses']['loss']}, max |grad diff| {worst:.2e}")
        for name, (diff, scale) in result["grads"].items():
            assert diff <= 1e-5 + 1e-4 * scale, name
        assert max(scale for _, scale in result["grads"].values()) > 1e-3  # gradients are not all zero


def _csv_losses(path):
    import csv

    return [float(r["train/loss"]) for r in csv.DictReader(path.read_text().splitlines()) if r.get("train/loss")]


def _run(tmp_path, cache, run, *extra):
    cmd = [sys.executable, "-m", "blip2_train", f"run_dir={run}", f"cache_dir={cache}", *SMALL, *extra]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("BLIP2_RUN_DIR", None)
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((run / "metrics.json").read_text())


# 4 two-process runs: about a minute and a half each on 2 free cores. All slow, to keep the default suite
# under 15 minutes: test_hub_layout's FSDP test runs the same sharded save -> resume -> consolidate ->
# evaluate path in the default suite (stage 2, a hub-layout LLM). Stage 2 here failed once inside a
# full-suite run and passed alone and in the run before it (not understood yet).
@pytest.mark.parametrize("stage", [pytest.param("1", marks=pytest.mark.slow), pytest.param("2", marks=pytest.mark.slow),
                                   pytest.param("2+pool_mlp", marks=pytest.mark.slow)])
def test_fsdp_run_saves_shards_resumes_consolidates_and_evaluates(tmp_path, cache, stage):
    from blip2_train.consolidate import consolidate
    from blip2_train.evaluate import evaluate

    stage, _, bridge = stage.partition("+")
    extra = STAGE2 + ([f"bridge={bridge}"] if bridge else []) if stage == "2" else ["encoder=tiny_eva"]
    run = tmp_path / "run"
    first = _run(tmp_path, cache, run, "trainer.max_steps=2", *extra)
    last = run / "checkpoints" / "last.ckpt"
    assert first["global_step"] == 2 and last.is_dir()
    assert sorted(p.name for p in last.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp", "meta.pt"]
    second = _run(tmp_path, cache, run, "trainer.max_steps=4", *extra)
    assert second["global_step"] == 4 and second["resumed_from_step"] == 2
    if stage == "1":  # the resumed steps are an uninterrupted run's (the LR is in warmup: max_steps moves nothing)
        _run(tmp_path, cache, tmp_path / "uninterrupted", "trainer.max_steps=4", *extra)
        expected = _csv_losses(tmp_path / "uninterrupted" / "logs" / "metrics.csv")
        resumed = _csv_losses(run / "logs" / "metrics.csv") + _csv_losses(run / "logs" / "from_step_2" / "metrics.csv")
        assert len(expected) == len(resumed) == 4
        # 1e-5: CPU run-to-run noise is ~5e-7 (test_runs_cli); a wrong resume moves losses by 1e-2 or more
        assert resumed == pytest.approx(expected, rel=0, abs=1e-5), (resumed, expected)
    one = tmp_path / "one.ckpt"
    checkpoint = consolidate(last, one)
    assert checkpoint["global_step"] == 4 and "optimizer_states" not in checkpoint
    if bridge:  # the MLP bridge's unit is in the shards, whole in the consolidated file; no Q-Former
        weights = checkpoint["state_dict"]
        assert weights["bridge.linear_1.weight"].shape == (64, 64) and not any(k.startswith("model.") for k in weights)
    result = evaluate(str(one), ["trainer.enable_progress_bar=false"])
    names = ["val/loss", "cider"] if stage == "2" else ["itc/txt_r1", "itm/img_r5", "itc/img_r_mean"]
    for name in names:  # the consolidated weights are the ones the run validated with
        assert result["metrics"][name] == pytest.approx(second[name], abs=1e-5), name
    table = [json.loads(line) for line in (run / "val_samples.jsonl").read_text().splitlines()]
    assert [r["step"] for r in table] == [2] * 4 + [4] * 4  # one table per validation, rank 0 only
    text = "generated_caption" if stage == "2" else "top_retrieved_caption"
    assert all(isinstance(r[text], str) for r in table)


@pytest.mark.slow  # two two-process runs (about two minutes on 2 free cores)
def test_fsdp_run_with_a_trainable_encoder_saves_it_and_resumes(tmp_path, cache):
    """encoder.freeze=false under FSDP2: the ViT's blocks train as sharded units (gradient checkpointing
    on), the shards hold them, a resumed run continues them, and the consolidated file carries them."""
    from blip2_train.consolidate import consolidate

    run, extra = tmp_path / "run", ["encoder=tiny_eva", *ENCODER_TRAINS]
    first = _run(tmp_path, cache, run, "trainer.max_steps=2", *extra)
    at_two = consolidate(run / "checkpoints" / "last.ckpt", tmp_path / "two.ckpt")["state_dict"]
    second = _run(tmp_path, cache, run, "trainer.max_steps=4", *extra)
    assert (first["global_step"], second["global_step"], second["resumed_from_step"]) == (2, 4, 2)
    at_four = consolidate(run / "checkpoints" / "last.ckpt", tmp_path / "four.ckpt")["state_dict"]
    encoder = [k for k in at_four if k.startswith("encoder.vit.blocks.") and k.endswith("weight")]
    assert len(encoder) == 3 * 6 and encoder[0] in at_two  # 3 kept blocks x (2 norms, qkv, proj, fc1, fc2)
    moved = [k for k in encoder if not torch.equal(at_two[k], at_four[k])]
    assert len(moved) == len(encoder), sorted(set(encoder) - set(moved))[:5]
