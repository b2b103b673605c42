#!/usr/bin/env bash
# The GPU benchmark: 7b-mot (the published shape) with random bf16 weights
# built on the GPU, on one CUDA device:
#   1024x1024 text to image (50 schedule points), 1024x1024 edit, and
#   understanding of a 980x980 image with 64 decoded tokens,
# each against the plain path in the same run, with peak memory. Every task
# writes its JSON after every timed run, so a run cut short still reports.
# The whole script stays inside 8 minutes (timeouts below).
#
#   benchmarks/gpu.sh [OUT_DIR]                      # on a CUDA machine
#   SET=memory benchmarks/gpu.sh [OUT_DIR]           # --quant int8 / nf4 and --offload layers instead
#   CONFIG=small SIZE=256 DEVICE=cpu DTYPE=float32 STEPS=10 PYTHON=.venv/bin/python benchmarks/gpu.sh /tmp/out
#                                                    # the same script on a CPU
#
# It runs openbagel from this checkout (PYTHONPATH) with the machine's own
# Python and torch; packages missing there can come as wheels in .whl/
# (installed into /tmp/site first, see the device notes). The project's GPU
# machine (Python 3.12, torch 2.11) lacks diffusers (the autoencoder) and its importlib-metadata:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       -d .whl diffusers==0.42.1 importlib-metadata==10.2.0
set -uo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
out="${1:-$here/benchmarks/gpu-results}"
mkdir -p "$out"
PY="${PYTHON:-python3}"
CONFIG="${CONFIG:-7b-mot}" SIZE="${SIZE:-1024}" DEVICE="${DEVICE:-cuda}" DTYPE="${DTYPE:-bfloat16}" STEPS="${STEPS:-50}"
if compgen -G "$here/.whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$here"/.whl/*.whl || exit 1
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" >"$out/env.txt" || {
    echo "no torch for $PY: set PYTHON=/path/to/python (a venv with torch)"
    exit 1
}
cat "$out/env.txt"
common=(--config "$CONFIG" --device "$DEVICE" --dtype "$DTYPE" --runs 1 --size "$SIZE")
status=0
run() {  # run NAME SECONDS ARGS...: one task, its own JSON, cut at SECONDS
    local name=$1 limit=$2
    shift 2
    echo "== $name"
    timeout "$limit" "$PY" -m openbagel.cli bench "${common[@]}" "$@" --json "$out/$name.json" 2>&1 | tee "$out/$name.log"
    local rc=${PIPESTATUS[0]}
    [ "$rc" -eq 0 ] || { echo "$name: exit $rc; see $out/$name.log (and $out/$name.json for what it measured)"; status=1; }
}
if [ "${SET:-speed}" = memory ]; then
    # the memory modes against bf16 (weights on the device, working memory, time per step, latent error);
    # needs torchao and bitsandbytes wheels in .whl/ as well
    run t2i-int8 200 --task t2i --steps 10 --quant llm=int8
    run t2i-nf4-offload 250 --task t2i --steps 10 --quant llm=nf4 --offload layers
    run t2i-offload 200 --task t2i --steps 10 --offload layers
    # the planner's activation estimate against the measured peak of one denoising query
    timeout 120 "$PY" "$here/benchmarks/activation_check.py" 256 512 1024 2>&1 | tee "$out/activation.txt"
else
    run t2i 170 --task t2i --steps "$STEPS"
    run edit 170 --task edit --steps "$STEPS"
    run understand 110 --task understand --decode-tokens 64 --long-context 9000
fi
echo "results: $out"
exit $status
