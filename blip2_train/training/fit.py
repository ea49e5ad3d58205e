"""compose -> build -> fit: the training entry behind ``python -m blip2_train``."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from blip2_train.config import validate
from blip2_train.training.callbacks import AtomicLastCheckpoint, ResumeRNG, ValidationTracker
from blip2_train.training.cluster import apply_slurm_topology
from blip2_train.training.modules import build_module
from blip2_train.training.tracking import Throughput, ValidationSamples

log = logging.getLogger("blip2_train")


def per_device_batch(cfg: DictConfig, world_size: int) -> int:
    """``data.global_batch_size`` split over the devices, or ``data.batch_size`` as it is."""
    total = cfg.data.global_batch_size
    if not total:
        return cfg.data.batch_size
    if total % world_size:
        raise ValueError(f"data.global_batch_size={total} does not split over {world_size} devices; "
                         f"choose a multiple of {world_size} or set data.batch_size instead")
    return total // world_size


def build_datamodule(cfg: DictConfig, module, world_size: int = 1) -> L.LightningDataModule:
    from blip2_train.data import Blip2DataModule

    data_cfg = cfg.data.copy()
    data_cfg.batch_size = per_device_batch(cfg, world_size)
    train_collate, eval_collate = module.text_collates()
    from blip2_train.data.feature_cache import encoder_signature

    return Blip2DataModule(data_cfg, image_size=cfg.encoder.image_size, train_text_collate=train_collate,
                           eval_text_collate=eval_collate, seed=cfg.seed,
                           encoder_signature=encoder_signature(cfg.encoder),
                           sample_decoder=getattr(module, "sample_decoder", None))


def resolve_precision(cfg: DictConfig) -> str:
    if cfg.trainer.precision:
        return cfg.trainer.precision
    on_gpu = cfg.trainer.accelerator in ("gpu", "cuda") or (
        cfg.trainer.accelerator == "auto" and torch.cuda.is_available())
    return "bf16-mixed" if on_gpu else "32-true"


def build_loggers(cfg: DictConfig, run_dir: Path, resumed_from: int = 0) -> list:
    from lightning.pytorch import loggers

    name = cfg.logger.name
    if name == "none":
        return []
    if name == "csv":
        # a resumed run keeps the earlier segment's file: logs/metrics.csv, logs/from_step_N/metrics.csv
        version = f"from_step_{resumed_from}" if resumed_from else ""
        return [loggers.CSVLogger(save_dir=str(run_dir), name="logs", version=version)]
    if name == "tensorboard":
        return [loggers.TensorBoardLogger(save_dir=str(run_dir), name="tensorboard", version="")]
    # wandb: offline unless WANDB_MODE or an API key say otherwise; the run id is kept in run_dir
    # so a resumed run continues the same wandb run.
    id_file = run_dir / "wandb_id.txt"
    run_id = id_file.read_text().strip() if id_file.exists() else None
    offline = cfg.logger.offline and "WANDB_MODE" not in os.environ and "WANDB_API_KEY" not in os.environ
    logger = loggers.WandbLogger(project=cfg.logger.project, save_dir=str(run_dir), offline=offline,
                                 id=run_id, resume="allow" if run_id else None)
    if run_id is None and int(os.environ.get("LOCAL_RANK", "0")) == 0:
        id_file.write_text(logger.experiment.id)
    return [logger]


def build_trainer(cfg: DictConfig, run_dir: Path, tracker: ValidationTracker, resumed_from: int = 0,
                  throughput: Throughput | None = None) -> L.Trainer:
    from blip2_train.training.checkpoints import safe_checkpoint_io

    t = cfg.trainer
    every = cfg.checkpoint.every_n_steps
    callbacks = [AtomicLastCheckpoint(run_dir / "checkpoints", every_n_steps=every), tracker,
                 throughput or Throughput(t.log_every_n_steps), ValidationSamples(run_dir), ResumeRNG()]
    if t.enable_progress_bar:
        from lightning.pytorch.callbacks import TQDMProgressBar

        callbacks.append(TQDMProgressBar(refresh_rate=max(1, t.log_every_n_steps)))
    interval = t.val_check_interval or max(1, t.max_steps)
    return L.Trainer(
        accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes,
        strategy=build_strategy(cfg), precision=resolve_precision(cfg), max_steps=t.max_steps,
        max_epochs=-1, val_check_interval=interval, check_val_every_n_epoch=None,
        num_sanity_val_steps=0, log_every_n_steps=t.log_every_n_steps,
        gradient_clip_val=t.gradient_clip_val, accumulate_grad_batches=t.accumulate_grad_batches,
        deterministic=t.deterministic, enable_progress_bar=t.enable_progress_bar,
        enable_checkpointing=False, logger=build_loggers(cfg, run_dir, resumed_from), callbacks=callbacks,
        default_root_dir=str(run_dir), use_distributed_sampler=False,
        plugins=[safe_checkpoint_io()],  # resuming reads last.ckpt as data only (interop.state_dict.safe_load)
    )


def build_strategy(cfg: DictConfig):
    strategy = cfg.trainer.strategy
    if strategy == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        # frozen parts have requires_grad=False before wrapping, so no unused-parameter search
        return DDPStrategy(find_unused_parameters=False)
    if strategy == "fsdp":
        from blip2_train.training.fsdp import FSDP2Strategy

        # each rank writes its own shards: last.ckpt is a directory (blip2_train.consolidate -> one file)
        return FSDP2Strategy(save_distributed_checkpoint=True)
    return "auto"


def checkpoint_step(path: Path) -> int:
    """The global step a checkpoint was written at: a ``.ckpt`` file, or a sharded (FSDP) checkpoint
    directory, whose ``meta.pt`` holds everything but the tensors. Read as data only; a file that holds
    anything else is refused with an error naming it (``interop.state_dict.resume_step``)."""
    from blip2_train.interop.state_dict import resume_step

    return resume_step(path)


def write_metrics(run_dir: Path, metrics: dict, global_step: int, extra: dict) -> dict:
    flat = {k: float(v) for k, v in metrics.items()}
    flat.update(extra)
    flat["global_step"] = int(global_step)
    (run_dir / "metrics.json").write_text(json.dumps(flat, indent=2, sort_keys=True) + "\n")
    return flat


def stage1_init_config(cfg: DictConfig) -> DictConfig:
    """The stage 1 behind ``bridge.stage1_steps``: this run's encoder, Q-Former (its query count), data and
    optimizer schedule, with stage 1's losses (conf/stage/1.yaml), no LLM, ``bridge.stage1_lr`` and
    ``bridge.stage1_seed``, one device, validated at its end only (k_test 4). ``run_dir`` is left for the caller."""
    from blip2_train.config import CONF_DIR, Blip2Config

    stored = OmegaConf.to_container(cfg, resolve=True)
    for key in ("llm", "generation", "vqa", "run_dir", "init_from", "experiment_name", "requires_init_from"):
        stored.pop(key, None)  # the schema's defaults: llm=none, no init_from
    stored["stage"] = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "stage" / "1.yaml").stage)
    bridge = stored["bridge"]
    stored["optim"].update(lr=bridge["stage1_lr"])
    stored["seed"] = bridge["stage1_seed"]
    stored["bridge"] = {**bridge, "stage1_steps": 0}
    stored["trainer"].update(max_steps=bridge["stage1_steps"], val_check_interval=None, strategy="auto", devices=1,
                             num_nodes=1, enable_progress_bar=False)
    stored["checkpoint"] = {"every_n_steps": None, "save_last": True}
    # its one validation is a by-product, not the point: ITM re-ranks 4 candidates per image and text, not
    # retrieval.k_test (128 re-ranked every pair of 64 validation scenes: minutes of CPU for a tiny stage 1)
    stored["retrieval"] = {**stored.get("retrieval", {}), "k_test": 4}
    stage1 = OmegaConf.merge(OmegaConf.structured(Blip2Config), stored)
    stage1.experiment_name = f"{cfg.experiment_name}_stage1_init"
    stage1.run_dir = "unset"  # not the schema's ${now:...}: the config must hash the same at every call
    return stage1


def stage1_init_dir(cfg: DictConfig) -> Path:
    """Where :func:`ensure_stage1_init` keeps the stage 1 of ``cfg``: ``cache_dir/stage1_init/<hash of its config>``."""
    import hashlib

    key = hashlib.sha1(OmegaConf.to_yaml(stage1_init_config(cfg), resolve=True).encode()).hexdigest()[:12]
    return Path(cfg.cache_dir) / "stage1_init" / key


def ensure_stage1_init(cfg: DictConfig) -> str:
    """Train (once) the stage 1 that ``bridge.stage1_steps`` asks for and return its ``last.ckpt``.

    Cached under ``cache_dir/stage1_init/<key>``, the key a hash of that stage 1's whole config, as the tiny
    LLM's pretraining is (models/llm.py): every run of a sweep that needs the same stage 1 (other lrs and
    seeds of stage 2) loads the same checkpoint; a run with another query count or encoder trains its own.
    Written to a temporary directory and renamed into place, so an interrupted one is never loaded."""
    import shutil

    stage1 = stage1_init_config(cfg)
    target = stage1_init_dir(cfg)
    key = target.name
    ckpt = target / "checkpoints" / "last.ckpt"
    if ckpt.exists():
        log.info("bridge.stage1_steps=%d: stage 1 cached at %s", cfg.bridge.stage1_steps, target)
        return str(ckpt)
    tmp = target.with_name(f"{key}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    stage1.run_dir = str(tmp)
    log.info("bridge.stage1_steps=%d: training stage 1 first (%s)", cfg.bridge.stage1_steps, target)
    saved_env = os.environ.get("BLIP2_RUN_DIR")
    try:
        train(stage1)
    finally:
        if saved_env is not None:
            os.environ["BLIP2_RUN_DIR"] = saved_env
    try:
        os.replace(tmp, target)
    except OSError:  # another process finished the same stage 1 first: use its
        shutil.rmtree(tmp, ignore_errors=True)
    return str(ckpt)


def train(cfg: DictConfig) -> dict:
    """Run one training job described by ``cfg``; returns the final metrics (also in metrics.json)."""
    validate(cfg)
    if OmegaConf.select(cfg, "bridge.stage1_steps", default=0):  # before this run's seed is set
        cfg.init_from = ensure_stage1_init(cfg)
    apply_slurm_topology(cfg)  # a submitit SLURM job: devices / num_nodes from the allocation
    # Lightning's DDP launcher re-runs this script for ranks > 0: they must share rank 0's run_dir
    # (a ${now:...} default would otherwise give one directory per process).
    if os.environ.get("BLIP2_RUN_DIR") and int(os.environ.get("LOCAL_RANK", "0")) > 0:
        cfg.run_dir = os.environ["BLIP2_RUN_DIR"]
    else:
        os.environ["BLIP2_RUN_DIR"] = str(cfg.run_dir)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    L.seed_everything(cfg.seed, workers=True)
    torch.set_float32_matmul_precision("high")

    last = run_dir / "checkpoints" / "last.ckpt"
    resume = last if last.exists() else None
    module = build_module(cfg)
    if cfg.init_from and resume is None:
        from blip2_train.training.checkpoints import load_init

        load_init(module, cfg.init_from)
    resumed_from = 0
    if resume is not None:
        resumed_from = checkpoint_step(resume)
        log.info("resuming from %s (step %d)", resume, resumed_from)
    log.info("torch intra-op threads: %d", torch.get_num_threads())
    tracker = ValidationTracker()
    throughput = Throughput(cfg.trainer.log_every_n_steps)
    trainer = build_trainer(cfg, run_dir, tracker, resumed_from, throughput)
    datamodule = build_datamodule(cfg, module, trainer.world_size)
    if cfg.trainer.max_steps > 0:
        trainer.fit(module, datamodule=datamodule, ckpt_path=str(resume) if resume else None, weights_only=True)
    if tracker.last_step != trainer.global_step or not tracker.metrics:
        trainer.validate(module, datamodule=datamodule, verbose=False)
    if cfg.trainer.max_steps == 0 and trainer.is_global_zero:
        # an imported / initialised model is written out as a checkpoint as it is
        trainer.strategy.connect(module)
        AtomicLastCheckpoint(run_dir / "checkpoints").save(trainer)
    extra = {**module.data_counts(), **throughput.summary(), "resumed_from_step": resumed_from}
    metrics = write_metrics(run_dir, tracker.metrics, trainer.global_step, extra)
    if cfg.logger.name == "wandb":  # flush this run's files now; a later train() in this process starts its own
        import wandb

        if wandb.run is not None:
            wandb.finish()
    if trainer.is_global_zero:
        log.info("final metrics (%s): %s", run_dir / "metrics.json",
                 ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())))
    return metrics
