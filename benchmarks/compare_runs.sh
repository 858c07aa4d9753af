#!/usr/bin/env bash
# The exact commands behind docs/RESULTS.md (issue 5): every model family on one group-level holdout split per task.
#
#   bash benchmarks/compare_runs.sh                         # all tasks
#   bash benchmarks/compare_runs.sh aria_binary deepapl     # some of them
#
# Run from the project root with the venv active. It reuses the stem-feature and handcrafted-feature caches in
# ~/.cache/leukoscope when they are there. On 2 CPU cores shared with other jobs the four tasks took about an hour.
#
# Neural models: one holdout split (not K-fold) and few epochs, to fit that hour; `--folds 5` and the training
# defaults (`--set epochs=40 patience=6`) give tighter estimates for users with more time.
set -euo pipefail
R=benchmarks/results
run() { nice -n 5 python -m leukoscope compare --no-progress "$@"; }
tasks=("$@")
[ ${#tasks[@]} -eq 0 ] && tasks=(all_idb2 aria_binary aria_subtype deepapl)

for task in "${tasks[@]}"; do
  case $task in
    all_idb2)      # ALL-IDB2: 259 single-cell crops, grouped by the ALL-IDB1 source field
      run --dataset all_idb2 --target binary --models cnn,hybrid,rf,svm,cnn_svm \
          --set epochs=12 patience=4 batch_size=32 --out runs/compare/all_idb2 --json $R/compare_all_idb2.json ;;
    aria_binary)   # aria, healthy vs ALL
      run --dataset aria --target binary --models cnn,hybrid,rf,svm,cnn_svm \
          --set epochs=4 patience=2 batch_size=32 --out runs/compare/aria_binary --json $R/compare_aria_binary.json ;;
    aria_subtype)  # aria, the 4 subtypes (Benign / Early / Pre / Pro)
      run --dataset aria --target subtype --models cnn,hybrid,rf,svm,cnn_svm \
          --set epochs=4 patience=2 batch_size=32 --out runs/compare/aria_subtype --json $R/compare_aria_subtype.json ;;
    deepapl)       # DeepAPL, 15 cell types, grouped by patient. Reduced set to fit the time budget: no hybrid, and
                   # the CNN trains only its conv head (trainable_stages 0, as the shipped cell-type model does)
      run --dataset deepapl --target cell_type --models cnn,rf,svm,cnn_svm \
          --set trainable_stages=0 aug_views=2 epochs=6 patience=3 batch_size=64 \
          --out runs/compare/deepapl_cell_type --json $R/compare_deepapl_cell_type.json ;;
    *) echo "unknown task $task (all_idb2 aria_binary aria_subtype deepapl)" >&2; exit 2 ;;
  esac
done
