"""``init_from``: start a model from the weights of another run, with a report of what matched.

Files from elsewhere are data, not code: they are read with ``torch.load(weights_only=True)`` or
safetensors, so loading one can never run code.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a Lightning ``.ckpt`` (its ``state_dict``), a ``.pth``/``.pt`` or ``.safetensors``."""
    return read_checkpoint(path)[0]


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, the parts the file leaves out) of a file as :func:`read_state_dict` reads it; the
    parts are those a blip2_train checkpoint records (``omitted_parts_of``), else none."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"init_from={path}: no such file or directory")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path)), {}
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any unpickling refusal ends here
        raise ValueError(
            f"{path} cannot be read as plain tensors ({err.__class__.__name__}: {str(err)[:200]}). "
            f"Files are loaded with torch.load(weights_only=True) so that they can never run code; "
            f"re-save it as a plain state dict or as safetensors."
        ) from err
    omitted = omitted_parts_of(obj) if isinstance(obj, dict) and "hyper_parameters" in obj else {}
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}, omitted


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


# ------------------------------------------------------------------------------ omitted parts
#: Frozen parts that a checkpoint may leave out because they are rebuilt from their own weights:
#: name -> (their state-dict prefix, the config key that names their weights).
REBUILDABLE = {"encoder": ("encoder.", "encoder.pretrained"), "llm": ("llm.", "llm.model")}


class MissingSourceError(FileNotFoundError):
    """The weights a checkpoint's omitted part is rebuilt from are not where the checkpoint says."""


def _resolved(source) -> str:
    """A local path made absolute (so that a reader in another directory finds it); a tag or hub id as is."""
    source = str(source)
    local = os.path.expanduser(source)
    return os.path.abspath(local) if os.path.exists(local) else source


def rebuildable_parts(cfg) -> dict[str, dict]:
    """The one rule for what a checkpoint of a model of ``cfg`` leaves out: a frozen encoder with
    pretrained weights and a (non-tiny) frozen LLM, each rebuilt from its source, resolved now.

    Tiny LLMs are randomly initialised, so they stay in the checkpoint; so does a fine-tuned encoder.
    Returns ``{name: {"prefix", "override", "source"}}``, the entry a checkpoint stores as
    ``omitted_parts`` (single files) or ``rebuildable_parts`` (sharded checkpoints, which keep every
    weight; ``consolidate`` applies the rule)."""
    parts = {}
    # init_from_encoder: the frozen encoder holds the init_from source's vision tower, not its pretrained file's
    loaded_elsewhere = bool(cfg.get("init_from_encoder", False)) and bool(cfg.get("init_from"))
    if cfg["encoder"]["pretrained"] and cfg["encoder"]["freeze"] and not loaded_elsewhere:
        parts["encoder"] = cfg["encoder"]["pretrained"]
    llm = cfg.get("llm") or {}
    if int(cfg["stage"]["name"]) == 2 and llm.get("name", "none") != "none" and not llm["name"].startswith("tiny"):
        parts["llm"] = llm["model"]
    return {name: {"prefix": REBUILDABLE[name][0], "override": REBUILDABLE[name][1], "source": _resolved(source)}
            for name, source in parts.items()}


def omitted_parts_of(checkpoint: dict) -> dict[str, dict]:
    """The parts ``checkpoint`` leaves out, as it records them; a checkpoint written before they were
    recorded left out what the rule gives for its config (sources as its config names them)."""
    if "omitted_parts" in checkpoint:
        return dict(checkpoint["omitted_parts"])
    try:
        return rebuildable_parts(checkpoint["hyper_parameters"]["cfg"])
    except KeyError:
        return {}


def state_mismatch(expected_keys, state_keys, omitted: dict) -> tuple[list[str], list[str]]:
    """(missing, unexpected) keys of a state dict against a model's, where only the omitted parts may
    be missing."""
    prefixes = tuple(part["prefix"] for part in omitted.values())
    state_keys = set(state_keys)
    missing = sorted(k for k in expected_keys if k not in state_keys and not k.startswith(prefixes))
    unexpected = sorted(state_keys - set(expected_keys))
    return missing, unexpected


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
    from blip2_train.train import build_module

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


# ------------------------------------------------------------------------------------ resume
# Resuming reads run_dir/checkpoints/last.ckpt, which lives on a shared filesystem: it is read as
# data (torch.load(weights_only=True)), never as code. A Lightning checkpoint of blip2_train holds
# tensors, dicts, lists, tuples, numbers and strings (model, optimizer, scheduler, loops, callbacks,
# hyper-parameters as a plain dict, per-rank RNG states as tensors and tuples), all of which torch's
# weights_only unpickler allows by itself; anything a run adds must be listed here.
CHECKPOINT_SAFE_GLOBALS: list = []


class UnsafeCheckpointError(ValueError):
    """A checkpoint that holds something other than what a Lightning checkpoint holds."""


def _refusal(path, err: BaseException, what: str = "checkpoint") -> UnsafeCheckpointError:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    # torch's message opens with a paragraph about its defaults; the line that says what was found matters
    reason = next((line for line in lines if "GLOBAL" in line or "nsupported" in line),
                  lines[0] if lines else "unreadable")
    return UnsafeCheckpointError(
        f"refused to load {path}: it is not a plain {what} ({err.__class__.__name__}: {reason[:300]}). "
        f"Checkpoints are read with torch.load(weights_only=True) and an allow-list of what a Lightning "
        f"checkpoint holds, so that a file on a shared filesystem cannot run code; one written by blip2_train "
        f"always passes. Move it out of the run directory to start afresh, or resume from a checkpoint you trust.")


def safe_load(path: str | Path, what: str = "checkpoint", **kwargs):
    """``torch.load`` of a checkpoint file (or a file object) as data only; a clear error naming it otherwise."""
    try:
        with torch.serialization.safe_globals(CHECKPOINT_SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True, **kwargs)
    except FileNotFoundError:
        raise
    except Exception as err:
        raise _refusal(path, err, what) from err


# What a torch.distributed.checkpoint ``.metadata`` file is made of (module, name): its dataclasses and
# enum, shapes, dtypes (any ``torch.<dtype>``), layouts and the checkpoint's path.
DCP_METADATA_GLOBALS = {
    ("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
        "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")
} | {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
     ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"),
     ("pathlib", "PurePosixPath")}


def _dcp_metadata_unpickler(f):
    import pickle

    class Restricted(pickle.Unpickler):
        def find_class(self, module, name):
            allowed = (module, name) in DCP_METADATA_GLOBALS or (
                module == "torch" and isinstance(getattr(torch, name, None), torch.dtype))
            if not allowed:
                raise pickle.UnpicklingError(f"Unsupported global: {module}.{name} is not part of a "
                                             f"distributed-checkpoint metadata file")
            return super().find_class(module, name)

    return Restricted(f)


def read_dcp_metadata(directory: Path):
    """A sharded checkpoint's ``.metadata``, a pickle torch reads with plain ``pickle.load``, read by an
    unpickler that allows only the classes that file is made of (``DCP_METADATA_GLOBALS``)."""
    path = Path(directory) / ".metadata"
    try:
        with open(path, "rb") as f:
            return _dcp_metadata_unpickler(f).load()
    except FileNotFoundError:
        raise
    except Exception as err:
        raise _refusal(path, err, "distributed-checkpoint metadata file") from err


def verify_sharded_checkpoint(directory: str | Path) -> None:
    """Refuse a sharded (FSDP) checkpoint directory unless every part torch would unpickle is data:
    ``meta.pt``, ``.metadata`` and each non-tensor entry of the shard files (which torch's
    distributed checkpoint reader loads with ``weights_only=False``). Tensor entries are read by torch
    with ``weights_only=True`` already."""
    import io

    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    directory = Path(directory)
    missing = [name for name in ("meta.pt", ".metadata") if not (directory / name).is_file()]
    if missing:
        raise UnsafeCheckpointError(
            f"{directory} is not a checkpoint: a sharded (FSDP) checkpoint directory holds meta.pt, .metadata "
            f"and __<rank>_0.distcp shard files, this one lacks {missing}")
    safe_load(directory / "meta.pt")
    meta = read_dcp_metadata(directory)
    for index, info in meta.storage_data.items():
        if not isinstance(meta.state_dict_metadata.get(index.fqn), BytesStorageMetadata):
            continue
        shard = directory / info.relative_path
        if info.transform_descriptors:
            raise UnsafeCheckpointError(f"refused to load {shard}: entry {index.fqn} is stored with transforms "
                                        f"{list(info.transform_descriptors)}, which blip2_train never writes")
        with open(shard, "rb") as f:
            f.seek(info.offset)
            data = io.BytesIO(f.read(info.length))
        safe_load(data, what=f"checkpoint shard (entry {index.fqn} of {shard})")


class _SafeDCPReads:
    """While loading a sharded checkpoint, torch's distributed checkpoint reads ``.metadata`` and the
    shards' non-tensor entries as data only (it would unpickle them with ``pickle.load`` /
    ``torch.load(weights_only=False)``)."""

    def __enter__(self):
        import io
        import types

        from torch.distributed.checkpoint import default_planner, filesystem

        self._planner, self._filesystem = default_planner.DefaultLoadPlanner, filesystem
        self._load_bytes = default_planner.DefaultLoadPlanner.load_bytes
        self._pickle = filesystem.pickle
        real_load_bytes = self._load_bytes

        def load_bytes(planner, read_item, value):
            obj = safe_load(value, what=f"checkpoint shard entry {read_item.dest_index.fqn}")
            value = io.BytesIO()
            torch.save(obj, value)  # the checked object, handed over in the form torch expects
            value.seek(0)
            real_load_bytes(planner, read_item, value)

        def safe_pickle_load(f, **_):
            return _dcp_metadata_unpickler(f).load()

        shim = types.SimpleNamespace(**{k: getattr(self._pickle, k) for k in dir(self._pickle)
                                        if not k.startswith("__")})
        shim.load = safe_pickle_load
        filesystem.pickle = shim
        default_planner.DefaultLoadPlanner.load_bytes = load_bytes
        return self

    def __exit__(self, *exc):
        self._filesystem.pickle = self._pickle
        self._planner.load_bytes = self._load_bytes
        return False


def safe_dcp_reads() -> _SafeDCPReads:
    return _SafeDCPReads()


def resume_step(path: str | Path) -> int:
    """The global step of ``run_dir/checkpoints/last.ckpt`` (a file, or a sharded directory whose
    ``meta.pt`` holds everything but the tensors), read as data only; anything else is refused."""
    path = Path(path)
    if path.is_dir():
        verify_sharded_checkpoint(path)
        checkpoint = safe_load(path / "meta.pt")
    elif path.is_file():
        checkpoint = safe_load(path)
    else:
        raise UnsafeCheckpointError(f"{path} is neither a checkpoint file nor a sharded checkpoint directory")
    if not isinstance(checkpoint, dict) or "global_step" not in checkpoint:
        raise UnsafeCheckpointError(f"{path} is not a Lightning checkpoint (no global_step in it)")
    return int(checkpoint["global_step"])


def safe_checkpoint_io():
    """Lightning's checkpoint IO with loads as data only (``safe_load``)."""
    from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

    class SafeCheckpointIO(TorchCheckpointIO):
        def load_checkpoint(self, path, map_location=None, weights_only=None):
            if Path(path).is_dir():
                raise UnsafeCheckpointError(f"{path} is a directory: a sharded checkpoint needs trainer=fsdp")
            return safe_load(path)

    return SafeCheckpointIO()
