#!/usr/bin/env bash
# The whole ScoreMix pipeline on the built-in toy faces, CPU-sized, ending in runs/demo/report.md.
#
#   bash run_demo.sh                       # 2 CPU cores: under 15 minutes
#   bash run_demo.sh --device cuda --scale 4 --autoguidance 1.3
#   bash run_demo.sh --gpus 8              # every stage under torchrun
#   bash run_demo.sh --smoke --out DIR     # seconds-long plumbing check (the tests run it)
#
# --autoguidance W guides sampling at weight W with a small guide generator (Karras et al. 2024, EDM2's
# light autoguidance: the cpu-guide preset, a quarter of the generator's cost per call, trained a third
# as long, in the generator stage); the CPU default samples unguided (W = 1).
#
# Each stage writes its files under --out and skips itself when they are complete, so re-running
# the command after an interruption resumes (the training scripts resume from their checkpoints).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python}  # the interpreter every stage runs with
# OpenMP threads that wait passively instead of spinning: the same speed alone, 1.7x faster beside
# another busy process on a small machine (benchmarks/README.md, "Contention")
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}

OUT=runs/demo; DEVICE=""; GPUS=1; SCALE=1; SMOKE=0; GUIDANCE=1
while [ $# -gt 0 ]; do
    case "$1" in
        --out) OUT=$2; shift 2 ;;
        --device) DEVICE=$2; shift 2 ;;
        --gpus) GPUS=$2; shift 2 ;;
        --scale) SCALE=$2; shift 2 ;;
        --autoguidance) GUIDANCE=$2; shift 2 ;;
        --smoke) SMOKE=1; shift ;;
        -h|--help) sed -n 2,14p "$0"; exit 0 ;;
        *) echo "error: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done
"$PY" -c "import torch, numpy, PIL, tqdm" 2>/dev/null || "$PY" -m pip install -q -r requirements.txt

# CPU-sized settings; --scale multiplies the generator's training and the synthetic images
GEN_KIMG=$("$PY" -c "print(36 * $SCALE)")
PER_PAIR=$("$PY" -c "print(int(8 * $SCALE))")
REPRO_PER_CLASS=4
STEPS=16; TOY=(); FR=(); GEN=(); GUIDE_GEN=(); GRID=()
if [ "$SMOKE" = 1 ]; then  # tiny everything: checks the plumbing, not the method
    GEN_KIMG=0.128; PER_PAIR=2; REPRO_PER_CLASS=2; STEPS=4
    TOY=(--identities 6 --per-identity 6 --test-identities 12 --pairs 40 --heldout 2)
    FR=(--steps 4); GEN=(--channels 8 --grid-steps 4); GUIDE_GEN=(--channels 4 --grid-steps 4); GRID=(--grid-seeds 2)
fi
# autoguidance: a small guide (cpu-guide preset) trained a third as long as the generator
GUIDED=$("$PY" -c "print(int($GUIDANCE != 1))")
GUIDE_KIMG=$("$PY" -c "print($GEN_KIMG / 3)")
DATA=$OUT/data
DEV=${DEVICE:+--device $DEVICE}
mkdir -p "$OUT"
TIMES=$OUT/stage_times.tsv

run() {  # one process, or torchrun over --gpus processes
    if [ "$GPUS" -gt 1 ]; then "$PY" -m torch.distributed.run --standalone --nproc_per_node="$GPUS" "$@"
    else "$PY" "$@"; fi
}
stage() {  # stage NAME COMMAND...: run it unless done before; record its wall time
    local name=$1; shift
    if grep -q "^$name	" "$TIMES" 2>/dev/null; then echo "== $name: done before, skipped"; return; fi
    echo "== $name"
    local t0=$SECONDS
    "$@"
    printf '%s\t%s\n' "$name" $((SECONDS - t0)) >> "$TIMES"
}
BINS="$DATA/bench/toy_lfw.bin $DATA/bench/toy_cfp_fp.bin $DATA/bench/toy_agedb.bin $DATA/bench/toy_calfw.bin $DATA/bench/toy_cplfw.bin"

stage "toy faces" "$PY" toy_faces.py --out "$DATA" "${TOY[@]}"
stage "baseline discriminator" run train_arcface.py --data "$DATA/train" --out "$OUT/baseline" "${FR[@]}" $DEV
generators() {  # the generator, and with --autoguidance its small guide
    run train_diffusion.py --data "$DATA/train" --heldout "$DATA/heldout" --out "$OUT/generator" \
        --duration "$GEN_KIMG" --snapshot-every "$GEN_KIMG" "${GEN[@]}" $DEV
    if [ "$GUIDED" = 1 ]; then
        run train_diffusion.py --preset cpu-guide --data "$DATA/train" --heldout "$DATA/heldout" \
            --out "$OUT/guide" --duration "$GUIDE_KIMG" --snapshot-every "$GUIDE_KIMG" "${GUIDE_GEN[@]}" $DEV
    fi
}
stage "generator" generators
NET=$(ls "$OUT"/generator/network-snapshot-*.pt | tail -1)
GUIDE=()  # autoguidance: the small guide
if [ "$GUIDED" = 1 ]; then GUIDE=(--guide "$(ls "$OUT"/guide/network-snapshot-*.pt | tail -1)" --guidance "$GUIDANCE"); fi
stage "distant pairs" "$PY" select_pairs.py --fr "$OUT/baseline/model.pt" --data "$DATA/train" \
    --out "$OUT/pairs.csv" --strategy dist $DEV
stage "ScoreMix sampling" run scoremix_sample.py --net "$NET" "${GUIDE[@]}" --pairs "$OUT/pairs.csv" \
    --per-pair "$PER_PAIR" --steps $STEPS --out "$OUT/scoremix" $DEV
stage "Repro sampling (consistency check)" run scoremix_sample.py --mode repro --net "$NET" "${GUIDE[@]}" \
    --per-pair "$REPRO_PER_CLASS" --steps $STEPS --out "$OUT/repro" $DEV
stage "ScoreMix discriminator" run train_arcface.py --data "$DATA/train" "$OUT/scoremix" --out "$OUT/scoremix_fr" \
    "${FR[@]}" $DEV
stage "figures" "$PY" scoremix_sample.py --net "$NET" "${GUIDE[@]}" --steps $STEPS "${GRID[@]}" \
    --grid "$OUT/alpha_beta.png" --classes $(sed -n 2p "$OUT/pairs.csv" | cut -d, -f1,2 | tr , ' ') $DEV
stage "evaluation" "$PY" evaluate.py --model "$OUT/baseline/model.pt" "$OUT/scoremix_fr/model.pt" \
    --names "Baseline (real only)" "ScoreMix (dist pairs)" --bin $BINS --out "$OUT/eval.json" $DEV
stage "consistency" "$PY" evaluate.py --consistency "$OUT/repro" "$DATA/heldout" "$OUT/scoremix" \
    --data "$DATA/train" --model "$OUT/baseline/model.pt" --out "$OUT/consistency.json" $DEV
stage "CKA" "$PY" cka.py --generator "$NET" --fr "$OUT/baseline/model.pt" --data "$DATA/train" --out "$OUT/cka.json"
"$PY" report.py demo "$OUT" --settings "generator $GEN_KIMG kimg; $PER_PAIR images per ScoreMix \
identity; $STEPS Heun steps; autoguidance weight $GUIDANCE${GUIDE[1]:+ (guide ${GUIDE[1]##*/})}; device ${DEVICE:-auto}; $GPUS process(es)"
