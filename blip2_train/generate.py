"""Caption an image (or answer a question about it) with a stage-2 checkpoint.

    python -m blip2_train.generate ckpt_path=CKPT image=PATH
    python -m blip2_train.generate ckpt_path=CKPT image=PATH prompt="Question: what is it? Short answer:"

Further key=value pairs override the checkpoint's config (e.g. generation.num_beams=1), checked against
the config schema; llm.model=DIR / encoder.pretrained=FILE where the frozen weights moved.
"""

from __future__ import annotations

import sys

import torch
from PIL import Image

OWN_KEYS = ("ckpt_path", "image", "prompt")


def generate(ckpt_path: str, image: str, prompt: str | None = None, overrides: list[str] = ()) -> str:
    from blip2_train.data.transforms import eval_transform
    from blip2_train.training.modules import module_from_checkpoint

    module, cfg = module_from_checkpoint(ckpt_path, list(overrides), OWN_KEYS)
    if cfg.stage.name != 2:
        raise SystemExit(f"{ckpt_path} is a stage-{cfg.stage.name} checkpoint; generation needs stage 2")
    pixels = eval_transform(cfg.encoder.image_size)(Image.open(image).convert("RGB"))[None]
    with torch.no_grad():
        return module.generate(pixels, prompt if prompt is not None else cfg.generation.prompt)[0]


def main(argv: list[str] | None = None) -> None:
    own, overrides = {}, []
    for arg in sys.argv[1:] if argv is None else argv:
        key, sep, value = arg.partition("=")
        if not sep:
            raise SystemExit(f"arguments are key=value pairs, got {arg!r}\n{__doc__}")
        if key in OWN_KEYS:
            own[key] = value
        else:
            overrides.append(arg)
    if "ckpt_path" not in own or "image" not in own:
        raise SystemExit(f"ckpt_path=CKPT and image=PATH are required\n{__doc__}")
    from blip2_train.evaluate import user_errors

    try:
        print(generate(own["ckpt_path"], own["image"], own.get("prompt"), overrides))
    except user_errors() as err:
        raise SystemExit(f"error: {err}") from err


if __name__ == "__main__":
    main()
