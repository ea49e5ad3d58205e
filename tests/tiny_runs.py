"""Shared by the tests that train tiny runs: one config of the tiny preset on CPU, and a run with an extra
Lightning callback (tests/ is on pytest's pythonpath)."""

from hydra import compose, initialize_config_dir

from blip2_train.config import CONF_DIR, normalize_overrides, register_configs

register_configs()


def tiny_run_cfg(run_dir, cache, *overrides, max_steps=2):
    """The default tiny run, small enough for a unit test: 32 synthetic training samples, a 2-layer Q-Former."""
    base = [f"run_dir={run_dir}", f"cache_dir={cache}", f"trainer.max_steps={max_steps}", "trainer=cpu",
            "trainer.enable_progress_bar=false", "logger=none", "data.batch_size=8", "data.eval_batch_size=16",
            "data.num_workers=0", "data.synthetic.num_train=32", "data.synthetic.num_val=12",
            "data.synthetic.samples_per_shard=16", "data.samples_per_epoch=32", "retrieval.k_test=4",
            "qformer.num_hidden_layers=2"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=normalize_overrides(base + list(overrides)))


def train_with_callback(cfg, callback):
    """``training.fit.train(cfg)`` with ``callback`` added to the Trainer it builds."""
    from blip2_train.training import fit

    original = fit.build_trainer

    def build_trainer(*args, **kwargs):
        trainer = original(*args, **kwargs)
        trainer.callbacks.append(callback)
        return trainer

    fit.build_trainer = build_trainer
    try:
        return fit.train(cfg)
    finally:
        fit.build_trainer = original
