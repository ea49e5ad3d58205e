"""The LightningModule of a config (:func:`build_module`) or of a checkpoint (:func:`module_from_checkpoint`,
for evaluate, generate and export): the stored config, the omitted frozen parts rebuilt from their
sources, every other weight loaded strictly."""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig

from blip2_train.interop.state_dict import omitted_parts_of, state_mismatch


def build_module(cfg: DictConfig) -> L.LightningModule:
    if cfg.stage.name == 1:
        from blip2_train.training.stage1 import Stage1Module

        return Stage1Module(cfg)
    if cfg.stage.get("task", "caption") == "vqa":
        from blip2_train.training.stage2_vqa import VQAModule

        return VQAModule(cfg)
    from blip2_train.training.stage2 import Stage2Module

    return Stage2Module(cfg)


class MissingSourceError(FileNotFoundError):
    """The weights a checkpoint's omitted part is rebuilt from are not where the checkpoint says."""


def check_sources(omitted: dict, cfg, ckpt_path, given: dict) -> None:
    """Every omitted part's weights exist where the config now points (a local path that is gone stops
    here, naming the override that redirects it); hub ids and tags are checked by their loaders."""
    from omegaconf import OmegaConf

    for name, part in omitted.items():
        source = OmegaConf.select(cfg, part["override"])
        if not source:
            raise MissingSourceError(
                f"{ckpt_path} leaves out the frozen {name} ({part['prefix']}*), to be rebuilt from "
                f"{part['source']}, but {part['override']} is empty: pass {part['override']}=<its weights>")
        local = os.path.expanduser(str(source))
        # recorded local sources are absolute; a relative name may be a hub id (its loader checks it)
        if (os.path.isabs(local) or str(source).startswith(".")) and not os.path.exists(local):
            how = ("as given on the command line" if part["override"] in given
                   else "as recorded when it was trained")
            raise MissingSourceError(
                f"{ckpt_path} leaves out the frozen {name} ({part['prefix']}*): it is rebuilt from its own "
                f"weights at {source} ({how}), which does not exist. Pass {part['override']}=<the path "
                f"where those weights are now> (the same weights the run was trained with)")


def config_from_checkpoint(ckpt_path: str | Path, overrides: list[str] = (), command_keys: tuple[str, ...] = ()):
    """The training config stored in a checkpoint, the sources of its omitted parts as it records
    them, then ``key=value`` overrides, typed and validated by the schema (``config.config_with_overrides``)."""
    from omegaconf import OmegaConf

    from blip2_train.config import config_with_overrides

    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    try:
        stored = ckpt["hyper_parameters"]["cfg"]
    except KeyError as err:
        raise ValueError(f"{ckpt_path} has no stored config: is it a blip2_train checkpoint?") from err
    stored = OmegaConf.create(stored)
    for part in omitted_parts_of(ckpt).values():
        OmegaConf.update(stored, part["override"], part["source"], merge=False)
    cfg = config_with_overrides(OmegaConf.to_container(stored), list(overrides), command_keys)
    return cfg, ckpt


def module_from_checkpoint(ckpt_path: str | Path, overrides: list[str] = (), command_keys: tuple[str, ...] = ()):
    """Rebuild the LightningModule a checkpoint was written by: its omitted frozen parts from their
    sources (``llm.model=`` / ``encoder.pretrained=`` overrides redirect them), every other weight
    loaded strictly from the checkpoint."""
    cfg, ckpt = config_from_checkpoint(ckpt_path, overrides, command_keys)
    omitted = omitted_parts_of(ckpt)
    given = {arg.partition("=")[0]: arg.partition("=")[2] for arg in overrides}
    check_sources(omitted, cfg, ckpt_path, given)
    module = build_module(cfg)
    state = ckpt["state_dict"]
    missing, unexpected = state_mismatch(module.state_dict().keys(), state.keys(), omitted)
    if missing or unexpected:
        raise ValueError(f"{ckpt_path} does not fit the model its config builds: missing {missing[:10]}, "
                         f"unexpected {unexpected[:10]} (left out and rebuilt: {sorted(omitted) or 'nothing'})")
    module.load_state_dict(state, strict=False)  # strict up to the omitted parts, checked above
    return module.eval(), cfg
