#!/usr/bin/env bash
# run_gpu.sh's checks cut to fit one short GPU lease (a deadline in seconds, default 540):
# the steps run in order of what they tell us, each under `timeout` and never past the
# deadline, and after every step all logs and CSVs are packed into $OUT/gpu_out.tgz, so a
# lease that runs out still brings back what finished. The CUDA C++ library builds in the
# background while the first (eager/graph) velocity benchmark runs.
#
#   DEADLINE=540 bash benchmarks/gpu_lease.sh        # then: tar xzf $OUT/gpu_out.tgz
#   ONLY="gpu_tests search_demo" bash benchmarks/gpu_lease.sh    # just these steps
#   SMARTGRPO_COMMIT=0123456789ab bash benchmarks/gpu_lease.sh    # on a copied tree: the
#       commit the tables and CSVs name (else `git rev-parse` of wherever the copy landed)
#
# Wheels the GPU image lacks (diffusers, and the peft this code was written against) travel in
# .whl/ (see the device tool's README); they are installed into /tmp/site when present.
set -uo pipefail
START=$(date +%s)
DEADLINE=${DEADLINE:-540}
OUT=${OUT:-bench_out}
W=${W:-/tmp/gpu_out}
mkdir -p "$OUT" "$W"
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=/tmp/inductor TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
fi

left() { echo $((DEADLINE - ($(date +%s) - START))); }
pack() { tar czf "$OUT/gpu_out.tgz" -C "$W" . 2>/dev/null; }
# step NAME SECONDS CMD...: run CMD for at most min(SECONDS, time left - 10 s), log to $W/NAME.log.
step() {
    local name=$1 limit=$2
    shift 2
    if [[ -n ${ONLY:-} && " $ONLY " != *" $name "* ]]; then
        return
    fi
    local budget=$(($(left) - 10))
    ((budget < limit)) && limit=$budget
    if ((limit < 15)); then
        echo "== $name: skipped ($(left) s left)" | tee -a "$W/steps.txt"
        return
    fi
    local t0=$(date +%s)
    timeout -k 5 "$limit" "$@" >"$W/$name.log" 2>&1
    local rc=$?
    echo "== $name: rc $rc in $(($(date +%s) - t0)) s (limit $limit s)" | tee -a "$W/steps.txt"
    pack
}

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv \
    | tee "$W/gpu.txt"
python3 -c "import torch, triton, diffusers, peft, transformers as t; print('torch', torch.__version__, \
'triton', triton.__version__, 'diffusers', diffusers.__version__, 'peft', peft.__version__, \
'transformers', t.__version__)" | tee -a "$W/gpu.txt"
git rev-parse HEAD >>"$W/gpu.txt" 2>/dev/null

# The CUDA C++ library compiles (nvcc, CPU only) while the GPU times the velocity call.
(python3 -c "from smartgrpo_fast.ops import _cpp; print(_cpp.cuda_extension())" \
    >"$W/cuda_build.log" 2>&1; echo "rc $?" >>"$W/cuda_build.log") &
BUILD=$!
step velocity_tiny 60 python3 -m smartgrpo_fast bench velocity --model tiny \
    --backends eager graph --batches 1 16 64 --out "$W"
wait $BUILD
cat "$W/cuda_build.log"
step gpu_tests 150 python3 -m pytest -m cuda tests -q -rs -p no:cacheprovider
step ops_bf16 90 python3 -m smartgrpo_fast bench ops --dtype bfloat16 --out "$W" --no-progress
step search_tiny 60 python3 -m smartgrpo_fast bench search --model tiny --batch 8 --out "$W"
step train_smart 60 python3 -m smartgrpo_fast bench train --config tiny --steps 3 --out "$W" \
    device=cuda
step train_random 50 python3 -m smartgrpo_fast bench train --config tiny --steps 3 --out "$W" \
    device=cuda noise=random
# A real training run on the GPU (its search's CUDA graph must capture: no warning).
step train_run 60 python3 -m smartgrpo_fast train --config tiny --out "$W/train_run" \
    device=cuda train.steps=3 eval.every=0
# Does GRPO learn at a batch the 2-core CPU cannot afford? On the CPU the tiny config's batch
# gradient (32 rollouts) is noise (benchmarks/grad_snr.py, RESULTS.md). Its signal and noise at
# 512 rollouts a step, a training at that batch, and the held-out evaluation of the last
# checkpoint it saved (4 images a prompt, float32 as on the CPU; base and adapter paired).
SCALE="device=cuda sample.prompts_per_step=64 sample.batch=256 train.micro_batch=256"
step grad_snr_scale 90 python3 benchmarks/grad_snr.py --batches 16 --noise random,smart \
    --out "$W/grad_snr_scale.jsonl" $SCALE
step train_scale 300 python3 -m smartgrpo_fast train --config tiny --out "$W/train_scale" \
    $SCALE train.steps=200 train.save_every=25 eval.every=50 log.progress=false
step eval_scale 120 bash -c 'ck=$(ls -d "$1"/train_scale/checkpoints/step-* | tail -n 1) &&
    echo "$ck" && python3 -m smartgrpo_fast eval --model tiny --lora "$ck" --reward tiny \
    --num-prompts 128 --prompt-seed 2000 --seed 7 --images-per-prompt 4 --dtype float32 \
    --device cuda --no-progress --out "$1/eval_scale"' _ "$W"
step velocity_sd35m 70 python3 -m smartgrpo_fast bench velocity --model sd35-medium \
    --dtype bfloat16 --backends eager graph --batches 1 8 16 --out "$W"
step search_sd35m 120 python3 -m smartgrpo_fast bench search --model sd35-medium --batch 2 \
    --k 16 --rounds 3 --repeats 2 --warmup 1 --out "$W"
step velocity_tiny_compile 80 python3 -m smartgrpo_fast bench velocity --model tiny \
    --backends eager compile-reduce-overhead --batches 1 16 64 --out "$W/compile"
step velocity_sd35m_compile 90 python3 -m smartgrpo_fast bench velocity --model sd35-medium \
    --dtype bfloat16 --backends eager compile-reduce-overhead --batches 8 --out "$W/compile"
step search_demo 60 python3 -m smartgrpo_fast search --out "$W/search_demo"
pack
# The reply carries the end of the output: each step's outcome and its last lines.
for f in "$W"/*.log; do
    echo "---- $(basename "$f")"
    tail -n 8 "$f" | cut -c1-160
done
cat "$W/steps.txt"
