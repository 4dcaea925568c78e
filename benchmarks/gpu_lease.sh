#!/usr/bin/env bash
# run_gpu.sh's checks cut to fit one short GPU lease (a deadline in seconds, default 540):
# the steps run in order of what they tell us, each under `timeout` and never past the
# deadline, and after every step all logs and CSVs are packed into $OUT/gpu_out.tgz, so a
# lease that runs out still brings back what finished. The CUDA C++ library builds in the
# background while the CUDA tests run. First the open issues' checks (the ops' kernel-only
# times, the search and GRPO steps at SD3.5-medium size), then the earlier ones if time is left.
#
#   DEADLINE=540 bash benchmarks/gpu_lease.sh        # then: tar xzf $OUT/gpu_out.tgz
#   A 15-minute lease holds about one full call (DEADLINE=575: the CUDA tests, the ops, the
#   random and searched SD3.5-medium steps) and a shorter second one with ONLY= naming the
#   next steps in this file's order (the float8 search, cem_update's launch variants, ...).
#   ONLY="gpu_tests search_demo" bash benchmarks/gpu_lease.sh    # just these steps
#   SMARTGRPO_COMMIT=0123456789ab bash benchmarks/gpu_lease.sh    # on a copied tree: the
#       commit the tables and CSVs name (else `git rev-parse` of wherever the copy landed)
#
# Wheels the GPU image lacks (diffusers, the peft this code was written against, and torchao
# for the float8 search forwards) travel in .whl/ (see the device tool's README); they are
# installed into /tmp/site when present. torchao==0.18.0 is the release built for the image's
# torch 2.11 (0.17 too; 0.16 is 2.10's; the fp8 extra: torchao>=0.17,<0.19). With it diffusers
# 0.42 logs "Unable to import `torchao` Tensor objects": diffusers' own stale import paths, about
# loading torchao checkpoints, harmless here.
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
python3 -c "from smartgrpo_fast.models.fp8 import versions; print(versions())" | tee -a "$W/gpu.txt"
git rev-parse HEAD >>"$W/gpu.txt" 2>/dev/null

# The CUDA C++ library compiles (nvcc, CPU only) while the GPU times the velocity call.
(python3 -c "from smartgrpo_fast.ops import _cpp; print(_cpp.cuda_extension())" \
    >"$W/cuda_build.log" 2>&1; echo "rc $?" >>"$W/cuda_build.log") &
BUILD=$!
# Correct first: the CUDA tests (the captured round with a preview decoder and a compiled
# forward, the fused ops' capture with every argument form, the kernels against the reference).
step gpu_tests 120 python3 -m pytest -m cuda tests -q -rs -p no:cacheprovider
wait $BUILD
cat "$W/cuda_build.log"
# Issue 22: every op eager (what a Python caller pays) and kernel-only (100 calls in one CUDA
# graph), and the host column (µs a call on a tiny latent against one torch.add).
step ops_bf16 90 python3 -m smartgrpo_fast bench ops --dtype bfloat16 --out "$W" --no-progress
# Issue 24's question first: a searched full-size GRPO step against a random one (goal <=
# 1.3x at K*N = 16), both with the compiled transformer (random SD3.5-medium + a random
# full-size ImageReward), the search with the preview decoder, a bfloat16 copy of the reward
# and the reused velocity; each prints its split, model rows a rollout and logp_diff_max.
# (bench train's overrides go last, after --out: argparse takes KEY=VALUE words in one run.)
SD35="--config sd35-medium --steps 1 --warmup 1 --no-progress"
SD35_RANDOM="model.name=random:sd35-medium reward_args.random=true train.memory_limit_gib=80 \
    model.graph=compile-reduce-overhead"
step train_sd35m_random 150 python3 -m smartgrpo_fast bench train $SD35 --out "$W/sd35m_random" \
    $SD35_RANDOM noise=random
step train_sd35m_smart_fast 210 python3 -m smartgrpo_fast bench train $SD35 \
    --out "$W/sd35m_smart_fast" $SD35_RANDOM model.preview_decoder=random \
    search_reward_args.dtype=bfloat16
# Issue 21, its one missing figure: float8 search forwards at SD3.5-medium size (random
# weights, 512 px), first without compile (the float8 copy's eager forward inside the captured
# round) against the same round in bf16; one warm-up and one timed search each (about a
# second a search in bf16). bench search logs each part with its time (the first line names
# torch and torchao), so a step cut short says where it stopped.
step search_sd35m_fp8 150 python3 -m smartgrpo_fast bench search --model sd35-medium \
    --batch 2 --k 16 --rounds 3 --top 4 --repeats 1 --warmup 1 --providers graph+preview \
    graph+preview+fp8 --out "$W/search_sd35m_fp8"
# Issue 22: cem_update's Triton kernel at the launches sass_counts.py --sweep weighs (the
# shipped one, the 158-register one it replaced, a maxnreg cap, 1/2/8 elites a step, smaller
# blocks), kernel-only, at bench ops' 16M and 64M and at two search batches.
step cem_variants 60 python3 benchmarks/cem_launch_variants.py --out "$W/cem_variants"
# Issue 24, where the searched step's time goes: the search as a step pays it (B 4, K 8, N 2,
# T 2, candidates decoded at 224 px and scored by a full-size random ImageReward in bfloat16,
# as search_reward_args.dtype=bfloat16 runs it; the stage split says what a round costs),
# then the float32 reward's split; after them the step searching only the window's last SDE
# step (sample.search_steps=1).
SEARCH_STEP="--model sd35-medium --batch 4 --k 8 --rounds 2 --top 2 --decode-size 224 \
    --repeats 2 --warmup 1 --reward imagereward --reward-arg imagereward.random=true"
step search_sd35m_step 170 python3 -m smartgrpo_fast bench search $SEARCH_STEP \
    --reward-arg imagereward.dtype=bfloat16 --providers fused+preview graph+preview \
    graph+preview+compile --out "$W/search_sd35m_step"
step search_sd35m_step_fp32 70 python3 -m smartgrpo_fast bench search $SEARCH_STEP \
    --providers fused+preview --out "$W/search_sd35m_step_fp32"
step train_sd35m_smart_fast_one 200 python3 -m smartgrpo_fast bench train $SD35 \
    --out "$W/sd35m_smart_fast_one" $SD35_RANDOM model.preview_decoder=random \
    search_reward_args.dtype=bfloat16 sample.search_steps=1
# Issue 21 again: the compiled float8 forward. The last lease's 110 s did not cover this
# provider (no log kept; its compilation the likely cost): the first search's line says.
step search_sd35m_fp8_compile 180 python3 -m smartgrpo_fast bench search --model sd35-medium \
    --batch 2 --k 16 --rounds 3 --top 4 --repeats 1 --warmup 1 --providers \
    graph+preview+compile+fp8 --out "$W/search_sd35m_fp8_compile"
# Earlier checks, run when time is left (their figures are in RESULTS.md from earlier leases).
# The search at SD3.5-medium size: naive loop, fused, one captured round, + a TAESD3-layout
# preview decoder (random weights), + the compiled forward inside the captured round.
step search_sd35m_fast 180 python3 -m smartgrpo_fast bench search --model sd35-medium \
    --batch 2 --k 16 --rounds 3 --top 4 --repeats 2 --warmup 1 --providers reference fused \
    graph graph+preview graph+preview+compile --out "$W/search_sd35m_fast"
step search_tiny 60 python3 -m smartgrpo_fast bench search --model tiny --batch 8 --out "$W"
step train_smart 60 python3 -m smartgrpo_fast bench train --config tiny --steps 3 --out "$W" \
    device=cuda
step train_random 50 python3 -m smartgrpo_fast bench train --config tiny --steps 3 --out "$W" \
    device=cuda noise=random
# Does GRPO learn at a batch the 2-core CPU cannot afford? The tiny-align config (the
# prompt-match reward at 512 rollouts a step), then the held-out evaluation of its adapter.
step grad_snr_scale 90 python3 benchmarks/grad_snr.py --batches 16 --noise random,smart \
    --out "$W/grad_snr_scale.jsonl" --config tiny-align
step train_scale 300 python3 -m smartgrpo_fast train --config tiny-align --out "$W/train_scale" \
    log.progress=false
step eval_scale 120 python3 -m smartgrpo_fast eval --run "$W/train_scale" --num-prompts 128 \
    --prompt-seed 2000 --seed 7 --images-per-prompt 4 --dtype float32 --device cuda \
    --no-progress --out "$W/eval_scale"
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
