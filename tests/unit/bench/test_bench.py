"""make bench: the script runs (tiny sizes) and writes the figures the performance issue asks for."""

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from blip2_train.bench.harness import (
    _encoder,
    _NoModuleTracking,
    count_flops,
    encoder_config,
    main,
    stage1_step,
)


def test_bench_quick_writes_bench_json(tmp_path):
    out = tmp_path / "bench.json"
    result = main(["--quick", "--steps", "2", "--output", str(out)])
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(result))
    for stage in ("stage1", "stage2"):
        assert saved[f"{stage}_step_ms"] > 0 and saved[f"{stage}_flops_per_step"] > 0
        assert saved[f"{stage}_utilization"] > 0  # (an upper bound is noise-prone on a shared CPU)
        assert abs(saved[f"{stage}_samples_per_s"] - 16 / (saved[f"{stage}_step_ms"] / 1000)) < 1e-6
    assert saved["stage1_batch_size"] == 16 and saved["matmul_flops_per_s"] > 0 and saved["peak_rss_mb"] > 0


def test_bench_sweep_rows_and_per_row_checkpointing(tmp_path):
    """A sweep: every impl at the first size, the first impl at the others; --checkpointing-from per row."""
    out = tmp_path / "bench.json"
    result = main(["--quick", "--steps", "2", "--sweep-steps", "1", "--impl", "fast,hf", "--batch-sizes", "16,8",
                   "--no-stage2",
                   "--no-loader", "--checkpointing-from", "16", "--output", str(out)])
    rows = [(r["impl"], r["batch"], r["checkpointing"]) for r in result["sweep"]]
    assert rows == [("fast", 16, True), ("hf", 16, True), ("fast", 8, False)]
    assert all(r["step_ms"] > 0 and r["matmul_flops_per_s"] > 0 for r in result["sweep"])
    assert result["sweep"][2]["flops_per_step"] < result["sweep"][0]["flops_per_step"]


def test_bench_times_lavis_own_step_beside_ours(tmp_path):
    """--impl fast,lavis: LAVIS's Blip2Qformer.forward (fetched with pip download, no dependencies) runs
    under the same harness; it recomputes the cross-attention K/V in every pass, so it does more FLOPs."""
    from blip2_train.bench.peer_lavis import LavisUnavailable, fetch_sources

    try:
        fetch_sources()
    except LavisUnavailable as err:
        pytest.skip(str(err))
    result = main(["--quick", "--steps", "1", "--impl", "fast,hf,lavis", "--no-stage2", "--no-loader",
                   "--output", str(tmp_path / "bench.json")])
    assert result["stage1_lavis_step_ms"] > 0 and result["stage1_lavis_flops_per_step"] > 0
    with pytest.raises(SystemExit):  # the peer is never the main figure (stage 2 needs our Q-Former)
        main(["--quick", "--impl", "lavis"])
    assert result["stage1_speedup_vs_lavis"] == result["stage1_samples_per_s"] / result["stage1_lavis_samples_per_s"]
    # K/V of the image tokens recomputed in LAVIS's 3 passes (ITC, ITM, and the ITG pass reuses ITC's
    # query K/V as past_key_values), once in ours: at these sizes LAVIS does more work than the fast path
    assert result["stage1_lavis_flops_per_step"] > result["stage1_flops_per_step"]
    normalized = result["stage1_speedup_vs_lavis_at_equal_matmul_rate"]
    expected = (result["stage1_lavis_flops_per_step"] / result["stage1_lavis_utilization"]) / (
        result["stage1_flops_per_step"] / result["stage1_utilization"])
    assert abs(normalized - expected) < 1e-9 * expected


def test_bench_with_the_frozen_encoder_counts_its_flops_and_mfu(tmp_path):
    """--encoder eva (the GPU figure): images go through the frozen EVA (tiny under --quick) inside the
    step, its FLOPs are counted with the Q-Former's; MFU is FLOP/s over the given peak."""
    result = main(["--quick", "--encoder", "eva", "--steps", "1", "--impl", "fast", "--no-stage2", "--no-loader",
                   "--peak-flops", "1e12", "--output", str(tmp_path / "bench.json")])
    assert result["stage1_shapes"]["images"] == [16, 3, 64, 64]
    assert result["stage1_shapes"]["image_tokens"] == [16, 65, 64] and "blip2-tiny-eva" in result["stage1_encoder"]
    with FlopCounterMode(display=False) as counter:
        _encoder({"encoder": "eva", "quick": True, "tokens": 65, "width": 64}, "cpu")(torch.randn(16, 3, 64, 64))
    vit = counter.get_total_flops()
    qformer_only = main(["--quick", "--steps", "1", "--impl", "fast", "--no-stage2", "--no-loader",
                         "--output", str(tmp_path / "tokens.json")])  # 17 image tokens: fewer than 65
    assert vit > 0 and result["stage1_flops_per_step"] > vit + qformer_only["stage1_flops_per_step"]
    mfu = result["stage1_flops_per_step"] / (result["stage1_step_ms"] / 1000) / 1e12
    assert abs(result["stage1_mfu"] - mfu) < 1e-9 * mfu and "stage1_mfu" not in qformer_only  # no peak on a CPU
    with pytest.raises(ValueError, match="square"):
        encoder_config({"encoder": "eva", "quick": False, "tokens": 300})


def test_flops_are_counted_without_module_hooks_that_defeat_checkpointing():
    """count_flops = FlopCounterMode's total, without the module tracker (whose backward hooks kept the
    recomputed activations of checkpointed layers alive: the counting step's memory became the row's)."""
    spec = {"steps": 1, "quick": True, "checkpointing": True, "compile": False, "width": 64, "vocab": 512,
            "encoder": None, "kind": "stage1", "impl": "fast", "batch": 4, "tokens": 17}
    step = stage1_step(spec, torch.device("cpu"))
    step()
    with FlopCounterMode(display=False) as counter:
        step()
    assert count_flops(step) == counter.get_total_flops() > 0
    with _NoModuleTracking() as tracker:
        assert tracker.parents == {"Global"}
