#!/usr/bin/env bash
# The paper's regime on the toy faces: 256 identities x 16 images, the oracle at 512, validation and
# all-pairs test sets of their own identities (2 CPU cores: the recipe runs about an hour, the generator
# about 2 h 10 min, a Repro or condition-mixing set of 4096 images about 15 min, a ScoreMix set about
# 30 (two network calls per step), each discriminator 3-6 min). Every run writes one
# JSON file under results/regime*/ and is skipped when it exists, so re-running continues where the last
# run stopped. The generator's 200- and 700-kimg snapshots are committed, so the main table needs no
# generator training. Tables: python report.py table regime
#
#   bash run_regime.sh             # the main rows first (real, oracle, ScoreMix distant, Repro; 5 seeds),
#                                  # then all rows
#   bash run_regime.sh --generator # also re-train the generator and re-measure its snapshots
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python}
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}  # see benchmarks/README.md, "Contention"
"$PY" experiments.py regime-recipe --recipes e24 --seeds 0 1 2 --oracle
if [ "${1:-}" = "--generator" ]; then
  "$PY" experiments.py regime-generator --name cpu-amp-d700 --kimg 700 --snapshot-every 50 --measure-every 100 -- --amp
  "$PY" experiments.py regime-generator --name cpu-amp-d700 --kimg 700 --snapshot-every 50 --measure-every 700 \
    --guide-kimg 200 -- --amp
fi
# even seeds train on the first draw of the main sets, odd seeds on the second: the even seeds first
"$PY" experiments.py regime --rows real oracle real+scoremix-dist-emb real+repro --seeds 0 2 4 1 3
"$PY" experiments.py regime
"$PY" report.py table regime
