#!/usr/bin/env bash
# The CPU numbers of benchmarks/RESULTS.md, with nothing else running
# (about 20 minutes on 2 cores). Writes one JSON per command to OUT_DIR.
#
#   OPENBAGEL=.venv/bin/openbagel benchmarks/cpu.sh [OUT_DIR]     # default benchmarks/results
# (OPENBAGEL: the openbagel command, default the one on PATH)
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
out="${1:-$here/benchmarks/results}"
mkdir -p "$out"
ob="${OPENBAGEL:-openbagel}"
shapes="$here/openbagel/assets/shapes"
# the issue's target: small, text to image 256x256, 10 schedule points, the reference app's defaults
$ob bench --config small --task t2i --size 256 --steps 10 --runs 3 --json "$out/small-t2i.json"
# several seeds of one prompt in one batch
$ob bench --config small --task t2i --size 256 --steps 10 --runs 2 --batch 4 --json "$out/small-t2i-batch4.json"
$ob bench --config small --task edit --size 256 --steps 10 --runs 2 --json "$out/small-edit.json"
# decoding after a short context and after 9,000 cached tokens
$ob bench --config small --task understand --size 256 --decode-tokens 32 --long-context 9000 --runs 3 \
    --json "$out/small-understand.json"
# step caching on the trained embedded model, 50 schedule points, and ShapesEval with and without it
for i in 2 3; do
    $ob bench --model "$shapes" --task t2i --size 64 --steps 50 --runs 5 --cache --cache-interval "$i" \
        --json "$out/shapes-cache-interval$i.json"
done
$ob eval shapes --items 50 --steps 50 --json "$out/shapes-eval-steps50.json"
for i in 2 3; do
    $ob eval shapes --items 50 --steps 50 --cache --cache-interval "$i" --json "$out/shapes-eval-steps50-cache$i.json"
done
# static-shape decoding through torch.compile (compiles in the warm-up run)
$ob bench --config small --task understand --size 256 --decode-tokens 32 --long-context 9000 --runs 3 --compile \
    --json "$out/small-understand-compile.json"
# memory modes against bf16: quantized decoder layers, and offloaded layers (README "Memory")
$ob bench --config small --task t2i --size 256 --steps 10 --runs 2 --dtype bfloat16 --quant llm=int8 --offload layers \
    --json "$out/small-t2i-bf16-int8.json"
for q in nf4 fp8; do
    $ob bench --config small --task t2i --size 256 --steps 10 --runs 2 --dtype bfloat16 --quant "llm=$q" \
        --json "$out/small-t2i-bf16-$q.json"
done
