"""Export a checkpoint as a transformers BLIP-2 directory.

    python -m blip2_train.export ckpt_path=CKPT output_dir=DIR [export.vision=false] [key=value ...]

Stage 1 -> ``Blip2ForImageTextRetrieval``, stage 2 -> ``Blip2ForConditionalGeneration``; both with a
``Blip2Processor`` (``AutoProcessor.from_pretrained(DIR)``). The temperature and the Q-Former LM head
go to ``blip2_train_extras.safetensors`` beside them; ``init_from=DIR`` reads everything back.
``export.vision=false`` leaves the vision tower out (required for CLIP encoders, whose pre-LayerNorm
has no place in ``Blip2VisionModel``). Other keys override the config stored in the checkpoint.
"""

from __future__ import annotations

import sys


def parse_args(argv: list[str]) -> tuple[dict, list[str]]:
    own, overrides = {"vision": True}, []
    for arg in argv:
        if "=" not in arg:
            raise SystemExit(f"arguments are key=value pairs, got {arg!r}\n{__doc__}")
        key, value = arg.split("=", 1)
        if key in ("ckpt_path", "output_dir"):
            own[key] = value
        elif key == "export.vision":
            if value.lower() not in ("true", "false"):
                raise SystemExit(f"export.vision must be true or false, got {value!r}")
            own["vision"] = value.lower() == "true"
        else:
            overrides.append(arg)
    missing = [k for k in ("ckpt_path", "output_dir") if k not in own]
    if missing:
        raise SystemExit(f"{' and '.join(k + '=...' for k in missing)} required\n{__doc__}")
    return own, overrides


def main(argv: list[str] | None = None) -> None:
    from blip2_train.interop.hf_export import export_checkpoint

    own, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    out = export_checkpoint(own["ckpt_path"], own["output_dir"], vision=own["vision"], overrides=overrides)
    print(f"exported {own['ckpt_path']} -> {out}")


if __name__ == "__main__":
    main()
