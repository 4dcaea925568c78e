"""pytest-benchmark suite of one whole noise search on the embedded model: naive vs fused.

    python -m pytest benchmarks/test_bench_search.py --benchmark-only

One call = one search of B = 4 rollouts, K = 16, N = 3, T = 4 (192 candidates) at one SDE step
(see :mod:`smartgrpo_fast.bench.search`; ``smartgrpo-fast bench search`` is the reference
measurement and also runs the full-size SD3.5-medium configuration and the CUDA-graph path).
``extra_info`` holds the candidates per call and per second. The reference draws its
``torch.randn`` noise on the device, from a device generator (a fair naive baseline); the
split of a round into its stages is ``smartgrpo-fast bench search``'s.
"""

from __future__ import annotations

import pytest
import torch

from smartgrpo_fast import models, rewards
from smartgrpo_fast.search import NoiseSearch, SearchConfig, search_reference

CFG = SearchConfig(k=16, rounds=3, top=4, graph=False)
B = 4


@pytest.fixture(scope="module")
def setup(bench_device: torch.device):
    model = models.load("tiny", device=bench_device)
    reward = rewards.load("tiny", device=bench_device)
    cond = model.encode_prompts(["a red circle on a blue background"] * B)
    gen = torch.Generator(device=bench_device).manual_seed(0)
    mean = torch.randn((B, *model.latent_shape), generator=gen, device=bench_device)
    return model, reward, cond, mean


@pytest.mark.parametrize("provider", ["reference", "fused"])
def test_bench_search(benchmark, setup, provider: str, bench_device: torch.device) -> None:
    model, reward, cond, mean = setup
    if provider == "reference":
        gen = torch.Generator(device=bench_device).manual_seed(1)  # noise drawn on the device

        def call():
            return search_reference(model, reward, mean, 0.3, 0.8, cond, CFG, noise="torch",
                                    generator=gen)  # fmt: skip
    else:
        search = NoiseSearch(model, reward, CFG)

        def call():
            return search.run(mean, 0.3, 0.8, cond)

    def run():
        out = call()
        if bench_device.type == "cuda":
            torch.cuda.synchronize(bench_device)
        return out

    candidates = B * CFG.model_calls
    benchmark.group = f"search tiny B={B} K={CFG.k} N={CFG.rounds}"
    benchmark.extra_info.update(provider=provider, candidates=candidates)
    res = benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)
    assert res.eps.shape == mean.shape and bool(torch.isfinite(res.eps).all())
    if benchmark.stats is not None:
        benchmark.extra_info["candidates_per_s"] = candidates / benchmark.stats.stats.median
