"""Evaluate a checkpoint on validation shards.

    python -m blip2_train.evaluate ckpt_path=CKPT data.val_shards=URL output=FILE.json [key=value ...]

Stage 1: zero-shot retrieval (ITC, then ITM re-ranking of the top ``retrieval.k_test``), the same
metric names as training's metrics.json. Stage 2: LM loss and captioning metrics, plus every
generated caption under ``predictions``. Overrides are dotted keys of the training config that the
checkpoint carries (for example ``retrieval.k_test=16`` or ``generation.num_beams=1``), checked
against the config schema as training checks them. The frozen parts a checkpoint leaves out are
rebuilt from the weights it names; ``llm.model=DIR`` / ``encoder.pretrained=FILE`` point elsewhere
when those weights moved.

VQA (docs/vqa.md): ``stage.task=vqa`` with question-answer shards gives ``val/vqa_accuracy`` and the
answers under ``predictions`` (``vqa.prompt``, ``vqa.num_beams``, ``vqa.max_new_tokens`` as options).
A stage-2 checkpoint trained on captions answers zero-shot: its Q-Former never read text, so the
question goes to the LLM prompt only (``vqa.qformer_text_input=false`` is set for it):

    python -m blip2_train.evaluate ckpt_path=CKPT stage.task=vqa data.val_shards=/data/vqav2/val
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning as L


def split_key_values(argv: list[str], own_keys: tuple[str, ...], required: tuple[str, ...],
                     doc: str | None) -> tuple[dict, list[str]]:
    """``key=value`` arguments -> (this command's own keys, the rest as config overrides)."""
    own, overrides = {}, []
    for arg in argv:
        if "=" not in arg:
            raise SystemExit(f"arguments are key=value pairs, got {arg!r}\n{doc}")
        key, value = arg.split("=", 1)
        if key in own_keys:
            own[key] = value
        else:
            overrides.append(arg)
    missing = [k for k in required if k not in own]
    if missing:
        raise SystemExit(f"{' and '.join(k + '=...' for k in missing)} required\n{doc}")
    return own, overrides


OWN_KEYS = ("ckpt_path", "output")


def parse_args(argv: list[str]) -> tuple[dict, list[str]]:
    return split_key_values(argv, OWN_KEYS, ("ckpt_path",), __doc__)


def user_errors():
    """The errors a command line's user makes (a misspelt override, weights that moved): a message, no traceback."""
    from blip2_train.config import OverrideError
    from blip2_train.training.modules import MissingSourceError

    return OverrideError, MissingSourceError


def zero_shot_vqa_overrides(ckpt_path: str, overrides: list[str]) -> list[str]:
    """``stage.task=vqa`` asked of a checkpoint not trained for VQA: its Q-Former holds no text path, so
    the question goes to the LLM prompt alone (``vqa.qformer_text_input=false``). Checks the task's
    settings before the model is built."""
    import torch
    from omegaconf import OmegaConf

    from blip2_train.config import validate_task

    asked = dict(o.split("=", 1) for o in overrides if "=" in o)
    if asked.get("stage.task") != "vqa":
        return overrides
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
    stored = OmegaConf.create(ckpt["hyper_parameters"]["cfg"])
    trained_for = OmegaConf.select(stored, "stage.task", default="caption")
    if trained_for != "vqa":
        if asked.get("vqa.qformer_text_input", "false").lower() == "true":
            raise SystemExit(f"{ckpt_path} was trained for stage.task={trained_for}: its Q-Former has no "
                             f"text path to read the question. Drop "
                             f"vqa.qformer_text_input=true (the question then goes to the LLM prompt only)")
        overrides = [*overrides, "vqa.qformer_text_input=false"]
    try:
        validate_task(OmegaConf.merge(stored, OmegaConf.from_dotlist(overrides)))
    except ValueError as err:
        raise SystemExit(str(err)) from err
    return overrides


def evaluate(ckpt_path: str, overrides: list[str] = (), output: str | None = None) -> dict:
    from blip2_train.training.fit import build_datamodule, resolve_precision
    from blip2_train.training.modules import module_from_checkpoint

    overrides = zero_shot_vqa_overrides(ckpt_path, list(overrides))
    module, cfg = module_from_checkpoint(ckpt_path, overrides, OWN_KEYS)
    if not cfg.data.val_shards and cfg.data.name != "synthetic":
        raise SystemExit("data.val_shards=URL is required (a directory of .tar shards or a brace URL)")
    trainer = L.Trainer(accelerator=cfg.trainer.accelerator, devices=1, precision=resolve_precision(cfg),
                        logger=False, enable_progress_bar=True, enable_checkpointing=False)
    datamodule = build_datamodule(cfg, module)
    (metrics,) = trainer.validate(module, datamodule=datamodule, verbose=False)
    result = {"metrics": {k: float(v) for k, v in sorted(metrics.items())}}
    predictions = getattr(module, "predictions", None)
    if predictions:
        result["predictions"] = dict(predictions)
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(argv: list[str] | None = None) -> None:
    own, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        result = evaluate(own["ckpt_path"], overrides, own.get("output"))
    except user_errors() as err:
        raise SystemExit(f"error: {err}") from err
    print(json.dumps(result["metrics"], indent=2))


if __name__ == "__main__":
    main()
