#!/usr/bin/env bash
# Every GPU check in one command, for a lent GPU machine (one lease, spent well):
# the CUDA tests, the ops benchmark (Triton and CUDA C++ vs unfused PyTorch), the velocity
# benchmark (eager vs CUDA graph vs torch.compile) on the tiny and the full-size random
# SD3.5-medium transformer, the whole-search benchmark (naive vs fused vs graphed round) and
# the search demo. Results land in $OUT (default bench_out/); copy the tables into
# benchmarks/RESULTS.md with the card's name.
#
#   bash benchmarks/run_gpu.sh
set -uo pipefail
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$OUT/inductor}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -m pytest -m cuda tests -q -rs -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log"
python3 -m smartgrpo_fast bench ops --dtype bfloat16 --out "$OUT" 2>&1 | tee "$OUT/ops_bf16.txt"
python3 -m smartgrpo_fast bench velocity --model tiny --backends eager graph \
    compile-reduce-overhead --batches 1 16 64 --out "$OUT" 2>&1 | tee "$OUT/velocity_tiny.txt"
python3 -m smartgrpo_fast bench velocity --model sd35-medium --dtype bfloat16 \
    --backends eager graph compile-reduce-overhead --batches 1 8 16 --out "$OUT" 2>&1 \
    | tee "$OUT/velocity_sd35m.txt"
# One whole noise search: naive reference vs fused stage by stage vs one captured round
# replayed N times (candidates/s), on the embedded model and the full-size configuration.
python3 -m smartgrpo_fast bench search --model tiny --batch 8 --out "$OUT" 2>&1 \
    | tee "$OUT/search_tiny.txt"
python3 -m smartgrpo_fast bench search --model sd35-medium --batch 2 --k 16 --rounds 3 \
    --out "$OUT" 2>&1 | tee "$OUT/search_sd35m.txt"
python3 -m smartgrpo_fast search --out "$OUT/search_demo" 2>&1 | tee "$OUT/search_demo.txt"
# GRPO steps on the GPU: the split of a step (search, rollout, reward, update), the model calls
# and the trainer's own overhead, for searched and random noise on the embedded model.
python3 -m smartgrpo_fast bench train --config tiny --steps 3 --out "$OUT" device=cuda \
    2>&1 | tee "$OUT/train_tiny_smart.txt"
python3 -m smartgrpo_fast bench train --config tiny --steps 3 --out "$OUT" device=cuda \
    noise=random 2>&1 | tee "$OUT/train_tiny_random.txt"
# GRPO on the prompt-match reward at a batch the 2-core CPU cannot afford (config tiny-align;
# at 32 rollouts a step its batch gradient is noise: benchmarks/grad_snr.py): signal and noise
# at 512 rollouts a step, a 200-step run at that batch, and the held-out evaluation of its
# adapter with the run's reward and the analytic judge, paired with the base.
python3 benchmarks/grad_snr.py --config tiny-align --batches 16 --noise random,smart \
    --out "$OUT/grad_snr_scale.jsonl" 2>&1 | tee "$OUT/grad_snr_scale.txt"
python3 -m smartgrpo_fast train --config tiny-align --out "$OUT/train_scale" log.progress=false \
    2>&1 | tee "$OUT/train_scale.txt"
python3 -m smartgrpo_fast eval --run "$OUT/train_scale" --num-prompts 128 --prompt-seed 2000 \
    --seed 7 --images-per-prompt 4 --dtype float32 --device cuda --no-progress \
    --out "$OUT/eval_scale" 2>&1 | tee "$OUT/eval_scale.txt"
# The search and GRPO steps at SD3.5-medium size (random weights): the preview decoder and the
# compiled forward inside the captured round, float8 search forwards; full-size steps.
python3 -m smartgrpo_fast bench search --model sd35-medium --batch 2 --k 16 --rounds 3 --top 4 \
    --providers reference fused graph graph+preview graph+preview+compile graph+preview+fp8 \
    graph+preview+compile+fp8 --out "$OUT/search_sd35m_fast" 2>&1 | tee "$OUT/search_sd35m_fast.txt"
SD35_RANDOM="model.name=random:sd35-medium reward_args.random=true train.memory_limit_gib=80"
i=0
for extra in noise=random "model.preview_decoder=random" \
    "model.preview_decoder=random model.graph=compile-reduce-overhead" ""; do
    i=$((i + 1))  # one folder a variant: bench train names its CSV by the noise only
    python3 -m smartgrpo_fast bench train --config sd35-medium --steps 3 --warmup 1 \
        --out "$OUT/sd35m_$i" $SD35_RANDOM $extra 2>&1 | tee -a "$OUT/train_sd35m.txt"
done
