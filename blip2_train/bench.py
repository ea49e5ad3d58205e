"""``make bench``: time the training steps against this machine's own matmul rate.

    python -m blip2_train.bench [--steps 10] [--batch-size 16] [--quick]

Stage 1 at LAVIS's Q-Former size (BERT-base Q-Former, 32 queries, cross-attention every 2nd layer,
image tokens [B, 257, 1408] fed directly so the frozen ViT is not timed, text length 32): ITC + ITM
+ ITG forward, backward and AdamW step. Stage 2: the query path + projection in front of an
OPT-125m-shaped random decoder (frozen). fp32 on CPU, bf16 autocast on GPU. Writes bench.json in
the current directory and prints a table. ``--quick`` shrinks every size (for tests).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import time

import torch
from omegaconf import OmegaConf

from blip2_train.config import QFormerConfig

QUICK = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _median_ms(fn, steps: int, warmup: int, device) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def _flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def matmul_flops_per_s(n: int, k: int, m: int, device, dtype) -> float:
    a, b = torch.randn(n, k, device=device, dtype=dtype), torch.randn(k, m, device=device, dtype=dtype)
    ms = _median_ms(lambda: a @ b, 10, 3, device)
    return 2 * n * k * m / (ms / 1000)


def stage1_step(batch: int, image_tokens: int, quick: bool, device):
    """A closure running one stage-1 training step on random inputs."""
    from blip2_train.losses import hard_negative_indices, itc_loss, itc_similarities, itg_loss, itm_loss
    from blip2_train.models.qformer import QFormer, itg_mask

    cfg = OmegaConf.structured(QFormerConfig(bert=None, **(QUICK if quick else {})))
    width = 64 if quick else 1408
    model = QFormer(cfg, vision_width=width, vocab_size=30523).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tokens = torch.randn(batch, image_tokens, width, device=device)
    ids = torch.randint(1000, 30000, (batch, 32), device=device)
    mask = torch.ones(batch, 32, dtype=torch.long, device=device)
    image_ids = torch.arange(batch, device=device)
    q = model.num_query_tokens

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            embeds = model.encode_image(tokens)
            hidden = model.joint_forward(embeds, ids, itg_mask(mask, q))
            image_feats = model.image_features(hidden[:, :q])
            text_feats = model.text_features(model.text_forward(ids, mask))
            sim_i2t, sim_t2i = itc_similarities(image_feats, text_feats, text_feats, image_feats)
            positives = image_ids[:, None] == image_ids[None, :]
            temp = model.current_temperature()
            loss = itc_loss(sim_i2t, sim_t2i, temp, positives)
            neg_img, ok_img = hard_negative_indices(sim_t2i.detach() / temp.detach(), positives)
            neg_txt, ok_txt = hard_negative_indices(sim_i2t.detach() / temp.detach(), positives)
            logits = model.itm_logits(torch.cat([embeds, embeds[neg_img], embeds]),
                                      torch.cat([ids, ids, ids[neg_txt]]), torch.cat([mask, mask, mask[neg_txt]]))
            weights = torch.cat([torch.ones_like(ok_img, dtype=torch.float), ok_img.float(), ok_txt.float()])
            loss = loss + itm_loss(logits, batch, weights)
            loss = loss + itg_loss(model.lm_logits(hidden[:, q:]), ids, mask)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def stage2_step(batch: int, quick: bool, device):
    from transformers import OPTConfig, OPTForCausalLM

    from blip2_train.models.qformer import QFormer

    cfg = OmegaConf.structured(QFormerConfig(bert=None, **(QUICK if quick else {})))
    width = 64 if quick else 1408
    qformer = QFormer(cfg, vision_width=width, vocab_size=0, query_only=True).to(device).train()
    llm_width = 64 if quick else 768
    llm = OPTForCausalLM(OPTConfig(hidden_size=llm_width, num_hidden_layers=2 if quick else 12,
                                   num_attention_heads=4 if quick else 12, ffn_dim=4 * llm_width,
                                   vocab_size=50272, word_embed_proj_dim=llm_width)).to(device).eval()
    llm.requires_grad_(False)
    projection = torch.nn.Linear(cfg.hidden_size, llm_width).to(device)
    optimizer = torch.optim.AdamW(list(qformer.parameters()) + list(projection.parameters()), lr=1e-4)
    tokens = torch.randn(batch, 17 if quick else 257, width, device=device)
    ids = torch.randint(4, 50000, (batch, 32), device=device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            prompts = projection(qformer.query_forward(qformer.encode_image(tokens)))
            inputs = torch.cat([prompts, llm.get_input_embeddings()(ids)], dim=1)
            labels = torch.cat([torch.full(prompts.shape[:2], -100, device=device), ids], dim=1)
            loss = llm(inputs_embeds=inputs, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def measure(step, batch: int, steps: int, peak: float, device) -> dict:
    ms = _median_ms(step, steps, 2, device)
    flops = _flops(step)
    return {"step_ms": ms, "samples_per_s": batch / (ms / 1000), "flops_per_step": flops,
            "utilization": flops / (ms / 1000) / peak}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--image-tokens", type=int, default=257)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--output", default="bench.json")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tokens = 17 if args.quick else args.image_tokens
    width = 64 if args.quick else 768
    peak = matmul_flops_per_s(args.batch_size * (32 + 32), width, 4 * width, device, dtype)
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
              "threads": torch.get_num_threads(), "dtype": str(dtype).replace("torch.", ""),
              "matmul_flops_per_s": peak, "stage1_batch_size": args.batch_size,
              "stage1_shapes": {"image_tokens": [args.batch_size, tokens, 64 if args.quick else 1408],
                                "text_len": 32, "queries": 32, "qformer_hidden": width},
              "loader_images_per_s": None}
    for name, step in (("stage1", stage1_step(args.batch_size, tokens, args.quick, device)),
                       ("stage2", stage2_step(args.batch_size, args.quick, device))):
        for key, value in measure(step, args.batch_size, args.steps, peak, device).items():
            result[f"{name}_{key}"] = value
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with open(args.output, "w") as handle:
        json.dump(result, handle, indent=2)
    print(f"{'figure':28s} value")
    for key, value in result.items():
        if isinstance(value, float):
            print(f"{key:28s} {value:,.4g}")
    print(f"wrote {args.output}")
    return result


if __name__ == "__main__":
    main()
