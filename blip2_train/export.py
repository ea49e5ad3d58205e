"""Export a checkpoint as a transformers BLIP-2 directory.

    python -m blip2_train.export ckpt_path=CKPT output_dir=DIR [export.vision=false] [key=value ...]

Stage 1 -> ``Blip2ForImageTextRetrieval``, stage 2 -> ``Blip2ForConditionalGeneration``; both with a
``Blip2Processor`` (``AutoProcessor.from_pretrained(DIR)``). The temperature and the Q-Former LM head
go to ``blip2_train_extras.safetensors`` beside them; ``init_from=DIR`` reads everything back.
``export.vision=false`` leaves the vision tower out (required for CLIP encoders, whose pre-LayerNorm
has no place in ``Blip2VisionModel``). Other keys override the config stored in the checkpoint (checked
against the schema; ``llm.model=DIR`` / ``encoder.pretrained=FILE`` where the frozen weights moved).
"""

from __future__ import annotations

import sys
from pathlib import Path

OWN_KEYS = ("ckpt_path", "output_dir", "export.vision")


def parse_args(argv: list[str]) -> tuple[dict, list[str]]:
    from blip2_train.evaluate import split_key_values

    own, overrides = split_key_values(argv, OWN_KEYS, ("ckpt_path", "output_dir"), __doc__)
    vision = own.pop("export.vision", "true")
    if vision.lower() not in ("true", "false"):
        raise SystemExit(f"export.vision must be true or false, got {vision!r}")
    own["vision"] = vision.lower() == "true"
    return own, overrides


def export_checkpoint(ckpt_path: str | Path, output_dir: str | Path, vision: bool = True,
                      overrides: list[str] = ()) -> Path:
    """The checkpoint's module (its stored config under ``overrides``) written by ``interop.hf_export``."""
    from blip2_train.interop.hf_export import export_module
    from blip2_train.training.modules import module_from_checkpoint

    module, _ = module_from_checkpoint(ckpt_path, list(overrides), OWN_KEYS)
    return export_module(module.float(), output_dir, vision=vision)


def main(argv: list[str] | None = None) -> None:
    from blip2_train.evaluate import user_errors

    own, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        out = export_checkpoint(own["ckpt_path"], own["output_dir"], vision=own["vision"], overrides=overrides)
    except user_errors() as err:
        raise SystemExit(f"error: {err}") from err
    print(f"exported {own['ckpt_path']} -> {out}")


if __name__ == "__main__":
    main()
