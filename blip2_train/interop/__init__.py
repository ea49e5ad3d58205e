"""Import and export of BLIP-2 weights: transformers directories and LAVIS ``.pth`` files.

- :func:`import_external` reads a transformers BLIP-2 directory (an export of ours or a hub snapshot
  such as Salesforce/blip2-opt-2.7b) or a LAVIS checkpoint into our module's names; ``init_from``
  (``training.checkpoints.load_init``) copies what matches and prints the report.
- :func:`blip2_train.export.export_checkpoint` writes a checkpoint as a transformers
  directory (``python -m blip2_train.export``).

Files from elsewhere are data, not code: safetensors, or ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from blip2_train.interop.names import hf_to_ours, is_lavis_state, lavis_to_hf

# Beside an export: the values with no transformers home (temperature, Q-Former LM head).
EXTRAS_FILE = "blip2_train_extras.safetensors"
META_FILE = "blip2_train_export.json"


def read_hf_directory(directory: Path, skip_prefixes=("language_model.",)) -> dict[str, torch.Tensor]:
    """Tensors of a transformers model directory (safetensors, sharded or not, or pytorch_model.bin).

    The frozen LLM is skipped by default: ``init_from`` never loads it, and a hub snapshot's LLM is
    most of its size.
    """
    from safetensors import safe_open

    files = sorted(directory.glob("model*.safetensors"))
    state: dict[str, torch.Tensor] = {}
    if files:
        for file in files:
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                    if not key.startswith(tuple(skip_prefixes)):
                        state[key] = handle.get_tensor(key)
    else:
        from blip2_train.interop.state_dict import read_state_dict

        bins = sorted(directory.glob("pytorch_model*.bin"))
        if not bins:
            raise FileNotFoundError(
                f"init_from={directory}: no model*.safetensors or pytorch_model*.bin in this directory; "
                f"point init_from at a transformers BLIP-2 directory (a `python -m blip2_train.export` "
                f"output or a Salesforce/blip2-* snapshot)")
        for file in bins:
            state.update({k: v for k, v in read_state_dict(file).items() if not k.startswith(tuple(skip_prefixes))})
    extras = directory / EXTRAS_FILE
    if extras.exists():
        from safetensors.torch import load_file

        state.update(load_file(str(extras)))
    return state


def import_external(path: str | Path, module) -> dict[str, torch.Tensor]:
    """A transformers directory or a LAVIS ``.pth`` -> tensors under ``module``'s state-dict names."""
    path = Path(path)
    if path.is_dir():
        config = path / "config.json"
        if config.exists():
            model_type = json.loads(config.read_text()).get("model_type")
            if model_type != "blip-2":
                raise ValueError(f"init_from={path} holds a {model_type!r} model, not BLIP-2 (model_type "
                                 f"'blip-2'); export one with `python -m blip2_train.export`")
        hf_state = read_hf_directory(path)
    else:
        from blip2_train.interop.state_dict import read_state_dict

        lavis = read_state_dict(path)
        if not is_lavis_state(lavis):
            raise ValueError(f"init_from={path}: no LAVIS key (Qformer.*, visual_encoder.*) in this file")
        hf_state = lavis_to_hf(lavis)
    kind = getattr(getattr(module, "encoder", None), "kind", "eva")
    return hf_to_ours(hf_state, kind)
