"""``init_from``: start a model from the weights of another run, with a report of what matched.

Files from elsewhere are data, not code: they are read with ``torch.load(weights_only=True)`` or
safetensors, so loading one can never run code.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a Lightning ``.ckpt`` (its ``state_dict``), a ``.pth``/``.pt`` or ``.safetensors``."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"init_from={path}: no such file or directory")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any unpickling refusal ends here
        raise ValueError(
            f"{path} cannot be read as plain tensors ({err.__class__.__name__}: {str(err)[:200]}). "
            f"Files are loaded with torch.load(weights_only=True) so that they can never run code; "
            f"re-save it as a plain state dict or as safetensors."
        ) from err
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def load_matching(module: nn.Module, state: dict[str, torch.Tensor], skip: dict[str, str] | None = None) -> dict:
    """Copy every tensor whose name and shape match; report matched / missing / unexpected / mismatched.

    ``skip`` maps name prefixes to the reason they are not loaded: the source's keys under each are
    left out of the other lists and reported as ``skipped`` (prefix -> keys), with the reasons.
    """
    skip = dict(skip or {})
    prefixes = tuple(skip)
    target = module.state_dict()
    matched, mismatched = [], []
    with torch.no_grad():
        for key, value in state.items():
            if key in target and not key.startswith(prefixes):
                if target[key].shape == value.shape:
                    target[key].copy_(value.to(target[key].dtype))
                    matched.append(key)
                else:
                    mismatched.append(f"{key} {tuple(value.shape)} != {tuple(target[key].shape)}")
    unexpected = sorted(k for k in state if k not in target and not k.startswith(prefixes))
    missing = sorted(k for k in target if k not in state and not k.startswith(prefixes))
    skipped = {prefix: sorted(k for k in state if k.startswith(prefix)) for prefix in skip}
    return {"matched": sorted(matched), "missing": missing, "unexpected": unexpected,
            "mismatched": mismatched, "skipped": {p: keys for p, keys in skipped.items() if keys},
            "skip_reasons": {p: skip[p] for p, keys in skipped.items() if keys}}


def format_report(report: dict, source: str, limit: int = 20) -> str:
    head = (f"init_from {source}: {len(report['matched'])} matched, {len(report['missing'])} missing, "
            f"{len(report['unexpected'])} unexpected, {len(report['mismatched'])} shape mismatches")
    lines = [head]
    groups: dict[str, int] = {}
    for key in report["matched"]:
        parts = key.split(".")
        group = ".".join(parts[:2]) if parts[0] == "model" else parts[0]
        groups[group] = groups.get(group, 0) + 1
    if groups:
        lines.append("  matched: " + ", ".join(f"{g} ({n})" for g, n in sorted(groups.items())))
    for name in ("missing", "unexpected", "mismatched"):
        keys = report[name]
        if keys:
            shown = ", ".join(keys[:limit]) + (f", ... (+{len(keys) - limit})" if len(keys) > limit else "")
            lines.append(f"  {name}: {shown}")
    by_reason: dict[str, list[str]] = {}
    for prefix in report.get("skipped", {}):
        by_reason.setdefault(report["skip_reasons"][prefix], []).append(prefix)
    for reason, prefixes in by_reason.items():
        count = sum(len(report["skipped"][p]) for p in prefixes)
        names = ", ".join(p + "*" if p.endswith(".") else p for p in prefixes)
        lines.append(f"  skipped: {names} ({count} keys of the source): {reason}")
    return "\n".join(lines)


def load_init(module: nn.Module, path: str | Path) -> dict:
    """Initialise ``module`` from ``path``; fail when nothing matched."""
    path = Path(path)
    if path.is_dir() or path.suffix == ".pth" and _looks_like_lavis(path):
        from blip2_train.interop import import_external  # transformers dir or LAVIS .pth

        state = import_external(path, module)
    else:
        state = read_state_dict(path)
    counters = "a run's counters, not weights: they start at 0"
    skip = dict.fromkeys(("seen_samples", "skipped_samples", "nonfinite_steps", "source_samples"), counters)
    cfg = getattr(module, "cfg", None)
    if _encoder_frozen(module) and not (cfg is not None and cfg.get("init_from_encoder", False)):
        skip["encoder."] = (f"the frozen encoder keeps its encoder.pretrained weights ({cfg.encoder.pretrained}); "
                            f"init_from_encoder=true loads the source's vision tower instead (e.g. a fine-tuned ViT)")
    if hasattr(module, "llm"):  # the frozen LLM comes from its own weights, never from init_from
        skip["llm."] = "the frozen LLM comes from llm.model, never from init_from"
    report = load_matching(module, state, skip=skip)
    print(format_report(report, str(path)), flush=True)
    if not report["matched"]:
        raise ValueError(f"init_from={path}: no parameter name matched this model; is it a blip2_train "
                         f"checkpoint of a model with the same sizes?")
    return report


def _encoder_frozen(module) -> bool:
    cfg = getattr(module, "cfg", None)
    return bool(cfg is not None and cfg.encoder.pretrained and cfg.encoder.freeze)


def _looks_like_lavis(path: Path) -> bool:
    try:
        keys = read_state_dict(path).keys()
    except ValueError:
        return False
    return any(k.startswith(("Qformer.", "visual_encoder.")) for k in keys)


def config_from_checkpoint(ckpt_path: str | Path, overrides: list[str] = ()):
    """The resolved training config stored in a checkpoint, with dotlist overrides applied."""
    from omegaconf import OmegaConf

    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    try:
        stored = ckpt["hyper_parameters"]["cfg"]
    except KeyError as err:
        raise ValueError(f"{ckpt_path} has no stored config: is it a blip2_train checkpoint?") from err
    cfg = OmegaConf.merge(OmegaConf.create(stored), OmegaConf.from_dotlist(list(overrides)))
    return cfg, ckpt


def module_from_checkpoint(ckpt_path: str | Path, overrides: list[str] = ()):
    """Rebuild the LightningModule a checkpoint was written by and load its weights (exactly)."""
    from blip2_train.train import build_module

    cfg, ckpt = config_from_checkpoint(ckpt_path, overrides)
    module = build_module(cfg)
    result = module.load_state_dict(ckpt["state_dict"], strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(module.rebuilt_prefixes())]
    if missing or result.unexpected_keys:
        raise ValueError(f"{ckpt_path} does not fit the model its config builds: missing {missing[:10]}, "
                         f"unexpected {result.unexpected_keys[:10]}")
    return module.eval(), cfg
