"""Step-for-step check against a checkout of the authors' code (Sein-Kim/TERACON_original or Sein-Kim/TERACON).

    python tools/replay_check.py --authors /path/to/TERACON_original [--steps 50] [--batch 32] [--work DIR]
    python tools/replay_check.py --authors /path/to/TERACON --variant revised

It makes TTL-shaped synthetic data (tools/synth.py, lines left-padded with item 0), runs the authors' stage 1 for
one epoch, then their stage 2 and stage 3 for --steps optimiser steps each, and this suite's stages 2 and
3 (`--variant V --streams authors`) from the same checkpoints: the authors' stage-1 file, then the
authors' stage-2 file. It prints the loss of every step of both codes and their relative difference,
then the largest parameter difference after the last step, and exits 1 when a loss differs by more than
--loss_tol (relative) or a parameter by more than --param_tol (absolute).

Nothing of the authors' code is part of this repository. Their checkout is copied to --work and changed
in the few places CODES lists, so that it runs on a CPU and on today's torch (and the original's stage-3
script on data other than TTL): the original's missing package `TERACON_Past`, the device (`cpu`; the
revision's `get_device()` is −1 on a CPU), `.view` of a non-contiguous tensor in train_task1.py, and the
original's TTL head sizes in train_teracon_t3.py. Their losses and parameters are read by wrapping torch's
CrossEntropyLoss, Tensor.backward and Adam.step in the process that runs their script; their code is not
otherwise touched. Every run is single-threaded.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile

import numpy as np

if __package__ in (None, ""):  # run as a file (python tools/…): import the suite from the repository root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from continual import flags  # noqa: E402  (after the path is set)

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)  # the repository root: where this suite's stages run
VIEW = (r"\.view\(\[-1\]\)", ".reshape([-1])")           # a strided copy cannot be viewed on torch 2.x
CODES = {  # per code: its repository, files, the only changes made to the copy (file → [(pattern, replacement)]),
           # its stage-1 and stage-K command lines and the learning rates of stages 2 and 3
    "original": {
        "repository": "Sein-Kim/TERACON_original",
        "patches": {"train_task1.py": [VIEW],
                    "train_teracon_t2.py": [],
                    "train_teracon_t3.py": [(r"\b645974\b", "len(items)"),
                                            (r"\b17880\b", "torch.load(args.paths, map_location='cpu')['net']"
                                                           "['final_layer.weight'].shape[0]")],
                    "data_loader.py": [], "utils.py": [], "load_model.py": [], "teracon.py": [],
                    "generator_hat_other.py": []},
        "every_script": [(r"import TERACON_Past\.teracon as", "import teracon as"),          # not in their repository
                         (r"\n(\s*)args\.gpu_num_ = args\.gpu_num\n", r"\n\1args.gpu_num_ = args.gpu_num = 'cpu'\n")],
        "stage1": ["train_task1.py"],
        "stage": lambda k: [f"train_teracon_t{k}.py"],
        "lr": {2: 1e-4, 3: 1e-4},
    },
    "revised": {
        "repository": "Sein-Kim/TERACON",
        "patches": {"train_task1.py": [VIEW], "train_teracon.py": [],
                    "teracon.py": [(r"t\.get_device\(\)", "t.device")],                   # −1 on the CPU
                    "generator_hat_other.py": [(r"t\.get_device\(\)", "t.device")],
                    "data_loader.py": [], "utils.py": []},
        "every_script": [(r"\n(\s*)if args\.gpu_num == 'cpu':", r"\n\1args.gpu_num = 'cpu'\n\1if args.gpu_num == 'cpu':")],
        "stage1": ["train_task1.py", "--seed", "0"],
        "stage": lambda k: ["train_teracon.py", "--n_tasks", str(k), "--seed", "0"],
        "lr": {2: 1e-3, 3: 1e-4},                                                           # ttl_train.sh
    },
}


def single_thread() -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch
    torch.set_num_threads(1)


def patched_copy(authors: str, target: str, variant: str) -> None:
    """Copy the checkout's files the run needs to `target`, with the code's patches applied (each must match)."""
    code = CODES[variant]
    os.makedirs(target, exist_ok=True)
    for name, patches in code["patches"].items():
        source = os.path.join(authors, name)
        if not os.path.isfile(source):
            raise SystemExit(f"{source}: not found; --authors must be a checkout of {code['repository']} "
                             f"(--variant {variant})")
        with open(source) as handle:
            text = handle.read()
        for pattern, replacement in patches + (code["every_script"] if name.startswith("train_") else []):
            text, count = re.subn(pattern, replacement, text)
            if count == 0 and "TERACON_Past" not in pattern:   # t2/t3 import it; train_task1.py does not
                raise SystemExit(f"{source}: does not contain {pattern!r}; not the code this check was written for")
        with open(os.path.join(target, name), "w") as handle:
            handle.write(text)


def make_data(work: str, later_users: int) -> dict[int, str]:
    """Task 1 for 12,000 users (the authors' stage 1 needs more than 512 validation users) and tasks 2 and 3
    for `later_users` users, every line keeping its last 5..30 items, left-padded with item 0 as TTL's files."""
    from continual.generators import synth
    folder = os.path.join(work, f"data_{later_users}")
    paths = {k: os.path.join(folder, f"task{k}.csv") for k in (1, 2, 3)}
    if all(os.path.isfile(path) for path in paths.values()):
        return paths
    for users, items, name in ((12000, 300, "big"), (later_users, 200, "later")):
        synth.main(["--out", os.path.join(folder, name), "--users", str(users), "--items", str(items),
                    "--length", "30"])
    for k, name in ((1, "big"), (2, "later"), (3, "later")):
        with open(os.path.join(folder, name, f"task{k}.csv")) as handle:
            lines = [line.rstrip("\n") for line in handle if line.strip()]
        keep = np.random.default_rng(0).integers(5, 31, size=len(lines))
        out = []
        for line, m in zip(lines, keep):
            source, _, targets = line.partition(",,")
            items = source.split(",")
            padded = ",".join(["0"] * (len(items) - m) + items[len(items) - m:])
            out.append(padded + (",," + targets if targets else ""))
        with open(paths[k], "w") as handle:
            handle.write("\n".join(out) + "\n")  # the authors' loaders cut every line's last character
    return paths


# ------------------------------------------------------------------ runners (each in its own process)

def run_authors(code: str, script: str, argv: list[str], steps: int, out: str) -> None:
    """Run one of the authors' scripts; record CE and the total loss of each step; after `steps` steps
    (0: none) write them and the trained model's state to `out`.json / `out`.pt and stop."""
    single_thread()
    import runpy

    import torch
    import torch.nn as nn
    records: list[dict] = []
    current: dict = {}
    cross_entropy, backward, adam_step = nn.CrossEntropyLoss.forward, torch.Tensor.backward, torch.optim.Adam.step
    mse = nn.MSELoss.forward

    def rows(self, student, teacher):
        current.setdefault("rows", []).append(int(student.shape[0]))
        return mse(self, student, teacher)

    def ce(self, *inputs):
        value = cross_entropy(self, *inputs)
        current["ce"] = float(value.detach())
        return value

    def total(self, *args, **kwargs):
        if self.dim() == 0:
            current["total"] = float(self.detach())
        return backward(self, *args, **kwargs)

    def step(self, *args, **kwargs):
        result = adam_step(self, *args, **kwargs)
        records.append(dict(current))
        current.clear()
        if len(records) == steps:
            params = [p for group in self.param_groups for p in group["params"]]
            model = next(m for m in gc.get_objects() if isinstance(m, nn.Module)
                         and sum(1 for _ in m.parameters()) == len(params)
                         and all(a is b for a, b in zip(m.parameters(), params)))
            torch.save({"net": model.state_dict()}, out + ".pt")
            with open(out + ".json", "w") as handle:
                json.dump(records, handle)
            sys.stdout.flush()
            os._exit(0)
        return result

    nn.CrossEntropyLoss.forward, torch.Tensor.backward, torch.optim.Adam.step, nn.MSELoss.forward = ce, total, step, rows
    os.chdir(code)
    sys.path.insert(0, code)
    sys.argv = [script] + argv
    runpy.run_path(script, run_name="__main__")


def run_ours(argv: list[str], steps: int, out: str, fused: bool = False) -> None:
    """This suite's stage from `argv`; the same records and state as run_authors, after `steps` steps. With
    `fused`, Adam's fused kernel replaces its loop: the same arithmetic in another order (the yardstick)."""
    single_thread()
    import torch

    from continual.methods import teracon
    from continual.training import loop
    if fused:
        per_parameter = torch.optim.Adam

        class FusedAdam(per_parameter):
            def __init__(self, params, lr, foreach=None):
                super().__init__(params, lr=lr, fused=True)
        torch.optim.Adam = FusedAdam
    records: list[dict] = []
    train_step, retention_plan = loop.train_step, teracon.retention_plan
    counts: list[int] = []

    def plan(*args, **kwargs):
        result = retention_plan(*args, **kwargs)
        counts[:] = [count for count, _ in result]
        return result

    def step(model, *args, **kwargs):
        loss, kept, stepped = train_step(model, *args, **kwargs)
        records.append({"ce": float(loss - kept), "total": float(loss), "retention": float(kept), "rows": list(counts)})
        if len(records) == steps:
            torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, out + ".pt")
            with open(out + ".json", "w") as handle:
                json.dump(records, handle)
            sys.stdout.flush()
            os._exit(0)
        return loss, kept, stepped

    loop.train_step, teracon.retention_plan = step, plan
    loop.main(argv=argv)
    raise SystemExit(f"stage ended after {len(records)} steps, before {steps}: give more --epochs")


# ------------------------------------------------------------------ the comparison

def compare(authors_out: str, ours_out: str, loss_tol: float, param_tol: float, label: str) -> bool:
    import torch

    from continual.original_checkpoints import convert_original
    with open(authors_out + ".json") as handle:
        theirs = json.load(handle)
    with open(ours_out + ".json") as handle:
        ours = json.load(handle)
    print(f"\n{label}: loss per step (authors | ours | relative difference); 'empty' = no retention rows "
          f"(the authors' loss is then NaN, ours has no retention term)")
    print(f"{'step':>4} {'CE authors':>12} {'CE ours':>12} {'rel':>9} {'total authors':>14} {'total ours':>12} {'rel':>9}"
          f"  retention rows per earlier task (authors | ours)")
    worst, row_mismatches = 0.0, 0
    for number, (a, b) in enumerate(zip(theirs, ours), 1):
        ce_rel = abs(a["ce"] - b["ce"]) / max(abs(a["ce"]), 1e-12)
        if math.isnan(a["total"]):
            total_rel = 0.0 if b["retention"] == 0 else math.inf
            shown = "empty" if b["retention"] == 0 else "MISMATCH"
        else:
            total_rel = abs(a["total"] - b["total"]) / max(abs(a["total"]), 1e-12)
            shown = f"{total_rel:.1e}"
        worst = max(worst, ce_rel, total_rel)
        same_rows = sorted(a.get("rows", [])) == sorted(b["rows"])   # the original's t3 computes task 2's MSE first
        row_mismatches += not same_rows
        print(f"{number:>4} {a['ce']:>12.6f} {b['ce']:>12.6f} {ce_rel:>9.1e} {a['total']:>14.6f} {b['total']:>12.6f} "
              f"{shown:>9}  {sorted(a.get('rows', []))} | {sorted(b['rows'])}{'' if same_rows else '  MISMATCH'}")
    converted = convert_original({"net": torch.load(authors_out + ".pt", weights_only=True)["net"]}, authors_out)
    state = torch.load(ours_out + ".pt", weights_only=True)
    gaps = {key: float((state[key] - value).abs().max() / max(float(value.abs().max()), 1e-12))
            for key, value in converted["model_state"].items()}
    key = max(gaps, key=gaps.get)
    largest_abs = largest_difference(converted["model_state"], state)
    ok = worst <= loss_tol and largest_abs <= param_tol and len(theirs) == len(ours) and not row_mismatches
    print(f"{label}: {len(ours)} steps, retention row counts equal at {len(ours) - row_mismatches}; "
          f"largest relative loss difference {worst:.1e} (tolerance {loss_tol:g}); "
          f"parameters after the last step: largest difference {largest_abs:.1e} (tolerance {param_tol:g}; "
          f"relative to its tensor's largest value at most {gaps[key]:.1e}, in {key}): {'AGREE' if ok else 'DIFFER'}")
    return ok


def largest_difference(first: dict, second: dict) -> float:
    """The largest absolute difference of any parameter between two state dicts of the same model."""
    return max(float((second[key] - value).abs().max()) for key, value in first.items())


def yardstick(loop_out: str, fused_out: str, label: str) -> None:
    """How far rounding alone moves this run: this suite against itself with the fused Adam kernel."""
    import torch
    with open(loop_out + ".json") as handle:
        loop = json.load(handle)
    with open(fused_out + ".json") as handle:
        fused = json.load(handle)
    loss = max(max(abs(a["ce"] - b["ce"]) / max(abs(a["ce"]), 1e-12),
                   abs(a["total"] - b["total"]) / max(abs(a["total"]), 1e-12)) for a, b in zip(loop, fused))
    first, second = torch.load(loop_out + ".pt", weights_only=True), torch.load(fused_out + ".pt", weights_only=True)
    params = largest_difference(first, second)
    print(f"{label} yardstick: this suite against itself with Adam's fused kernel instead of its loop (the same "
          f"arithmetic in another order): largest relative loss difference {loss:.1e}, parameters {params:.1e}")


def main(argv: list[str] | None = None) -> int:
    parser = flags.Parser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--authors", required=True,
                        help="a checkout of Sein-Kim/TERACON_original (--variant original) or Sein-Kim/TERACON (revised)")
    parser.add_argument("--variant", choices=sorted(CODES), default="original", help="which authors' code --authors is")
    parser.add_argument("--work", help="working folder (default: a new temporary folder)")
    parser.add_argument("--steps", type=flags.positive_int, default=50, help="training steps compared")
    parser.add_argument("--batch", type=flags.positive_int, default=32, help="users a step")
    parser.add_argument("--later_users", type=flags.positive_int, default=600,
                        help="users of tasks 2 and 3 (12000 lets --batch 1024 draw retention rows at every step)")
    parser.add_argument("--loss_tol", type=flags.positive_float, default=1e-4,
                        help="largest relative difference of a step's loss counted as equal")
    parser.add_argument("--param_tol", type=flags.positive_float, default=1e-3,
                        help="largest absolute difference of the parameters after the last step counted as equal")
    parser.add_argument("--_authors", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    parser.add_argument("--_ours", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    parser.add_argument("--_fused", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--no_yardstick", action="store_true",
                        help="skip the second run of this suite with Adam's fused kernel (the rounding yardstick)")
    args = parser.parse_args(argv)
    if args._authors:
        code, script, out, *rest = args._authors
        run_authors(code, script, rest, args.steps, out)
        return 0
    if args._ours:
        out, *rest = args._ours
        run_ours(rest, args.steps, out, args._fused)
        return 0

    work = os.path.abspath(args.work or tempfile.mkdtemp(prefix="replay_check_"))
    code = os.path.join(work, f"authors_code_{args.variant}")
    shutil.rmtree(code, ignore_errors=True)
    patched_copy(os.path.abspath(args.authors), code, args.variant)
    data = make_data(work, args.later_users)
    runs = os.path.join(work, f"runs_{args.variant}")
    os.makedirs(runs, exist_ok=True)
    index, task1 = os.path.join(runs, "index.csv"), os.path.join(runs, "task1")

    def child(*extra: str, steps: int) -> None:
        command = [sys.executable, os.path.join(HERE, "replay_check.py"), "--authors", args.authors,
                   "--variant", args.variant, "--steps", str(steps), *extra]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
        if result.returncode != 0:
            raise SystemExit(f"{' '.join(command[2:8])}… failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")

    if not os.path.isfile(task1 + ".t7"):
        print("the authors' stage 1, one epoch (about a minute and a half) …", flush=True)
        script, *stage_flags = CODES[args.variant]["stage1"]
        child("--_authors", code, script, os.path.join(runs, "a_task1"), *stage_flags, "--epochs", "1", "--lr", "0.001",
              "--datapath", data[1], "--datapath_index", index, "--savepath", task1, steps=0)
    ok = True
    start = task1 + ".t7"
    for stage in (2, 3):
        name = f"t{stage}_b{args.batch}_u{args.later_users}"
        authors_out, ours_out = os.path.join(runs, f"authors_{name}"), os.path.join(runs, f"ours_{name}")
        common = ["--batch", str(args.batch), "--epochs", "100", "--datapath", data[stage], "--datapath_index", index,
                  "--paths", start, "--lr", str(CODES[args.variant]["lr"][stage])]
        print(f"stage {stage}: the authors' code, then this suite, {args.steps} steps each …", flush=True)
        script, *stage_flags = CODES[args.variant]["stage"](stage)
        child("--_authors", code, script, authors_out, *stage_flags, *common,
              "--savepath", os.path.join(runs, f"a_{name}"), steps=args.steps)
        child("--_ours", ours_out, "--stage", str(stage), "--variant", args.variant, "--streams", "authors", *common,
              "--savepath", os.path.join(runs, f"o_{name}"), steps=args.steps)
        ok &= compare(authors_out, ours_out, args.loss_tol, args.param_tol, f"stage {stage}")
        if not args.no_yardstick:
            child("--_fused", "--_ours", ours_out + "_fused", "--stage", str(stage), "--variant", args.variant,
                  "--streams", "authors", *common, "--savepath", os.path.join(runs, f"f_{name}"), steps=args.steps)
            yardstick(ours_out, ours_out + "_fused", f"stage {stage}")
        start = os.path.join(runs, f"a_{name}.t7")  # the authors' stage-2 checkpoint, written after epoch 0
        if not os.path.isfile(start):
            raise SystemExit(f"{start}: the authors' stage 2 wrote no checkpoint in {args.steps} steps (it writes one "
                             "after its first epoch): give more --steps or fewer --later_users")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
