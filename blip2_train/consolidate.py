"""Turn a sharded (trainer=fsdp) checkpoint directory into one ``.ckpt`` file.

    python -m blip2_train.consolidate RUN_DIR/checkpoints/last.ckpt OUT.ckpt

The output holds the ``state_dict`` plus everything Lightning stored beside the shards
(``hyper_parameters`` with the training config, ``global_step``, ...), without optimizer states and,
as every single-file checkpoint, without the frozen parts rebuilt from their own weights (a
pretrained frozen encoder, a non-tiny LLM: listed with their sources under ``omitted_parts``):
``python -m blip2_train.evaluate ckpt_path=OUT.ckpt`` and ``init_from=OUT.ckpt`` accept it. One
process, no GPU: the shards are read with ``torch.distributed.checkpoint`` without a process group.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

META = "meta.pt"  # what Lightning's ModelParallelStrategy writes beside the shards


def consolidate(sharded_dir: str | Path, output: str | Path) -> dict:
    """Write ``output`` from ``sharded_dir``; returns the consolidated checkpoint."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    sharded_dir, output = Path(sharded_dir), Path(output)
    if not (sharded_dir.is_dir() and (sharded_dir / META).is_file()):
        raise SystemExit(f"{sharded_dir} is not a sharded checkpoint directory (expected {META} and "
                         f"*.distcp files, as trainer=fsdp writes to run_dir/checkpoints/last.ckpt)")
    tensors: dict = {}
    # every key of the checkpoint, full (unsharded) tensors, read by this one process
    _load_state_dict(tensors, storage_reader=FileSystemReader(sharded_dir),
                     planner=_EmptyStateDictLoadPlanner(), no_dist=True)
    checkpoint = torch.load(sharded_dir / META, map_location="cpu", weights_only=True)
    checkpoint["state_dict"] = tensors["state_dict"]
    checkpoint.pop("optimizer_states", None)
    # a single file follows the one rule of checkpoints: the frozen parts rebuilt from their own weights
    # are left out (their sources, resolved when training, recorded)
    from blip2_train.interop.state_dict import rebuildable_parts

    parts = checkpoint.pop("rebuildable_parts", None)
    if parts is None:  # written before sharded checkpoints recorded them
        parts = rebuildable_parts(checkpoint["hyper_parameters"]["cfg"])
    prefixes = tuple(part["prefix"] for part in parts.values())
    for key in [k for k in checkpoint["state_dict"] if prefixes and k.startswith(prefixes)]:
        del checkpoint["state_dict"][key]
    checkpoint["omitted_parts"] = parts
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp{os.getpid()}")
    torch.save(checkpoint, tmp)
    os.replace(tmp, output)
    return checkpoint


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        raise SystemExit(__doc__)
    checkpoint = consolidate(*args)
    print(f"{args[1]}: {len(checkpoint['state_dict'])} tensors, step {checkpoint.get('global_step')}")


if __name__ == "__main__":
    main()
