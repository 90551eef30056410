#!/usr/bin/env bash
# The replication on the toy faces (2 CPU cores: the main rows about an hour and a half with 5 seeds,
# the secondary and triplet rows about an hour more, the sensitivity rows about two and a half hours).
# Every run writes results/replication/*.json and is skipped when its file exists, so re-running this
# command continues where the last run stopped. Tables: python report.py table replication
#
#   bash run_experiments.sh                  # calibration data, generator, main table, CKA
#   bash run_experiments.sh --sensitivity    # + alpha / guidance / steps / identities / churn rows
#                                            #   (one seed) and Repro with guidance and / or churn (5 seeds)
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python}
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}  # see benchmarks/README.md, "Contention"
"$PY" experiments.py calibration          # the toy sets (N and 2N identities) and their baselines
"$PY" experiments.py generator            # the shared generator (100 kimg, ~21 min) and its measurements
"$PY" experiments.py replication "$@"
"$PY" report.py table replication
