"""TTL at full scale: what each stage of a dry run cost and held, the batch sizes that fit a GPU by the same
accounting, and what a full run would take (a projection).

    python tools/scale_report.py runs/ttl_dry_run                         # print the tables
    python tools/scale_report.py runs/ttl_dry_run --write docs/performance.md   # and put them there

Reads every stage's <save>.resources.json and <save>.metrics.json under the folder (compare.py's layout:
seed0/task1, seed0/<method>/taskK), as the stages wrote them (continual/training/resources.py). --write replaces the
text between the markers `<!-- scale_report:begin -->` and `<!-- scale_report:end -->` of the file.

The accounting adds up what a stage holds while it trains: the model with its gradient and Adam's two moments
(4 × its float32 parameters), what the method holds (the frozen previous model, the expert, kept outputs), the task's
data, the first step's activations (measured: the bytes autograd saved for the largest loss term) and the wide heads'
loss buffers (at most 1 GiB of outputs and one head-sized gradient). A GPU holds the same but the data (it stays on
the host); the largest power-of-two batch whose total, with the activations scaled from the measured bytes a row and
CUDA's own 1 GiB, fits in 24 GB or 80 GB is what the last table gives.

The projection multiplies the measured seconds a step by the steps of an epoch (training rows / batch) and the
epochs of the paper's settings (stage 1: 10; stages >= 2: at least patience + 1 = 6, at most 100), and for one
H100 divides each step's floating-point work (its matrix products, counted from the shapes) by an assumed achieved
rate. It is a projection, not a measurement: tools/gpu_check.sh measures it where a GPU is lent.
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import sys

if __package__ in (None, ""):  # run as a file (python tools/…): import the suite from the repository root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from continual import flags
from continual.methods.base import WIDE_OUTPUT_BYTES
from utils import DataError, atomic_write_text, cli

BEGIN, END = "<!-- scale_report:begin -->", "<!-- scale_report:end -->"
GIB, MIB = 2**30, 2**20
CUDA_OVERHEAD = GIB                  # the CUDA context and the allocator's slack, on top of the tensors
GPUS = {"24 GB": 24e9, "80 GB": 80e9}
H100_FP32 = 67e12                    # H100 SXM's dense fp32 (no TF32) peak, FLOP/s
ACHIEVED = 0.5                       # assumed share of it the matrix products reach
H100_BANDWIDTH = 3.35e12             # bytes/s: the optimiser's pass over the parameters is bound by it
STAGE1_EPOCHS, LATER_EPOCHS = 10, (6, 100)
KERNEL = 3


def stage_records(folder: str) -> list[dict]:
    """Every stage of the run: its resources.json and metrics.json, its chain (the folder of a stage ≥ 2, "shared"
    for seedS/task1) and stage number, sorted by chain then stage."""
    records = []
    for path in sorted(glob.glob(os.path.join(folder, "**", "*.resources.json"), recursive=True)):
        stem = path[:-len(".resources.json")]
        try:
            with open(path, encoding="utf-8") as handle:
                resources = json.load(handle)
            with open(stem + ".metrics.json", encoding="utf-8") as handle:
                metrics = json.load(handle)
        except (OSError, ValueError) as error:
            raise DataError(f"{path}: cannot read a stage's record ({error})") from None
        parent = os.path.basename(os.path.dirname(stem))
        chain = "shared stage 1" if metrics["stage"] == 1 else parent
        records.append({"chain": chain, "stage": metrics["stage"], "method": metrics["method"],
                        "limits": metrics.get("limits"), "batch": resources["accounted_mib"]["batch"], **resources})
    if not records:
        raise DataError(f"{folder}: no <stage>.resources.json under it (run the dry run first)")
    return sorted(records, key=lambda r: (r["chain"] != "shared stage 1", r["chain"], r["stage"]))


def _number(value: float | None, digits: int = 1) -> str:
    return "" if value is None else f"{value:,.{digits}f}"


def measured_table(records: list[dict]) -> str:
    """One row per stage: seconds and memory as the stage measured them."""
    lines = ["| chain | stage | load (s) | models (s) | first step (s) | later step (s) | eval (s / 10k users) | "
             "checkpoint (MiB) | its write (s) | whole stage (s) | peak RSS (GiB) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        lines.append(f"| {r['chain']} | {r['stage']} | {_number(r['load_seconds'])} | {_number(r['build_seconds'])} | "
                     f"{_number(r['first_step_seconds'])} | {_number(r['step_seconds'])} | "
                     f"{_number(r['eval_seconds_per_10k_users'])} | {_number(r['checkpoint_mib'], 0)} | "
                     f"{_number(r['checkpoint_write_seconds'])} | {_number(r['stage_seconds'], 0)} | "
                     f"{r['peak_rss_mib'] / 1024:.2f} |")
    return "\n".join(lines)


def wide_loss_bytes(record: dict) -> int:
    """The wide heads' loss buffers: at most WIDE_OUTPUT_BYTES of outputs and one gradient of the task-1 head, when a
    loss reads task 1's outputs for more rows than fit (otherwise those outputs themselves)."""
    shapes = record["shapes"]
    items, channels = shapes["items"], shapes["channels"]
    rows = record["batch"] * (shapes["length"] - 1) if record["stage"] == 1 else record["batch"]
    return min(rows * items * 4, WIDE_OUTPUT_BYTES) + items * channels * 4


def accounted_bytes(record: dict, batch: int | None = None, on_gpu: bool = False) -> int:
    """What the stage holds while it trains at `batch` (default its own), by the accounting above."""
    accounted = record["accounted_mib"]
    batch = record["batch"] if batch is None else batch
    fixed = sum(value for key, value in accounted.items()
                if key not in ("batch", "activations", "activations_per_row", "task_data"))
    data = 0 if on_gpu else accounted["task_data"]
    activations = accounted["activations_per_row"] * batch
    return int((fixed + data + activations) * MIB) + wide_loss_bytes({**record, "batch": batch}) + (
        CUDA_OVERHEAD if on_gpu else 0)


def accounting_table(records: list[dict]) -> str:
    """Per stage: the accounted parts (GiB) and their sum beside the measured peak RSS."""
    lines = ["| chain | stage | model + gradient + Adam | frozen models | kept outputs | task data | activations "
             "(first step) | wide-head loss | accounted | measured peak RSS |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        a = r["accounted_mib"]
        frozen = a.get("previous model", 0) + a.get("expert", 0)
        lines.append(f"| {r['chain']} | {r['stage']} | {a['model_grad_adam'] / 1024:.2f} | {frozen / 1024:.2f} | "
                     f"{a.get('kept outputs', 0) / 1024:.2f} | {a['task_data'] / 1024:.2f} | "
                     f"{a['activations'] / 1024:.2f} | {wide_loss_bytes(r) / GIB:.2f} | "
                     f"{accounted_bytes(r) / GIB:.2f} | {r['peak_rss_mib'] / 1024:.2f} |")
    return "\n".join(lines)


def largest_batch(record: dict, capacity: float) -> int | None:
    """The largest power-of-two batch whose accounted GPU memory fits in `capacity` bytes (None: not even 1)."""
    best = None
    for power in range(0, 17):
        if accounted_bytes(record, 2**power, on_gpu=True) <= capacity:
            best = 2**power
    return best


def gpu_table(records: list[dict]) -> str:
    """Per stage: the accounted GPU memory at the stage's batch and the largest batch that fits each GPU."""
    lines = ["| chain | stage | batch | GPU memory at that batch (GB) | " + " | ".join(
        f"largest batch, {name}" for name in GPUS) + " |", "|---|---|---|---|" + "---|" * len(GPUS)]
    for r in records:
        fits = [largest_batch(r, capacity) for capacity in GPUS.values()]
        lines.append(f"| {r['chain']} | {r['stage']} | {r['batch']:,} | "
                     f"{accounted_bytes(r, on_gpu=True) / 1e9:.1f} | "
                     + " | ".join("none" if b is None else f"{b:,}" for b in fits) + " |")
    return "\n".join(lines)


def retention_rows(record: dict) -> int:
    """Rows of each earlier task the first step reads (TERACON): int(0.9 · B) under its paper rule (the ratio before
    the first batch), B // (K − 1) under --rows share, B under --rows all; none for a method without retention."""
    options, batch, earlier = record.get("options") or {}, record["batch"], record["stage"] - 1
    if record["method"] != "teracon" or not options.get("alpha"):
        return 0
    return {"share": max(1, batch // earlier), "all": batch}.get(options.get("rows"), int(0.9 * batch))


def step_flops(record: dict) -> float:
    """Floating-point work of one step, its matrix products (forward and backward: 3 × the forward): the heads' over
    every row they read, and the residual blocks' convolutions over every position. Stage K ≥ 2: the new task's
    head (and the expert's forward), and `retention_rows` rows of each earlier task through the teacher's head
    (forward) and the student's (forward and backward)."""
    s, options = record["shapes"], record.get("options") or {}
    channels, length, classes, batch = s["channels"], s["length"], s["classes"], record["batch"]
    blocks = 8
    convolutions = 2 * blocks * 2 * channels * channels * KERNEL          # per position, forward
    if record["stage"] == 1:
        rows = batch * (length - 1)
        return 3 * (2 * rows * channels * classes[0] + rows * convolutions)
    new_task = 3 * (2 * batch * channels * classes[-1] + batch * length * convolutions)
    if options.get("expert"):
        new_task += 2 * batch * channels * classes[-1] + batch * length * convolutions
    rows = retention_rows(record)
    retention = sum(4 * 2 * rows * channels * width + 4 * rows * length * convolutions for width in classes[:-1])
    return new_task + retention


def optimiser_seconds_h100(record: dict) -> float:
    """Adam's pass over the parameters, bound by memory: read parameter, gradient and two moments, write three."""
    return 7 * 4 * record["accounted_mib"]["model_grad_adam"] * MIB / 16 / H100_BANDWIDTH


def projection_table(records: list[dict]) -> str:
    """Per stage of the chains: steps an epoch, then days (CPU) or hours (H100) an epoch and for the paper's epochs."""
    lines = ["| chain | stage | steps an epoch | CPU s a step (measured) | CPU days an epoch | CPU days, paper's epochs | "
             "H100 s a step (projected) | H100 hours an epoch | H100 hours, paper's epochs |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        steps = math.ceil(r["shapes"]["train_rows"] / r["batch"])
        cpu_step = r["first_step_seconds"] if r["stage"] > 1 else (r["step_seconds"] or r["first_step_seconds"])
        low, high = (STAGE1_EPOCHS, STAGE1_EPOCHS) if r["stage"] == 1 else LATER_EPOCHS
        gpu_step = step_flops(r) / (H100_FP32 * ACHIEVED) + optimiser_seconds_h100(r)
        epochs = f"{low}" if low == high else f"{low}–{high}"

        def span(seconds: float, unit: float, digits: int) -> str:
            return (f"{seconds * low / unit:.{digits}f}" if low == high
                    else f"{seconds * low / unit:.{digits}f}–{seconds * high / unit:.{digits}f}")
        lines.append(f"| {r['chain']} | {r['stage']} | {steps:,} | {cpu_step:.1f} | {steps * cpu_step / 86400:.2f} | "
                     f"{span(steps * cpu_step, 86400, 1)} ({epochs} epochs) | {gpu_step:.3f} | "
                     f"{steps * gpu_step / 3600:.2f} | {span(steps * gpu_step, 3600, 1)} |")
    return "\n".join(lines)


def report(folder: str) -> str:
    records = stage_records(folder)
    limited = {json.dumps(r["limits"], sort_keys=True) for r in records}
    sample = records[0]["shapes"]
    header = (f"Generated by `python tools/scale_report.py {folder} --write docs/performance.md` from the dry run's "
              f"records ({len(records)} stages; limits {', '.join(sorted(limited))}; "
              f"{records[0]['threads']} threads on {records[0]['device']}; items {sample['items']:,}, length "
              f"{sample['length']}, channels {sample['channels']}).")
    return "\n\n".join([
        header,
        "**Measured, per stage** (seconds from the stage's own clock; peak RSS as `/usr/bin/time -v` reports it, "
        "from getrusage; the first step is the one at sampling ratio 0.9, so at stages ≥ 2 it holds the most "
        "retention rows; evaluation excludes loading):",
        measured_table(records),
        "**Accounted, GiB** (what the stage holds while it trains; the rest of the peak is loading's transients, the "
        "allocator's fragmentation and Python):",
        accounting_table(records),
        "**Batch sizes that fit one GPU** (the same accounting without the task data, activations scaled from the "
        "measured bytes a row, plus 1 GiB for CUDA; a projection, not a measurement):",
        gpu_table(records),
        f"**A full run, projected** (not measured): the CPU from the measured step seconds (stages ≥ 2: the "
        f"first step's, at ratio 0.9; the ratio falls as the masks separate, so this is the upper end); one H100 "
        f"from each step's matrix products at {ACHIEVED:.0%} of {H100_FP32 / 1e12:.0f} TFLOP/s fp32 plus Adam's "
        f"pass over the parameters at {H100_BANDWIDTH / 1e12:.2f} TB/s; the paper's epochs: {STAGE1_EPOCHS} at "
        f"stage 1, {LATER_EPOCHS[0]}–{LATER_EPOCHS[1]} after (early stopping with patience 5 decides):",
        projection_table(records)])


def write_between_markers(path: str, text: str) -> None:
    """Replace what lies between BEGIN and END in `path` (written atomically)."""
    with open(path, encoding="utf-8") as handle:
        document = handle.read()
    if BEGIN not in document or END not in document:
        raise DataError(f"{path}: has no {BEGIN} ... {END} section to replace")
    before, rest = document.split(BEGIN, 1)
    _, after = rest.split(END, 1)
    atomic_write_text(path, f"{before}{BEGIN}\n{text}\n{END}{after}")


def main(argv: list[str] | None = None) -> str:
    parser = flags.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=flags.existing_dir, help="the dry run's --out (compare.py's layout)")
    parser.add_argument("--write", type=flags.existing_file,
                        help="a Markdown file whose scale_report section is replaced by the tables")
    args = parser.parse_args(argv)
    text = report(args.folder)
    print(text)
    if args.write:
        write_between_markers(args.write, text)
        print(f"\nwritten into {args.write}")
    return text


if __name__ == "__main__":
    cli(main)
