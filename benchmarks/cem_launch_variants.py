"""cem_update's Triton kernel at several launch configurations, kernel-only, on one GPU.

Issue 22: the shipped launch (one Philox group a thread: BLOCK 512, 4 warps, 4 elites a step;
96 registers on sm_90 with Triton 3.6) against the launch it replaced (two groups a thread:
BLOCK 1024, 4 warps; 158 registers) and the other candidates ``sass_counts.py --sweep``
compiles (a ``maxnreg`` cap, 1, 2 or 8 elites a step, smaller blocks). Each variant is run
through the public op (``validate=False``, backend ``triton``) with the module's launch
choices swapped for the variant's, timed as ``bench ops``' kernel mode (100 calls in one
CUDA graph, replayed 10 times, L2 flushed outside the interval), and its outputs (mu and a
std per element) compared with the shipped launch's: the same bits where the elites a step
are the same (block and warps change no arithmetic of an element), else a rounding-level
difference. One CSV row a (case, variant) under ``--out``:

    python3 benchmarks/cem_launch_variants.py --out /tmp/cem_variants
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import importlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from smartgrpo_fast.bench.timing import measure_graph
from smartgrpo_fast.ops import cem_update

cem_module = importlib.import_module("smartgrpo_fast.ops.cem_update")  # the module, not the op


class Launch(NamedTuple):
    name: str
    block: int
    warps: int
    elites: int
    maxnreg: int | None = None


#: The shipped launch first (sm_90 registers with Triton 3.6 in the comments).
VARIANTS = (
    Launch("shipped", 512, 4, 4),  # 96 registers, 20 warps an SM
    Launch("2c0a967", 1024, 4, 4),  # 158, 12: two groups a thread
    Launch("maxnreg80", 512, 4, 4, 80),  # 80, 24, no spill
    Launch("elites2", 512, 4, 2),  # 69, 28
    Launch("elites1", 512, 4, 1),  # 40, 48
    Launch("elites8", 512, 4, 8),  # 128, 16, 5 spill stores outside the hot loop
    Launch("block256", 256, 2, 4),  # 96, 20: twice the programs
)


class Case(NamedTuple):
    name: str
    batch: int
    k: int
    latent: tuple[int, int, int]
    elites: int


CASES = (
    Case("16M: B 1, K 64, T 16, 1024 px", 1, 64, (16, 128, 128), 16),
    Case("64M: B 1, K 256, T 64, 1024 px", 1, 256, (16, 128, 128), 64),
    Case("search: B 16, K 16, T 4, 512 px", 16, 16, (16, 64, 64), 4),
    Case("search: B 8, K 16, T 4, 1024 px", 8, 16, (16, 128, 128), 4),
)


@contextlib.contextmanager
def launched_as(v: Launch) -> Iterator[None]:
    """cem_update's Triton launch set to ``v`` for the duration (the module's block size,
    warps and elites a step swapped; ``maxnreg`` added to the kernel's launch options)."""
    saved = (cem_module.cem_block_size, cem_module.cem_num_warps, cem_module.ELITES,
             cem_module.kernel)  # fmt: skip
    plain_kernel = cem_module.kernel

    def kernel(fn, wrap):
        launcher = plain_kernel(fn, wrap)
        if fn is not cem_module._cem_update_kernel or v.maxnreg is None:
            return launcher

        class Capped:
            def __getitem__(self, grid):
                run = launcher[grid]
                return lambda *args, **kw: run(*args, maxnreg=v.maxnreg, **kw)

        return Capped()

    cem_module.cem_block_size = lambda numel: v.block
    cem_module.cem_num_warps = lambda block: v.warps
    cem_module.ELITES = v.elites
    cem_module.kernel = kernel
    try:
        yield
    finally:
        (cem_module.cem_block_size, cem_module.cem_num_warps, cem_module.ELITES,
         cem_module.kernel) = saved  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--variants", nargs="+", default=[v.name for v in VARIANTS])
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("cem_launch_variants.py: needs a CUDA GPU")
    os.environ["SMARTGRPO_BACKEND"] = "triton"
    device = torch.device("cuda")
    args.out.mkdir(parents=True, exist_ok=True)
    variants = [v for v in VARIANTS if v.name in args.variants]
    rows = []
    for case in CASES:
        gen = torch.Generator(device=device).manual_seed(0)
        shape = (case.batch, *case.latent)
        mu = torch.randn(shape, generator=gen, device=device)
        sigma = torch.rand(shape, generator=gen, device=device) + 0.5
        idx = torch.stack([torch.randperm(case.k, generator=gen, device=device)[: case.elites]
                           for _ in range(case.batch)])  # fmt: skip

        def call(mu=mu, sigma=sigma, idx=idx, shape=shape, k=case.k):
            return cem_update(mu, sigma, idx, shape=shape, k=k, seed=7, round=3, validate=False)

        with launched_as(VARIANTS[0]):
            want = [t.clone() for t in call()]
        normals = case.batch * case.elites * mu[0].numel()
        for v in variants:
            with launched_as(v):
                got = call()
                torch.cuda.synchronize()
                diff = max(float((g - w).abs().max()) for g, w in zip(got, want, strict=True))
                equal = all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
                t = measure_graph(call, device)
            row = {"case": case.name, **v._asdict(), "median_us": round(1e3 * t.median, 2),
                   "p20_us": round(1e3 * t.p20, 2), "p80_us": round(1e3 * t.p80, 2),
                   "g_normals_per_s": round(normals / (t.median * 1e-3) / 1e9, 1),
                   "bits_equal_shipped": equal, "max_abs_diff": f"{diff:.3g}"}  # fmt: skip
            rows.append(row)
            print(f"{case.name:<34} {v.name:<10} {row['median_us']:>9.2f} us "
                  f"{row['g_normals_per_s']:>7.1f} G normals/s  equal {equal} "
                  f"(max diff {row['max_abs_diff']})", flush=True)  # fmt: skip
    with open(args.out / "cem_launch_variants.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"{torch.cuda.get_device_name()}: {len(rows)} rows -> "
          f"{args.out / 'cem_launch_variants.csv'}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
