"""Figures of a run: how related the tasks' masks are, the forgetting matrix, and the learning curves.

    python tools/figures.py --paths CKPT [--out DIR] [--matrix metrics.json ...] [--curves history.csv ...]

--paths writes task_relation_layers.png (the cosine similarity of every pair of tasks' masks at s = smax,
one small heatmap per masked layer) and task_relation_mean.png (the same averaged over layers), the
paper's task-embedding figure. --matrix writes forgetting_matrix.png: rows = after stage, columns = task,
cells = the headline metric (MRR@5 for rec tasks, accuracy for cls tasks); the colour is the value over
the task's best value in any stage, so forgetting reads the same for rec and cls tasks. --curves writes
learning_curves.png from the stages' <savepath>.history.csv files (one column per stage: the training loss and its
retention part, then the validation metrics, new bests marked).
"""
from __future__ import annotations

import argparse
import importlib.util
import math
import os
import sys

import numpy as np
import torch

if __package__ in (None, ""):  # run as a file (python tools/…): import the suite from the repository root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from continual import flags
from continual.methods.checkpoints import load_checkpoint
from continual.evaluation.reports import matrix_cells
from continual.training.history import read_history
from model import NextItNet
from utils import DataError, cli

DEFAULT_SMAX = 50.0


def mask_similarity(model: NextItNet, s: float = DEFAULT_SMAX) -> np.ndarray:
    """Cosine similarity of every pair of tasks' masks per masked layer → [n_layers, N, N].

    masks_t = model.task_masks(t, s) [n_layers, C]; cell [l, a, b] = <m_a[l], m_b[l]> / (|m_a[l]| |m_b[l]|)
    (a mask that is exactly zero has similarity 0 with everything).
    """
    with torch.no_grad():
        masks = torch.stack([model.task_masks(t, s) for t in range(model.config.n_tasks)]).double()  # [N, n_layers, C]
    unit = masks / masks.norm(dim=2, keepdim=True).clamp_min(1e-300)
    return torch.einsum("alc,blc->lab", unit, unit).numpy()


def layer_names(model: NextItNet) -> list[str]:
    """Masked layer l is convolution l % 2 + 1 of residual block l // 2 (dilation d, then 2d)."""
    return [f"block {l // 2 + 1} conv {l % 2 + 1} (d={d * (1 + l % 2)})"
            for l, d in enumerate(d for d in model.config.dilations for _ in range(2))]


def _heatmap(ax, values: np.ndarray, colours: np.ndarray, labels_x: list[str], labels_y: list[str],
             annotate: str, vmin: float = 0.0, vmax: float = 1.0):
    """One imshow with tick labels and each cell's value written in format `annotate` ("" = none); NaN blank."""
    image = ax.imshow(np.ma.masked_invalid(colours), vmin=vmin, vmax=vmax, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(labels_x)), labels_x)
    ax.set_yticks(range(len(labels_y)), labels_y)
    if annotate:
        for (i, j), value in np.ndenumerate(values):
            if not math.isnan(value):
                light = (colours[i, j] - vmin) / max(vmax - vmin, 1e-12) > 0.55
                ax.text(j, i, format(value, annotate), ha="center", va="center", fontsize=8,
                        color="black" if light else "white")
    return image


def similarity_range(similarity: np.ndarray) -> tuple[float, str]:
    """Colour floor and number format: nearly identical masks get a narrow scale and enough decimals."""
    low = float(np.nanmin(similarity))
    if low <= 0.5:
        return 0.0, ".2f"
    digits = min(6, max(2, math.ceil(-math.log10(max(1.0 - low, 1e-6))) + 1))
    return math.floor(low * 10 ** digits) / 10 ** digits, f".{digits}f"


def _finer(digits: str) -> str:
    """Colour-bar tick format: one decimal more than the cells' format (".4f" → "%.5f")."""
    return f"%.{int(digits[1:-1]) + 1}f"


def _scale(low: float) -> str:
    return "" if low == 0.0 else f" (colour scale {low:g}..1)"


def relation_figures(checkpoint: dict, out: str, name: str = "") -> list[str]:
    """task_relation_layers.png and task_relation_mean.png of a checkpoint; returns their paths."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model = NextItNet.from_checkpoint(checkpoint).eval()
    smax = float((checkpoint.get("run_config") or {}).get("smax") or DEFAULT_SMAX)
    similarity = mask_similarity(model, smax)                                      # [n_layers, N, N]
    n_layers, n_tasks, _ = similarity.shape
    numbers = [str(t) for t in range(1, n_tasks + 1)]
    low, digits = similarity_range(similarity)
    names = [f"{t} {task.get('name') or ''}".strip() for t, task in enumerate(checkpoint["tasks"], 1)]
    note = "" if model.config.use_masks else " (no masks: every mask is 1)"
    title = f"{name}stage {checkpoint['stage']}: cosine similarity of task masks at s={smax:g}{note}"

    cols = math.ceil(math.sqrt(n_layers))
    rows = math.ceil(n_layers / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols + 1.2, 2.4 * rows + 0.8), squeeze=False,
                             constrained_layout=True)
    for layer, (ax, label) in enumerate(zip(axes.flat, layer_names(model))):
        image = _heatmap(ax, similarity[layer], similarity[layer], numbers, numbers,
                         digits if n_tasks <= 4 else "", vmin=low)
        ax.set_aspect("equal")
        ax.set_title(label, fontsize=9)
    for ax in list(axes.flat)[n_layers:]:
        ax.axis("off")
    fig.colorbar(image, ax=axes, shrink=0.6, label="cosine similarity", format=_finer(digits))
    fig.suptitle(f"{title}, per masked layer{_scale(low)}\ntasks: {', '.join(names)}")
    layers_path = os.path.join(out, "task_relation_layers.png")
    fig.savefig(layers_path, dpi=110)
    plt.close(fig)

    mean = similarity.mean(axis=0)                                                  # [N, N]
    low, digits = similarity_range(mean)
    fig, ax = plt.subplots(figsize=(1.1 * n_tasks + 3.5, 1.0 * n_tasks + 2.0), constrained_layout=True)
    image = _heatmap(ax, mean, mean, names, names, digits, vmin=low)
    ax.tick_params(axis="x", labelrotation=45)
    fig.colorbar(image, ax=ax, label="cosine similarity", format=_finer(digits))
    ax.set_title(f"{title},\nmean over {n_layers} masked layers{_scale(low)}", fontsize=10)
    mean_path = os.path.join(out, "task_relation_mean.png")
    fig.savefig(mean_path, dpi=110)
    plt.close(fig)
    return [layers_path, mean_path]


def forgetting_figure(metric_files: list[str], out: str, name: str = "") -> str:
    """forgetting_matrix.png from metrics.json files (reports.matrix_cells); returns its path. Each cell
    shows the value, its 95 % interval and the strongest trivial baseline (b); a cell that is not above its
    baseline is marked with `!` and a red frame."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages, n_tasks, cells = matrix_cells(metric_files)
    grid = [[cells.get((stage, k)) for k in range(1, n_tasks + 1)] for stage in stages]
    values = np.array([[cell["value"] if cell else math.nan for cell in row] for row in grid])   # [stages, tasks]
    best = np.nanmax(np.where(np.isnan(values), -np.inf, values), axis=0)
    relative = np.where(best > 0, values / np.where(best > 0, best, 1.0), math.nan)
    metrics = [next((row[k]["metric"] for row in grid if row[k]), "") for k in range(n_tasks)]
    columns = [f"task{k + 1}\n{'MRR@5' if metric.startswith('mrr') else metric}" for k, metric in enumerate(metrics)]
    fig, ax = plt.subplots(figsize=(1.9 * n_tasks + 2.5, 0.95 * len(stages) + 2.2), constrained_layout=True)
    image = _heatmap(ax, values, relative, columns, [f"after {stage}" for stage in stages], "")
    for (i, j), cell in np.ndenumerate(np.array(grid, dtype=object)):
        if cell is None:
            continue
        text = f"{cell['value']:.3g}{'!' if cell['above'] is False else ''}"
        if cell["ci95"]:
            text += f"\n[{cell['ci95'][0]:.3g}, {cell['ci95'][1]:.3g}]"
        if cell["baseline_value"] is not None:
            text += f"\nb {cell['baseline_value']:.3g}"
        light = relative[i, j] > 0.55
        ax.text(j, i, text, ha="center", va="center", fontsize=7, color="black" if light else "white")
        if cell["above"] is False:
            ax.add_patch(plt.Rectangle((j - 0.48, i - 0.48), 0.96, 0.96, fill=False, edgecolor="red", linewidth=2))
    fig.colorbar(image, ax=ax, label="value / the task's best over stages")
    ax.set_title(f"{name}forgetting matrix: test metric of every task after each stage\n[95 % interval over test "
                 "users], b = strongest trivial baseline; ! and red frame: not above it", fontsize=9)
    path = os.path.join(out, "forgetting_matrix.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def curves_figure(history_files: list[str], out: str, name: str = "") -> str:
    """learning_curves.png from stages' history CSVs (continual/training/history.py); returns its path. Column =
    stage (file), top = mean training loss and its retention part per epoch, bottom = every validation metric
    (dots: the epochs that were a new best). A stage with several phases (CONURE) counts its epochs on."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(history_files), figsize=(3.4 * len(history_files) + 0.6, 5.6), squeeze=False,
                             constrained_layout=True)
    for column, path in enumerate(history_files):
        rows = read_history(path)
        if not rows:
            raise DataError(f"{path}: holds no epoch")
        x = np.arange(len(rows))                                     # epochs in the order trained, phases in turn
        top, bottom = axes[0, column], axes[1, column]
        for key in ("loss", "retention"):
            top.plot(x, [float(row[key]) for row in rows], marker=".", label=key)
        best = np.array([row["best"] == "1" for row in rows])
        for key in (k for k in rows[0] if k.startswith("valid_")):
            values = np.array([float(row[key]) if row.get(key) else math.nan for row in rows])
            line, = bottom.plot(x, values, label=key[len("valid_"):])
            bottom.plot(x[best], values[best], "o", color=line.get_color(), markersize=4)
        top.set_title(os.path.basename(path).replace(".history.csv", ""), fontsize=9)
        bottom.set_xlabel("epoch")
        for ax in (top, bottom):
            ax.legend(fontsize=6)
    axes[0, 0].set_ylabel("training loss (mean over steps)")
    axes[1, 0].set_ylabel("validation (dots: new best)")
    fig.suptitle(f"{name}learning curves", fontsize=10)
    path = os.path.join(out, "learning_curves.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> list[str]:
    parser = flags.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--paths", type=flags.existing_file, help="checkpoint (.t7): task-relation heatmaps of its masks")
    parser.add_argument("--matrix", nargs="+", type=flags.existing_file,
                        help="metrics.json files of one run: forgetting-matrix heatmap")
    parser.add_argument("--curves", nargs="+", type=flags.existing_file,
                        help="<savepath>.history.csv files of a chain's stages, in order: learning curves")
    parser.add_argument("--out", type=flags.output_dir, default="figures",
                        help="folder for the PNG files (default: figures)")
    parser.add_argument("--title", default="", help="prefix of every figure's title, e.g. the run's name")
    args = parser.parse_args(argv)
    if not args.paths and not args.matrix and not args.curves:
        parser.error("give --paths, --matrix and/or --curves")
    if importlib.util.find_spec("matplotlib") is None:
        raise DataError("matplotlib is not installed (pip install matplotlib)")
    os.makedirs(args.out, exist_ok=True)
    prefix = f"{args.title}: " if args.title else ""
    written = []
    if args.paths:
        written += relation_figures(load_checkpoint(args.paths), args.out, prefix)
    if args.matrix:
        written.append(forgetting_figure(args.matrix, args.out, prefix))
    if args.curves:
        written.append(curves_figure(args.curves, args.out, prefix))
    for path in written:
        print(f"wrote {path}")
    return written


if __name__ == "__main__":
    cli(main)
