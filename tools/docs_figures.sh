#!/usr/bin/env bash
# The pictures of README.md and docs/, regenerated: bash tools/docs_figures.sh (about 5 minutes on a 2-core CPU).
#   docs/figures/demo_forgetting_matrix.png, benchmark_forgetting_matrix.png: run_all.sh's demo and benchmark
#     (seed 0, the paper rule), each cell coloured by its share of the task's best score and framed in red
#     where it is not above its trivial baseline;
#   docs/figures/benchmark_task_relation_mean.png (and _layers): the cosine similarity of the tasks' masks
#     after stage 6 of the benchmark run;
#   docs/figures/paper_figure.png (and paper_figure_demo.png once docs/experiments/data/demo.csv exists): the
#     paper's comparison from the recorded results (tools/paper_table.py).
# It reruns both six-stage runs (their checkpoints go to saved_models/, as run_all.sh's always do), so the
# matrices are those of the code checked out; their digits depend on the CPU's kernels.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python}
out=docs/figures
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$out"
bash run_all.sh demo
bash run_all.sh synth
$python tools/figures.py --matrix saved_models/demo/task[1-6].metrics.json --out "$work/demo" --title "demo (seed 0)"
$python tools/figures.py --matrix saved_models/synth/task[1-6].metrics.json --paths saved_models/synth/task6.t7 \
    --out "$work/synth" --title "benchmark (seed 0)"
cp "$work/demo/forgetting_matrix.png" "$out/demo_forgetting_matrix.png"
cp "$work/synth/forgetting_matrix.png" "$out/benchmark_forgetting_matrix.png"
cp "$work/synth/task_relation_mean.png" "$out/benchmark_task_relation_mean.png"
cp "$work/synth/task_relation_layers.png" "$out/benchmark_task_relation_layers.png"
methods=teracon,recommended,finetune,lwf,ewc,sinmo,fineall,peterrec,piggyback,conure,hat,mtl
$python tools/paper_table.py --results docs/experiments/data/synth_draw*.csv --methods $methods --out "$work/paper"
cp "$work/paper/paper_figure.png" "$out/paper_figure.png"
if [ -f docs/experiments/data/demo.csv ]; then
    $python tools/paper_table.py --results docs/experiments/data/demo.csv --methods $methods --out "$work/paper_demo"
    cp "$work/paper_demo/paper_figure.png" "$out/paper_figure_demo.png"
fi
echo "figures written to $out/"
