"""The bridge ablation's report: one markdown table and three plots from a sweep directory.

A sweep directory holds one run per job (``SWEEP/<n>/config.yaml``, ``metrics.json``,
``logs/**/metrics.csv``), as ``experiment=bridge_ablation`` writes it. Runs are grouped into arms
(bridge, visual tokens); within an arm each learning rate's runs are averaged over seeds and the lr
with the lowest mean final validation loss is the arm's (the others are listed beside it). Each
number is the mean over seeds +- their spread (sample standard deviation; 0 for one seed).
"""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from pathlib import Path

import yaml

#: (column title, metrics.json key, format); val loss and quality are read at the run's end
COLUMNS = (
    ("trainable params", "bridge/trainable_params", "{:,.0f}"),
    ("samples/s", "train/samples_per_s_mean", "{:.1f}"),
    ("LLM tokens/s", "train/llm_tokens_per_s_mean", "{:,.0f}"),
    ("val loss", "val/loss", "{:.3f}"),
    ("CIDEr", "cider", "{:.3f}"),
    ("attribute acc", "val/attr_acc", "{:.3f}"),
    ("count acc", "val/count_acc", "{:.3f}"),
    ("hallucination", "val/hallucination", "{:.3f}"),
)


def arm_name(cfg: dict) -> str:
    """The bridge as the table names it; the Q-Former's start is part of its arm (stage 1 trains it more):
    ``qformer (stage 1)`` (bridge=qformer_stage1), ``qformer (init_from)`` (another checkpoint given),
    ``qformer (scratch)``."""
    bridge = cfg.get("bridge") or {}
    name = bridge.get("name", "qformer")
    if name != "qformer":
        return name
    if bridge.get("stage1_steps"):
        return "qformer (stage 1)"
    return "qformer (init_from)" if cfg.get("init_from") else "qformer (scratch)"


def read_run(run_dir: Path) -> dict | None:
    """One job: its bridge, tokens, lr, seed, final metrics and validation-loss curve; None if unfinished."""
    metrics_file, config_file = run_dir / "metrics.json", run_dir / "config.yaml"
    if not metrics_file.exists() or not config_file.exists():
        return None
    cfg = yaml.safe_load(config_file.read_text())
    metrics = json.loads(metrics_file.read_text())
    curve: dict[int, float] = {}
    for path in sorted((run_dir / "logs").glob("**/metrics.csv")):
        with path.open() as f:
            for row in csv.DictReader(f):
                if row.get("val/loss"):
                    curve[int(row["step"])] = float(row["val/loss"])
    tokens = metrics.get("bridge/visual_tokens")
    return {"dir": run_dir.name, "bridge": arm_name(cfg),
            "tokens": int(tokens) if tokens is not None else None, "lr": float(cfg["optim"]["lr"]),
            "seed": int(cfg["seed"]), "metrics": metrics, "curve": sorted(curve.items())}


def read_sweep(sweep_dir: str | Path) -> list[dict]:
    runs = [read_run(p) for p in sorted(Path(sweep_dir).iterdir()) if p.is_dir()]
    runs = [r for r in runs if r is not None]
    if not runs:
        raise FileNotFoundError(f"{sweep_dir} holds no finished runs (<n>/metrics.json with <n>/config.yaml); "
                                f"is it the run_dir of a multirun such as experiment=bridge_ablation?")
    return runs


def mean_spread(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def summarise(runs: list[dict]) -> list[dict]:
    """One row per arm (bridge, tokens) at its best lr: per column (mean, spread, seeds); sorted."""
    by_arm: dict[tuple, dict[float, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        by_arm[(run["bridge"], run["tokens"])][run["lr"]].append(run)
    rows = []
    for (bridge, tokens), by_lr in sorted(by_arm.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0)):
        def loss_of(lr, by_lr=by_lr):
            values = [r["metrics"]["val/loss"] for r in by_lr[lr] if "val/loss" in r["metrics"]]
            return mean_spread(values)[0] if values else math.inf
        best = min(by_lr, key=loss_of)
        chosen = by_lr[best]
        row = {"bridge": bridge, "tokens": tokens, "lr": best, "lrs": sorted(by_lr), "seeds": len(chosen),
               "runs": chosen}
        for _, key, _ in COLUMNS:
            values = [r["metrics"][key] for r in chosen if key in r["metrics"]]
            row[key] = mean_spread(values) if values else None
        rows.append(row)
    return rows


def markdown_table(rows: list[dict]) -> str:
    head = ["bridge", "tokens", "lr (of)", "seeds", *[c[0] for c in COLUMNS]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["bridge"], str(row["tokens"]),
                 f"{row['lr']:g} (" + ", ".join(f"{lr:g}" for lr in row["lrs"]) + ")", str(row["seeds"])]
        for _, key, fmt in COLUMNS:
            value = row[key]
            cells.append("n/a" if value is None else f"{fmt.format(value[0])} ± {fmt.format(value[1])}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _mean_curve(runs: list[dict]) -> tuple[list[int], list[float]]:
    by_step: dict[int, list[float]] = defaultdict(list)
    for run in runs:
        for step, loss in run["curve"]:
            by_step[step].append(loss)
    steps = sorted(by_step)
    return steps, [sum(by_step[s]) / len(by_step[s]) for s in steps]


def plot(rows: list[dict], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    fig, ax = plt.subplots(figsize=(6, 4))
    for row in rows:
        steps, losses = _mean_curve(row["runs"])
        if steps:
            ax.plot(steps, losses, marker="o", label=f"{row['bridge']} {row['tokens']} tok (lr {row['lr']:g})")
    ax.set(xlabel="step", ylabel="validation loss (mean over seeds)", title="Validation loss per bridge")
    ax.legend(fontsize=7)
    written.append(_save(fig, out_dir / "val_loss_vs_step.png"))

    qualities = [(key, title) for title, key, _ in COLUMNS[4:] if any(r[key] for r in rows)]
    for x_key, x_label, name in (("tokens", "visual tokens per image", "quality_vs_tokens.png"),
                                 ("train/samples_per_s_mean", "training samples/s", "quality_vs_samples_per_s.png")):
        fig, axes = plt.subplots(1, len(qualities), figsize=(3.2 * len(qualities), 3.2), squeeze=False)
        for ax, (key, title) in zip(axes[0], qualities):
            for bridge in sorted({r["bridge"] for r in rows}):
                points = [((r["tokens"] if x_key == "tokens" else r[x_key][0]), r[key])
                          for r in rows if r["bridge"] == bridge and r[key] and (x_key == "tokens" or r[x_key])]
                points.sort()
                if points:
                    ax.errorbar([p[0] for p in points], [p[1][0] for p in points], yerr=[p[1][1] for p in points],
                                marker="o", capsize=3, label=bridge)
            if x_key == "tokens":
                ax.set_xscale("log", base=2)
            ax.set(xlabel=x_label, title=title)
            ax.legend(fontsize=7)
        written.append(_save(fig, out_dir / name))
    return written


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def write_report(sweep_dir: str | Path) -> dict:
    """Write ``report.md`` and the PNG plots into ``sweep_dir``; returns the rows and the paths."""
    sweep_dir = Path(sweep_dir)
    runs = read_sweep(sweep_dir)
    rows = summarise(runs)
    table = markdown_table(rows)
    text = (f"# Bridge ablation: {sweep_dir}\n\n{len(runs)} runs. Each row: the arm's best learning rate (lowest "
            f"mean final val loss; the lrs tried in brackets), mean ± sample standard deviation over seeds, at the "
            f"end of training.\n\n{table}")
    (sweep_dir / "report.md").write_text(text)
    plots = plot(rows, sweep_dir)
    return {"rows": rows, "table": table, "report": sweep_dir / "report.md", "plots": plots}
