"""``init_from``: start a model from the weights of another run, with a report of what matched; and
Lightning's checkpoint IO reading as data only.

Files from elsewhere are data, not code: they are read by interop/state_dict.py
(``torch.load(weights_only=True)`` or safetensors), so loading one can never run code.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from blip2_train.interop.state_dict import UnsafeCheckpointError, read_checkpoint, read_state_dict, safe_load

log = logging.getLogger(__name__)


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
    """Initialise ``module`` from ``path``; fail when nothing matched.

    The frozen parts a blip2_train checkpoint leaves out are this module's own (built from its own
    config's weights); when this module has no weights of its own for the encoder the source left
    out, that encoder would stay random: the error names the override that gives it the source's."""
    path = Path(path)
    omitted = {}
    if path.is_dir() or path.suffix == ".pth" and _looks_like_lavis(path):
        from blip2_train.interop import import_external  # transformers dir or LAVIS .pth

        state = import_external(path, module)
    else:
        state, omitted = read_checkpoint(path)
    if hasattr(getattr(module, "encoder", None), "fit_positions"):  # a ViT trained at another image size
        state = module.encoder.fit_positions(state)
    counters = "a run's counters, not weights: they start at 0"
    skip = dict.fromkeys(("seen_samples", "skipped_samples", "nonfinite_steps", "source_samples"), counters)
    cfg = getattr(module, "cfg", None)
    if _encoder_frozen(module) and not (cfg is not None and cfg.get("init_from_encoder", False)):
        skip["encoder."] = (f"the frozen encoder keeps its encoder.pretrained weights ({cfg.encoder.pretrained}); "
                            f"init_from_encoder=true loads the source's vision tower instead (e.g. a fine-tuned ViT)")
    if hasattr(module, "llm"):  # the frozen LLM comes from its own weights, never from init_from
        skip["llm."] = "the frozen LLM comes from llm.model, never from init_from"
    for name, part in omitted.items():
        if name == "encoder" and cfg is not None and not cfg.encoder.pretrained:
            raise ValueError(f"init_from={path} leaves out its frozen encoder (rebuilt from {part['source']}), "
                             f"and this model's encoder.pretrained is null, so its encoder would stay random: "
                             f"add encoder.pretrained={part['source']}")
        skip.setdefault(part["prefix"], f"left out by the source (its {name} is rebuilt from {part['source']})")
    hint = _bridge_hint(module, state)
    if hint:  # a random encoder may still match; the bridge, the part that trains, would not
        raise ValueError(f"init_from={path}: none of this model's bridge weights are in it.{hint}")
    report = load_matching(module, state, skip=skip)
    text = format_report(report, str(path))
    if omitted:
        text += "\n  left out by the source, this model's own: " + ", ".join(
            f"{name} (the source's from {part['source']})" for name, part in sorted(omitted.items()))
    print(text, flush=True)
    if not report["matched"]:
        raise ValueError(f"init_from={path}: no parameter name matched this model; is it a blip2_train "
                         f"checkpoint of a model with the same sizes?")
    return report


def _bridge_hint(module: nn.Module, state: dict) -> str:
    """When a source and this model hold different bridges (the usual reason nothing matched in stage 2)."""
    cfg = getattr(module, "cfg", None)
    mine = getattr(module, "bridge_name", None)
    if cfg is None or mine is None:
        return ""
    if any(k.startswith("bridge.linear_") for k in state):
        theirs, names = ("mlp", "pool_mlp"), "an MLP bridge (bridge.linear_*)"
    elif any(k.startswith(("model.", "language_projection.")) for k in state):
        theirs, names = ("qformer",), "a Q-Former (model.*, language_projection.*)"
    else:
        return ""
    if mine in theirs:
        return ""
    theirs = " or ".join(f"bridge={name}" for name in theirs)
    return (f" The source holds {names}: it was trained with {theirs}, and this model's is bridge={mine}: "
            f"init_from loads a bridge into the same bridge (or start this one from scratch)")


def _encoder_frozen(module) -> bool:
    """A frozen encoder with pretrained weights comes from them; a trainable one (encoder.freeze=false,
    fine-tuning) is always loaded from init_from, whose ViT it continues."""
    cfg = getattr(module, "cfg", None)
    return bool(cfg is not None and cfg.encoder.pretrained and cfg.encoder.freeze)


def _looks_like_lavis(path: Path) -> bool:
    try:
        keys = read_state_dict(path).keys()
    except ValueError:
        return False
    return any(k.startswith(("Qformer.", "visual_encoder.")) for k in keys)


def safe_checkpoint_io():
    """Lightning's checkpoint IO with loads as data only (``safe_load``)."""
    from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

    class SafeCheckpointIO(TorchCheckpointIO):
        def load_checkpoint(self, path, map_location=None, weights_only=None):
            if Path(path).is_dir():
                raise UnsafeCheckpointError(f"{path} is a directory: a sharded checkpoint needs trainer=fsdp")
            return safe_load(path)

    return SafeCheckpointIO()
