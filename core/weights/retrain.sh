#!/usr/bin/env bash
# Retrain the tiny tokenizer's encoder, then the generator on the tokens it makes, and
# score both: the GPU job the tokenizer's SSIM target (and with it the generator's EF)
# waits on. The decoder alone has converged on the shipped tokens (core/weights/README.md);
# the room left is on the encoder's side, and moving it changes every token.
#
#   bash core/weights/retrain.sh [OUT_DIR]     # default: $OUT if set, else runs/retrain
#   STAGES="tokenizer eval-tokenizer" bash core/weights/retrain.sh   # some stages only
#   QUICK=1 bash core/weights/retrain.sh DIR   # a smoke run of seconds per stage (tests, CPU)
#
# Stages, in order: tokenizer eval-tokenizer transformer critic eval-generator verdict. Each one
# resumes its own run and leaves OUT_DIR/done-<stage> when it finishes, so a call cut
# short by a time limit continues where it stopped when called again with the same
# OUT_DIR; a finished stage is skipped. Knobs, with their defaults (sized for about ten
# minutes of an H100/H200 in all): TOK_STEPS=4000 TOK_BATCH=64 TOK_LR=3e-4 CACHE=16384
# PERCEPTUAL=1.0 GEN_STEPS=3000 GEN_BATCH=64 GEN_LR=5e-4 GEN_INIT=shipped SUBJECTS=4000 CRITIC_STEPS=600
# CRITIC_BATCH=32 EVAL_TOKENIZER=200 EVAL_GENERATOR=100 WORKERS=(cores − 1) DEVICE=auto PYTHON=python3.
# GEN_INIT=scratch trains the transformer from scratch (the ECG encoder from the shipped one)
# instead of fine-tuning the shipped transformer, whose token embeddings learned the old codes.
# The weights ship only when the tokenizer beats the shipped one and the generator's
# figures hold in both primings: the verdict stage (core/ship_check.py) compares
# OUT_DIR/*.json with benchmarks/results/tokenizer-eval-tiny.json and docs/generator-eval-tiny.json
# and writes OUT_DIR/verdict.json; then export (docs/generator.md).
set -euo pipefail
cd "$(dirname "$0")/../.."

PY="${PYTHON:-python3}"
OUT_DIR="${1:-${OUT:-runs/retrain}}"
STAGES="${STAGES:-tokenizer eval-tokenizer transformer critic eval-generator verdict}"
DEVICE="${DEVICE:-auto}"
WORKERS="${WORKERS:-$(( $(nproc) > 1 ? $(nproc) - 1 : 1 ))}"
if [ "${QUICK:-0}" = 1 ]; then
    TOK_STEPS=3 TOK_BATCH=2 CACHE=4 GEN_STEPS=3 GEN_BATCH=2 SUBJECTS=4 CRITIC_STEPS=2 CRITIC_BATCH=2
    EVAL_TOKENIZER=2 EVAL_GENERATOR=1 WORKERS=1
fi
TOK_STEPS="${TOK_STEPS:-4000}" TOK_BATCH="${TOK_BATCH:-64}" TOK_LR="${TOK_LR:-3e-4}" CACHE="${CACHE:-16384}"
# SSIM + gradient loss at 1.0, 5x the shipped recipe: the better of the two for the encoder
# in the CPU probes (benchmarks/results/tokenizer-probes-cpu.json)
PERCEPTUAL="${PERCEPTUAL:-1.0}"
GEN_STEPS="${GEN_STEPS:-3000}" GEN_BATCH="${GEN_BATCH:-64}" GEN_LR="${GEN_LR:-5e-4}" SUBJECTS="${SUBJECTS:-4000}"
case "${GEN_INIT:-shipped}" in
    shipped) GEN_FROM=(--init core/weights/tiny) ;;
    scratch) GEN_FROM=(--ecg core/weights/tiny) ;;
    *) echo "retrain.sh: GEN_INIT must be shipped or scratch, got ${GEN_INIT}" >&2; exit 2 ;;
esac
CRITIC_STEPS="${CRITIC_STEPS:-600}" CRITIC_BATCH="${CRITIC_BATCH:-32}"
EVAL_TOKENIZER="${EVAL_TOKENIZER:-200}" EVAL_GENERATOR="${EVAL_GENERATOR:-100}"
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1
log() { echo "[retrain.sh $(date -u +%H:%M:%S)] $*"; }

# The project, importable: installed, or through a folder of links (a bare lent box).
if ! "$PY" -c "import echopulse.core.tokenizer" >/dev/null 2>&1; then
    NS="$(mktemp -d)/ns"; mkdir -p "$NS/echopulse"
    for part in core kernels stream bridges; do ln -sfn "$PWD/$part" "$NS/echopulse/$part"; done
    export PYTHONPATH="$NS${PYTHONPATH:+:$PYTHONPATH}"
fi
ep() { "$PY" -m echopulse.stream.cli "$@"; }

stage() {  # stage NAME COMMAND...: run unless done; mark done on success
    local name="$1"; shift
    case " $STAGES " in *" $name "*) ;; *) log "$name: not asked for"; return 0 ;; esac
    if [ -e "$OUT_DIR/done-$name" ]; then log "$name: done before, skipped"; return 0; fi
    log "$name: starting"
    local t0=$SECONDS
    "$@"
    touch "$OUT_DIR/done-$name"
    log "$name: done in $(( SECONDS - t0 )) s"
}

# Encoder, quantizer and decoder together, from the shipped weights (tokens change).
stage tokenizer ep train tokenizer --init core/weights/tiny --resume --steps "$TOK_STEPS" --batch "$TOK_BATCH" \
    --lr "$TOK_LR" --warmup 200 --perceptual-weight "$PERCEPTUAL" --gan-weight 0 --half --cache "$CACHE" \
    --workers "$WORKERS" --checkpoint-every 500 --device "$DEVICE" --out "$OUT_DIR/tokenizer"
# The 200 held-out clips of the shipped figures, with the speckle floor beside them.
stage eval-tokenizer ep evaluate tokenizer --checkpoint "$OUT_DIR/tokenizer" --n "$EVAL_TOKENIZER" \
    --seed 1000000 --device "$DEVICE" --out "$OUT_DIR/tokenizer-eval.json"
# The shipped transformer and ECG encoder, fine-tuned on the new tokens of the same subjects.
stage transformer ep train transformer --preset tiny --tokenizer "$OUT_DIR/tokenizer" "${GEN_FROM[@]}" \
    --resume --steps "$GEN_STEPS" --batch "$GEN_BATCH" --lr "$GEN_LR" --warmup 100 --subjects "$SUBJECTS" \
    --workers "$WORKERS" --checkpoint-every 500 --device "$DEVICE" --out "$OUT_DIR/generator"
stage critic ep train critic --generator "$OUT_DIR/generator" --out "$OUT_DIR/generator" --resume \
    --steps "$CRITIC_STEPS" --batch "$CRITIC_BATCH" --warmup 20 --subjects "$SUBJECTS" --workers "$WORKERS" \
    --device "$DEVICE"
# The 100 held-out subjects of the shipped figures.
stage eval-generator ep evaluate generator --checkpoint "$OUT_DIR/generator" --n "$EVAL_GENERATOR" \
    --seed 1000000 --device "$DEVICE" --out "$OUT_DIR/generator-eval.json"
# Side by side with the shipped weights' figures, and whether these may replace them.
stage verdict "$PY" -m echopulse.core.ship_check --tokenizer "$OUT_DIR/tokenizer-eval.json" \
    --generator "$OUT_DIR/generator-eval.json" --out "$OUT_DIR/verdict.json"
log "finished: $OUT_DIR"
