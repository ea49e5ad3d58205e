"""``make bench``: time the training steps against this machine's own matmul rate.

    python -m blip2_train.bench [--steps 10] [--impl fast,hf] [--batch-sizes 16] [--image-tokens 257]
                                [--sweep-steps N] [--quick] [--checkpointing] [--compile] [--no-loader]
                                [--compile-mode default|reduce-overhead|max-autotune|...]
                                [--encoder eva] [--dropout-masks packed|torch]

Stage 1 at LAVIS's Q-Former size (BERT-base Q-Former, random init, vocabulary 30523, 32 queries,
cross-attention every 2nd layer, image tokens [B, 257, 1408] fed directly so the frozen ViT is
not timed, text length 32, B=16): the trainer's own ``models.objectives.Stage1Objective`` (ITC +
ITM + ITG), backward and the trainer's AdamW step. Stage 2: the trainer's Q-Former bridge and
``Stage2Objective`` (prompts + LM loss) through an OPT-125m-shaped random decoder (frozen). fp32 on CPU, bf16 autocast on
GPU. Every figure comes from its own subprocess, so ``peak_rss_mb`` is that step's alone. FLOPs
are counted with ``FlopCounterMode`` on the warm-up step (without its module tracker, whose hooks
defeat activation checkpointing: see ``count_flops``); utilization = achieved FLOP/s over the
dense matmul FLOP/s of the step's main shapes (the best shape's median), timed in the same process
between the steps. ``*_cpu_step_ms`` (process CPU time / threads) and ``*_cpu_utilization`` are the same
figures by CPU time: steadier where other jobs share the cores (see ``load_average_*``).

Top-level ``stage1_*`` figures are for ``qformer.impl=fast`` (the default); ``stage1_hf_*`` for
transformers' module. More than one batch size or image-token count adds a ``sweep`` table: the
first impl at every size (``--sweep-steps`` timed steps), the others at the first size only.
Writes bench.json in the current directory and prints a table. ``--quick``: tiny sizes, in
process (for tests).

``--encoder eva`` (the GPU figure of issue 7): the stage-1 step starts from images [B, 3, 224, 224]
(364 px for 677 tokens) through the frozen EVA ViT-g of ``encoder=eva`` (open_clip EVA01-g-14, 39
blocks, random weights built on the device, bf16 on GPU / fp32 on CPU; ``--quick``: the tiny EVA).
The LAVIS row then gets the same frozen encoder, so the two differ in the Q-Former step only.
On a GPU ``stage1_mfu`` = FLOP/s over the datasheet dense bf16 peak of the card
(``device_peak_flops_per_s``; ``--peak-flops`` for cards not in ``PEAK_BF16``), and the reference
matmuls include a large square product (the card's practical peak) and the ViT's MLP shape.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from omegaconf import OmegaConf
from torch import nn

from blip2_train.config import CUDA_GRAPH_MODES, VALID, DataConfig, OptimConfig, QFormerConfig, StageConfig
from blip2_train.models.bridges import QFormerBridge
from blip2_train.models.llm import FrozenLLM
from blip2_train.models.objectives import Stage1Objective, Stage2Objective

VOCAB, TEXT_LEN, LLM_TEXT_LEN = 30523, 32, 32
# Datasheet dense bf16 tensor FLOP/s (no sparsity), matched in order against the device name.
PEAK_BF16 = (("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989.4e12), ("H200", 989.4e12),
             ("GH200", 989.4e12), ("B200", 2250e12), ("A100", 312e12), ("L40S", 362e12), ("A10G", 70e12),
             ("L4", 121e12))
QUICK_QFORMER = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                 "intermediate_size": 128, "num_query_tokens": 8, "embed_dim": 32}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return (time.perf_counter() - start) * 1000


def _clocked(fn, device) -> tuple[float, float]:
    """(wall ms, process CPU ms / threads): the second is what the step costs when its threads
    have the cores to themselves, a steadier figure on a machine shared with other jobs."""
    cpu = time.process_time()
    wall = _timed(fn, device)
    return wall, (time.process_time() - cpu) * 1000 / torch.get_num_threads()


def matmul_samples(shapes: list[tuple[int, int, int]], device, dtype, reps: int) -> dict[str, list[tuple[float, float]]]:
    """(wall, CPU-time) FLOP/s of ``reps`` timed ``[n, k] @ [k, m]`` per shape (after one untimed)."""
    samples = {}
    for n, k, m in shapes:
        a = torch.randn(n, k, device=device, dtype=dtype)
        b = torch.randn(k, m, device=device, dtype=dtype)
        a @ b
        flop = 2 * n * k * m
        samples[f"{n}x{k}x{m}"] = [tuple(flop / (t / 1000) for t in _clocked(lambda a=a, b=b: a @ b, device))
                                   for _ in range(reps)]
    return samples


# ------------------------------------------------------------------------------ the steps
def _qformer(spec: dict, query_only: bool):
    from blip2_train.models.qformer import QFormer

    sizes = QUICK_QFORMER if spec["quick"] else {}
    cfg = OmegaConf.structured(QFormerConfig(bert=None, impl=spec["impl"],
                                             gradient_checkpointing=spec["checkpointing"],
                                             dropout_masks=spec.get("dropout_masks", "packed"), **sizes))
    torch.manual_seed(0)
    return QFormer(cfg, vision_width=spec["width"], vocab_size=0 if query_only else spec["vocab"],
                   query_only=query_only)


def _optimizer(module: nn.Module):
    from blip2_train.training.optim import build_optimizer

    return build_optimizer(module, OptimConfig(), max_steps=1000)["optimizer"]


def stage1_inputs(spec: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The seeded batch every stage-1 implementation is timed on: text ids [B, 32] ([CLS] first, no
    padding) and image tokens [B, N, W] (with ``spec['encoder']``: images [B, 3, S, S])."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(spec["vocab"] // 30, spec["vocab"] - 1, (spec["batch"], TEXT_LEN), generator=g)
    ids[:, 0] = 101  # [CLS]
    if spec.get("encoder"):
        size = encoder_config(spec).image_size
        return ids, torch.randn(spec["batch"], 3, size, size, generator=g)
    return ids, torch.randn(spec["batch"], spec["tokens"], spec["width"], generator=g)


def encoder_config(spec: dict):
    """``spec['encoder']`` (eva) as an EncoderConfig at ``spec['tokens']`` image tokens, random weights."""
    from blip2_train.config import EncoderConfig

    if spec["encoder"] != "eva":
        raise ValueError(f"--encoder {spec['encoder']!r}: choose eva")
    name, patch = ("blip2-tiny-eva", 8) if spec["quick"] else ("EVA01-g-14", 14)
    grid = math.isqrt(spec["tokens"] - 1)
    if grid * grid + 1 != spec["tokens"]:
        raise ValueError(f"--image-tokens {spec['tokens']}: with an encoder, 1 + a square number (257, 677)")
    precision = "bf16" if torch.cuda.is_available() else "fp32"
    return EncoderConfig(name="tiny_eva" if spec["quick"] else "eva", model_name=name, pretrained=None,
                         image_size=grid * patch, drop_last_blocks=1, precision=precision, freeze=True)


def _encoder(spec: dict, device) -> nn.Module:
    from blip2_train.models.encoders import build_image_encoder

    torch.manual_seed(0)
    encoder = build_image_encoder(encoder_config(spec), device)
    if encoder.width != spec["width"] or encoder.num_tokens != spec["tokens"]:
        raise ValueError(f"encoder gives [{encoder.num_tokens}, {encoder.width}] tokens, the bench expects "
                         f"[{spec['tokens']}, {spec['width']}]")
    return encoder


def stage1_step(spec: dict, device):
    """A closure running one stage-1 training step (phases timed into ``spec['phases']``)."""
    ids, image = stage1_inputs(spec)
    if spec["impl"] == "lavis":  # LAVIS's own code, the peer (blip2_train/bench/peer_lavis.py)
        from blip2_train.bench import peer_lavis

        sizes = {k: QUICK_QFORMER[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                               "intermediate_size", "num_query_tokens")} if spec["quick"] else {}
        model = peer_lavis.build(spec, sizes, ids).to(device)
        if spec.get("encoder"):  # the same frozen ViT as ours: the rows differ in the Q-Former step only
            model.visual_encoder = _encoder(spec, device)
        samples = {"image": image.to(device), "text_input": [""] * spec["batch"]}  # the ids come from its tokenizer
        return _train_step(lambda: model(samples)["loss"], _optimizer(model), spec, device,
                           compiled=model.Qformer.bert)
    model = _qformer(spec, query_only=False).to(device).train()
    # the trainer's own objective (Stage1Module calls it), at the default stage settings
    objective = Stage1Objective.from_stage(StageConfig(), dec_token_id=spec["vocab"] - 1)
    # image tokens are fed directly (the frozen ViT is not timed), or images through the frozen encoder
    encoder = _encoder(spec, device) if spec.get("encoder") else nn.Identity()
    optimizer = _optimizer(model)
    b = spec["batch"]
    batch = {"image": image, "input_ids": ids, "attention_mask": torch.ones(b, TEXT_LEN, dtype=torch.long),
             "image_id": torch.arange(b)}
    batch = {k: v.to(device) for k, v in batch.items()}

    def loss():
        return objective(model, encoder(batch["image"]), batch["input_ids"], batch["attention_mask"],
                         batch["image_id"])["loss"]

    return _train_step(loss, optimizer, spec, device, compiled=model.qformer)


def stage2_step(spec: dict, device):
    from transformers import OPTConfig, OPTForCausalLM

    model = _qformer(spec, query_only=True).to(device).train()
    quick = spec["quick"]
    llm_width = 64 if quick else 768
    torch.manual_seed(0)
    llm = OPTForCausalLM(OPTConfig(hidden_size=llm_width, num_hidden_layers=2 if quick else 12,
                                   num_attention_heads=4 if quick else 12, ffn_dim=4 * llm_width,
                                   vocab_size=50272, word_embed_proj_dim=llm_width,
                                   max_position_embeddings=2048)).to(device).eval()
    llm.requires_grad_(False)  # frozen, eval mode (llm.dropout_in_train=false)
    projection = nn.Linear(model.config.hidden_size, llm_width).to(device)
    # the trainer's own bridge, frozen-LLM wrapper and objective (Stage2Module calls them)
    bridge, frozen_llm, objective = QFormerBridge(model, projection), FrozenLLM(llm, dropout_in_train=False), \
        Stage2Objective(decoder_only=True)
    trainable = nn.ModuleDict({"model": model, "language_projection": projection})
    optimizer = _optimizer(trainable)
    b, g = spec["batch"], torch.Generator().manual_seed(0)
    ids = torch.randint(4, 50000, (b, LLM_TEXT_LEN), generator=g)
    batch = {"llm_input_ids": ids, "llm_attention_mask": torch.ones_like(ids), "llm_labels": ids.clone(),
             "image": torch.randn(b, spec["tokens"], spec["width"], generator=g)}
    batch = {k: v.to(device) for k, v in batch.items()}
    return _train_step(lambda: objective(bridge, frozen_llm, batch["image"], batch),
                       optimizer, spec, device, compiled=model.qformer)


def _train_step(loss_fn, optimizer, spec, device, compiled: nn.Module):
    """``step()`` runs one training step; ``step.compile()`` turns on torch.compile for ``compiled``
    (the Q-Former encoder, as ``trainer.compile=true`` does in training)."""
    phases = spec.setdefault("phases", {"forward_ms": [], "backward_ms": [], "optimizer_ms": []})
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step():
        if spec["compile"] and spec.get("compile_mode") in CUDA_GRAPH_MODES:
            torch.compiler.cudagraph_mark_step_begin()  # as Blip2Base.on_train_batch_start does

        def forward():
            with autocast:
                step.loss = loss_fn()

        phases["forward_ms"].append(_timed(forward, device))
        phases["backward_ms"].append(_timed(lambda: step.loss.backward(), device))

        def update():
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        phases["optimizer_ms"].append(_timed(update, device))

    # in place, as blip2_train/training/base.py does
    step.compile = lambda: compiled.compile(dynamic=True, mode=spec.get("compile_mode", "default"))
    return step


# --------------------------------------------------------------------------- measurement
class _NoModuleTracking:
    """Stands in for ``FlopCounterMode``'s ModuleTracker: every FLOP is counted under "Global" only.

    The tracker hooks every module's inputs and outputs for backward; under activation checkpointing
    that keeps the recomputed activations alive. The counting step then took 47% more memory than a
    plain step at B=8 (5.9 against 4.0 GB) and did not fit in 24 GB at B=64 x 677 image tokens, where
    a plain step needs 8.8 GB; since peak RSS is the process's, it also inflated the rows' figures."""

    parents = frozenset({"Global"})

    def __enter__(self):
        return self

    def __exit__(self, *args):
        return None


def count_flops(fn) -> int:
    """Total FLOPs of ``fn()`` by ``FlopCounterMode``, without its per-module bookkeeping."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    if hasattr(counter, "mod_tracker"):
        counter.mod_tracker = _NoModuleTracking()
    with counter:
        fn()
    return counter.get_total_flops()


def measure(spec: dict) -> dict:
    """One configuration: FLOPs on the warm-up step, then the median of ``steps`` timed steps."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    step = (stage1_step if spec["kind"] == "stage1" else stage2_step)(spec, device)
    flops = count_flops(step)  # eager: the model's FLOPs, compiled or not
    compile_s = None
    if spec["compile"]:
        step.compile()
        compile_s = _timed(step, device) / 1000  # the step that compiles (and its recompiles)
        step()
    for values in spec["phases"].values():  # keep the timed steps' phases only
        values.clear()
    h, b, n = (64, spec["batch"], spec["tokens"]) if spec["quick"] else (768, spec["batch"], spec["tokens"])
    shapes = [(3 * b * 64, h, 4 * h), (b * n, spec["width"], h), (3 * b * 64, h, h)]
    if spec.get("encoder"):  # the ViT's MLP
        shapes.append((b * n, spec["width"], 4 * spec["width"] if spec["quick"] else 6144))
    if device.type == "cuda":  # the card's practical peak
        shapes.append((8192, 8192, 8192))
    # The reference matmuls are timed between the steps (3 of each shape before every step, and
    # after the last), so they see the machine as the steps do: a shared VM's clock drifts by 10-20%
    # over minutes. Per shape the median of all of them; the peak is the best shape's.
    samples: dict[str, list] = {}
    times, cpu_times = [], []
    for _ in range(spec["steps"]):
        for key, values in matmul_samples(shapes, device, dtype, reps=3).items():
            samples.setdefault(key, []).extend(values)
        wall, cpu = _clocked(step, device)
        times.append(wall)
        cpu_times.append(cpu)
    for key, values in matmul_samples(shapes, device, dtype, reps=3).items():
        samples[key].extend(values)
    ms, cpu_ms = statistics.median(times), statistics.median(cpu_times)
    rates = {k: tuple(statistics.median(v[i] for v in values) for i in (0, 1)) for k, values in samples.items()}
    peak, cpu_peak = (max(r[i] for r in rates.values()) for i in (0, 1))
    best = max(v[0] for values in samples.values() for v in values)
    rss = (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda"
           else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {"step_ms": ms, "samples_per_s": spec["batch"] / (ms / 1000), "flops_per_step": flops,
            "compile_warmup_s": compile_s,
            "utilization": flops / (ms / 1000) / peak, "peak_rss_mb": rss, "matmul_flops_per_s": peak,
            "matmul_shapes_flops_per_s": {k: r[0] for k, r in rates.items()}, "step_ms_all": list(times),
            "cpu_step_ms": cpu_ms, "cpu_utilization": flops / (cpu_ms / 1000) / cpu_peak,
            "cpu_matmul_flops_per_s": cpu_peak, "matmul_best_flops_per_s": best,
            **{k: statistics.median(v) for k, v in spec["phases"].items()}}


def run_isolated(spec: dict, in_process: bool) -> dict:
    """``measure(spec)`` in a fresh interpreter (its own peak RSS), or here for --quick."""
    if in_process:
        return measure(dict(spec))
    out = subprocess.run([sys.executable, "-m", "blip2_train.bench", "--worker", json.dumps(spec)],
                         capture_output=True, text=True, check=False)
    lines = [line for line in out.stdout.splitlines() if line.startswith("BENCH_RESULT ")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"benchmark worker {spec} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(lines[-1][len("BENCH_RESULT "):])


def loader_images_per_s(batches: int = 40, workers: int = 2, shards: int = 4, per_shard: int = 128) -> dict:
    """Images/s of the training pipeline (decode, RandomResizedCrop to 224, flip, collate) on
    256-px JPEG shards generated here, with ``workers`` loader workers.

    The synthetic images get a texture so each JPEG holds about 20 KB, as a 256-px photo at quality
    90 does (a flat synthetic image compresses to 3 KB and would flatter the decoder).
    """
    import io
    import random
    import tarfile

    import numpy as np
    from PIL import Image

    from blip2_train.data.synthetic import render_sample
    from blip2_train.data.text import QFormerTextCollate
    from blip2_train.data.webdataset import Blip2DataModule
    from blip2_train.models.tokenization import build_qformer_tokenizer

    batch_size = 16
    with tempfile.TemporaryDirectory() as tmp:
        rng, noise = random.Random(0), np.random.default_rng(0)
        jpeg_bytes = 0
        for shard in range(shards):
            with tarfile.open(f"{tmp}/{shard:05d}.tar", "w") as tar:
                for i in range(per_shard):
                    image, caption, _ = render_sample(rng, 256)
                    low = noise.integers(0, 256, (32, 32, 3), dtype=np.uint8)  # smooth colour blotches
                    texture = np.asarray(Image.fromarray(low).resize((256, 256), Image.BICUBIC), np.float32)
                    grain = noise.normal(0, 6, texture.shape)
                    pixels = 0.7 * np.asarray(image, np.float32) + 0.3 * texture + grain
                    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
                    buffer = io.BytesIO()
                    image.save(buffer, format="JPEG", quality=90)
                    jpeg_bytes += buffer.tell()
                    key = f"{shard:05d}{i:04d}"
                    for name, data in ((f"{key}.jpg", buffer.getvalue()), (f"{key}.txt", caption.encode()),
                                       (f"{key}.json", json.dumps({"image_id": shard * 1000 + i}).encode())):
                        info = tarfile.TarInfo(name)
                        info.size = len(data)
                        tar.addfile(info, io.BytesIO(data))
        collate = QFormerTextCollate(build_qformer_tokenizer(None, tmp), TEXT_LEN)
        cfg = OmegaConf.structured(DataConfig(name="webdataset", train_shards=tmp, batch_size=batch_size,
                                              num_workers=workers, shuffle_buffer=100,
                                              samples_per_epoch=batch_size * (batches + 4)))
        module = Blip2DataModule(cfg, image_size=224, train_text_collate=collate, eval_text_collate=collate)
        loader = iter(module.train_dataloader())
        for _ in range(2 * workers):  # workers started and their first batches out
            next(loader)
        load_before = os.getloadavg()[0]  # other processes on the machine take cores from the workers
        start = time.perf_counter()
        for _ in range(batches):
            next(loader)
        seconds = time.perf_counter() - start
    return {"loader_images_per_s": batches * batch_size / seconds, "loader_workers": workers,
            "loader_shapes": {"jpeg_px": 256, "image_size": 224, "batch_size": batch_size,
                              "jpeg_kb": round(jpeg_bytes / (shards * per_shard) / 1024, 1)},
            "loader_load_avg_1min": load_before}


# ---------------------------------------------------------------------------------- main
def _table(result: dict) -> str:
    rows = [f"{'figure':34s} value"]
    for key, value in result.items():
        if isinstance(value, float):
            rows.append(f"{key:34s} {value:,.4g}")
        elif isinstance(value, int) and not isinstance(value, bool):
            rows.append(f"{key:34s} {value:,}")
    if result.get("sweep"):
        gpu = result.get("device_peak_flops_per_s") is not None
        header = ("| impl | batch | image tokens | step (ms) | ms / sample | CPU ms / thread | samples/s | "
                  f"TFLOP/step | utilization |{' MFU |' if gpu else ''} peak {'GPU memory' if gpu else 'RSS'} (MB) |")
        rows += ["", header, "|---" * header.count(" |") + "|"]
        rows += [f"| {r['impl']}{' (checkpointing)' if r.get('checkpointing') else ''} | {r['batch']} | "
                 f"{r['tokens']} | {r['step_ms']:,.1f} | {r['step_ms'] / r['batch']:,.2f} | {r['cpu_step_ms']:,.0f} | "
                 f"{r['samples_per_s']:.4g} | {r['flops_per_step'] / 1e12:.3g} | {r['utilization']:.2f} | "
                 + (f"{r['mfu']:.3f} | " if gpu else "") + f"{r['peak_rss_mb']:,.0f} |"
                 for r in result["sweep"] if "error" not in r]
        rows += [f"| {r['impl']} | {r['batch']} | {r['tokens']} | failed: {r['error']} |"
                 for r in result["sweep"] if "error" in r]
    return "\n".join(rows)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m blip2_train.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per figure (after 1 warm-up)")
    parser.add_argument("--impl", default="fast,hf,lavis", help="Q-Former implementations for stage 1; the "
                        "first one gives the stage1_* and stage2_* figures; lavis = LAVIS's own code (fetched "
                        "into .cache/lavis, see blip2_train/bench/peer_lavis.py; a row recorded as failed if it cannot be)")
    parser.add_argument("--batch-sizes", default="16", help="the first is the main figure's batch size")
    parser.add_argument("--sweep-steps", type=int, help="timed steps of the other sweep rows (default: --steps)")
    parser.add_argument("--image-tokens", default="257")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, measured in this process")
    parser.add_argument("--checkpointing", action="store_true", help="qformer.gradient_checkpointing=true")
    parser.add_argument("--checkpointing-from", type=int, help="qformer.gradient_checkpointing=true from this "
                        "batch size up (sweep rows whose activations would not fit in memory)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the Q-Former encoder as "
                        "trainer.compile=true does (after the FLOP-counting step; compile_warmup_s: the step "
                        "that compiles)")
    parser.add_argument("--compile-mode", default="default", choices=VALID["trainer.compile_mode"],
                        help="torch.compile's mode, as trainer.compile_mode (reduce-overhead: CUDA graphs)")
    parser.add_argument("--encoder", choices=["eva"], help="stage 1 from images through the frozen EVA ViT-g "
                        "(random weights; the GPU figure), not from image tokens")
    parser.add_argument("--dropout-masks", default="packed", choices=["packed", "torch"],
                        help="qformer.dropout_masks of impl=fast")
    parser.add_argument("--peak-flops", type=float, help="the card's dense bf16 FLOP/s for stage1_mfu "
                        "(default: PEAK_BF16 by device name)")
    parser.add_argument("--no-stage2", action="store_true")
    parser.add_argument("--no-loader", action="store_true", help="skip loader_images_per_s")
    parser.add_argument("--output", default="bench.json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:  # a subprocess of run_isolated
        print("BENCH_RESULT " + json.dumps(measure(json.loads(args.worker))), flush=True)
        return {}

    impls = args.impl.split(",")
    if impls[0] == "lavis":
        parser.error("--impl: lavis is the peer, timed beside ours; list it after fast or hf (e.g. fast,lavis)")
    batches = [int(b) for b in args.batch_sizes.split(",")]
    token_counts = [int(t) for t in args.image_tokens.split(",")]
    base = {"steps": args.steps, "quick": args.quick, "checkpointing": args.checkpointing,
            "compile": args.compile, "compile_mode": args.compile_mode,
            "width": 64 if args.quick else 1408, "vocab": 512 if args.quick else VOCAB,
            "encoder": args.encoder, "dropout_masks": args.dropout_masks}
    quick_tokens = 65 if args.encoder else 17  # the tiny EVA at 64 px, or a short image-token sequence
    cuda = torch.cuda.is_available()
    device_name = torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine()
    peak = args.peak_flops or (next((f for name, f in PEAK_BF16 if name in device_name), None) if cuda else None)
    result = {"device": device_name, "device_peak_flops_per_s": peak,
              "threads": torch.get_num_threads(), "dtype": "bf16 autocast" if cuda else "float32",
              "torch": torch.__version__, "stage1_impl": impls[0], "stage1_batch_size": batches[0],
              "stage1_compile": args.compile, "stage1_compile_mode": args.compile_mode if args.compile else None,
              "stage1_dropout_masks": args.dropout_masks,
              "load_average_before": os.getloadavg()[0]}
    encoder_cfg = None
    if args.encoder:
        encoder_cfg = encoder_config({**base, "tokens": quick_tokens if args.quick else token_counts[0]})
        result["stage1_encoder"] = (f"{encoder_cfg.model_name} ({encoder_cfg.name}, {encoder_cfg.image_size} px, "
                                    f"last block dropped, random weights, {encoder_cfg.precision}, frozen)")
    sweep = []
    for tokens in token_counts:
        for batch in batches:
            main_config = batch == batches[0] and tokens == token_counts[0]
            # the main configuration (first batch size and token count) runs every impl with --steps;
            # the other sweep rows run the first impl with --sweep-steps
            for impl in impls if main_config else impls[:1]:
                steps = args.steps if main_config or args.sweep_steps is None else args.sweep_steps
                spec = {**base, "steps": steps, "kind": "stage1", "impl": impl, "batch": batch,
                        "tokens": quick_tokens if args.quick else tokens}
                if args.checkpointing_from is not None and batch >= args.checkpointing_from and impl != "lavis":
                    spec["checkpointing"] = True
                row = {"impl": impl, "batch": batch, "tokens": spec["tokens"], "checkpointing": spec["checkpointing"]}
                if impl == "lavis":
                    from blip2_train.bench.peer_lavis import LavisUnavailable, fetch_sources

                    try:
                        fetch_sources()
                    except LavisUnavailable as err:
                        sweep.append({**row, "error": str(err)})
                        print(f"stage1 impl=lavis: skipped, {err}", file=sys.stderr)
                        continue
                try:
                    figures = run_isolated(spec, args.quick)
                except RuntimeError as err:  # a sweep row that does not fit (memory) costs only its row
                    if main_config and impl != "lavis":
                        raise
                    sweep.append({**row, "error": str(err).splitlines()[0]})
                    print(f"stage1 impl={impl} B={batch} tokens={spec['tokens']}: failed, {err}", file=sys.stderr)
                    continue
                sweep.append({**row, **figures})
                print(f"stage1 impl={impl} B={batch} tokens={spec['tokens']}: {figures['step_ms']:,.0f} ms/step, "
                      f"utilization {figures['utilization']:.2f}", file=sys.stderr, flush=True)
    main_rows = {r["impl"]: r for r in sweep
                 if r["batch"] == batches[0] and r["tokens"] == sweep[0]["tokens"] and "error" not in r}
    first = main_rows[impls[0]]
    result.update({"matmul_flops_per_s": first["matmul_flops_per_s"],
                   "cpu_matmul_flops_per_s": first["cpu_matmul_flops_per_s"],
                   "matmul_shapes_flops_per_s": first["matmul_shapes_flops_per_s"],
                   "stage1_shapes": {"image_tokens": [batches[0], first["tokens"], base["width"]],
                                     "text_len": TEXT_LEN, "queries": 8 if args.quick else 32,
                                     "qformer": "tiny" if args.quick else "bert-base (768 x 12 layers)",
                                     "cross_attention_frequency": 2, "vocab": base["vocab"]}})
    if encoder_cfg is not None:
        size = encoder_cfg.image_size
        result["stage1_shapes"]["images"] = [batches[0], 3, size, size]
    keys = ("step_ms", "samples_per_s", "flops_per_step", "utilization", "peak_rss_mb", "compile_warmup_s",
            "forward_ms", "backward_ms", "optimizer_ms", "cpu_step_ms", "cpu_utilization")
    for row in sweep:
        if peak and "error" not in row:  # model FLOPs utilization against the datasheet peak
            row["mfu"] = row["flops_per_step"] / (row["step_ms"] / 1000) / peak
    for impl, row in main_rows.items():
        prefix = "stage1" if impl == impls[0] else f"stage1_{impl}"
        result.update({f"{prefix}_{k}": row[k] for k in keys + (("mfu",) if peak else ())})
    for impl, row in main_rows.items():
        if impl != impls[0]:  # samples/s of the first impl over this one's, as measured ...
            result[f"stage1_speedup_vs_{impl}"] = first["samples_per_s"] / row["samples_per_s"]
            # ... and at an equal machine speed: each step time in units of its own reference
            # matmul rate (= FLOPs / utilization), since a shared VM's speed drifts between rows
            result[f"stage1_speedup_vs_{impl}_at_equal_matmul_rate"] = (
                row["step_ms"] * row["matmul_flops_per_s"]) / (first["step_ms"] * first["matmul_flops_per_s"])
    for row in sweep:
        if row["impl"] == "lavis" and "error" in row:
            result["stage1_lavis_note"] = row["error"]
    result["peak_rss_mb"] = first["peak_rss_mb"]
    if not args.no_stage2:
        spec = {**base, "kind": "stage2", "impl": impls[0], "batch": batches[0], "encoder": None,
                "tokens": 17 if args.quick else token_counts[0]}
        row = run_isolated(spec, args.quick)
        result.update({f"stage2_{k}": row[k] for k in keys})
        result["stage2_shapes"] = {"image_tokens": [batches[0], spec["tokens"], base["width"]],
                                   "llm": "tiny OPT" if args.quick else "OPT-125m shape (768 x 12 layers, "
                                   "vocab 50272), random, frozen", "text_len": LLM_TEXT_LEN}
    result["loader_images_per_s"] = None
    result["loader_note"] = "skipped (--no-loader)"
    if not args.no_loader:
        result.update(loader_images_per_s(batches=2, shards=2, per_shard=32) if args.quick
                      else loader_images_per_s())
        result["loader_note"] = "train pipeline on generated 256-px JPEG shards, 224-px RandomResizedCrop"
    result["load_average_after"] = os.getloadavg()[0]  # other work on the machine skews every figure
    if len(sweep) > len(impls):
        result["sweep"] = [{k: r[k] for k in ("impl", "batch", "tokens", "checkpointing", "step_ms", "samples_per_s",
                                              "flops_per_step", "utilization", "mfu", "peak_rss_mb", "cpu_step_ms",
                                              "matmul_flops_per_s", "error") if k in r} for r in sweep]
    with open(args.output, "w") as handle:
        json.dump(result, handle, indent=2)
    print(_table(result))
    print(f"wrote {args.output}")
    return result

