"""State-dict I/O: the tensors of a checkpoint and the parts it leaves out, read as data only.

Files from elsewhere are data, not code: they are read with ``torch.load(weights_only=True)`` (with an
allow-list of what a Lightning checkpoint holds) or safetensors, so loading one can never run code.
A sharded (FSDP) checkpoint's metadata and non-tensor entries are checked before torch's reader runs.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch


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


# ------------------------------------------------------------------------------ omitted parts
#: Frozen parts that a checkpoint may leave out because they are rebuilt from their own weights:
#: name -> (their state-dict prefix, the config key that names their weights).
REBUILDABLE = {"encoder": ("encoder.", "encoder.pretrained"), "llm": ("llm.", "llm.model")}


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
