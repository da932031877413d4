#!/usr/bin/env bash
# Run all six TERACON stages in order and print the forgetting matrix.
#   bash run_all.sh demo        # MovieLens-100K from RecBole's wheel, small settings, CPU, ~2 minutes
#   bash run_all.sh demo_time   # the same ratings with time passing between tasks, under --protocol time
#   bash run_all.sh synth       # the controlled benchmark (tools/synth.py), small settings, CPU, ~3 minutes
#   bash run_all.sh synth_time  # the benchmark with items arriving at each stage, under --protocol time
#                               # (`bash run_all.sh synth_time --method ditto` runs DITTO's chain)
#   bash run_all.sh ttl         # Data/TTL/ (download first), the paper's settings
#   bash run_all.sh movielens   # Data/movielens/ (python prepare_data.py --source <ml-folder> --out Data/movielens)
# Extra arguments are passed to every stage, e.g. `bash run_all.sh demo --device cpu --seed 3`.
# Every stage runs again and replaces what an earlier run wrote in saved_models/<dataset> (--overwrite): the six
# stages are one run, so none is kept from another.
set -euo pipefail
cd "$(dirname "$0")"
dataset="${1:-demo}"
shift || true
python=${PYTHON:-python}

# The pinned versions of requirements.txt (the README's figures were measured with them; other numpy or
# pandas versions printed a different demo matrix): installed unless every pin is already met.
if ! $python - 2>/dev/null <<'PINS'
import re, sys
from importlib.metadata import version
pins = [line.split("==") for line in open("requirements.txt") if re.match(r"[A-Za-z]", line)]
sys.exit(any(version(name.strip()).split("+")[0] != wanted.strip() for name, wanted in pins))
PINS
then
    echo "installing the pinned requirements (torch's CPU build is torch==2.13.0)"
    $python -m pip install --quiet torch==2.13.0 || true
    $python -m pip install --quiet -r requirements.txt
fi

case "$dataset" in
    demo|demo_time)
        $python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('recbole') is None)" \
            || $python -m pip install --quiet --no-deps recbole==1.2.1
        # Regenerated each time (deterministic, seconds), so the files always match these settings; the preparation's
        # flags are continual/datasets.py's (demo_time: six periods of the timeline, with re-test files).
        prepare_flags=$($python -m continual.datasets "$dataset" generator)
        read -ra prepare <<< "$prepare_flags"
        $python prepare_data.py --source recbole --out "Data/$dataset" "${prepare[@]}"
        ;;
    synth)
        # The controlled benchmark (tools/synth.py; regenerated each time: deterministic, a few seconds).
        $python tools/synth.py --out Data/synth
        ;;
    synth_time)
        # The benchmark with items arriving at each later stage, and its re-test files (deterministic, seconds); the
        # generator's flags are continual/datasets.py's, which compare.py reads too.
        generator_flags=$($python -m continual.datasets synth_time generator)
        read -ra generator <<< "$generator_flags"
        $python tools/synth.py --out Data/synth_time "${generator[@]}"
        ;;
    ttl|movielens)
        ;;
    *)
        echo "usage: bash run_all.sh demo|demo_time|synth|synth_time|ttl|movielens [flags for every stage]" >&2
        exit 2
        ;;
esac

# Each stage's flags for this dataset (demo and synth: small-data settings, explained beside them in
# continual/datasets.py's SMALL_RUN_FLAGS, which compare.py reads too; ttl and movielens: none, the paper's).
# (assigned first, so that `set -e` stops the run if the lookup fails rather than train with no flags)
stage1_flags=$($python -m continual.datasets "$dataset" 1)
later_flags=$($python -m continual.datasets "$dataset" 2)
read -ra stage1 <<< "$stage1_flags"
read -ra later <<< "$later_flags"

out="saved_models/$dataset"
mkdir -p "$out"
$python train_task1.py --dataset "$dataset" --overwrite ${stage1[@]+"${stage1[@]}"} "$@"
for k in 2 3 4 5 6; do
    $python "train_teracon_t$k.py" --dataset "$dataset" --overwrite ${later[@]+"${later[@]}"} "$@"
done
$python evaluate.py --matrix "$out"/task[1-6].metrics.json --csv "$out/forgetting_matrix.csv"
echo "forgetting matrix saved to $out/forgetting_matrix.csv"
