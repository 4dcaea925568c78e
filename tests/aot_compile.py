"""Compile every Triton kernel ahead of time for real GPUs, without a GPU.

The interpreter accepts code that the compiler rejects, so CI also lowers each kernel to PTX
and cubin for sm_80 and sm_90 at its real block sizes and dtypes. Run without
TRITON_INTERPRET (``tests/test_aot_compile.py`` does, in a subprocess):

    python tests/aot_compile.py --arch 80 90
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("aot_compile.py: unset TRITON_INTERPRET; interpreted kernels cannot be compiled")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from smartgrpo_fast.ops.cem_update import (
    ELITES,
    _cem_pool_kernel,
    _cem_update_kernel,
    cem_block_size,
    cem_num_warps,
)
from smartgrpo_fast.ops.philox import _philox_bits_kernel, _philox_normal_kernel
from smartgrpo_fast.ops.sample_perturb import _sample_perturb_kernel
from smartgrpo_fast.ops.topk_select import _topk_select_kernel
from smartgrpo_fast.ops.x0_estimate import _x0_estimate_kernel

FLOAT_ARGS = {"mu_val", "sigma_val", "scale_val", "t_val", "scaling", "shift", "alpha", "min_sigma"}
INT64_PTRS = {"seed_ptr", "round_ptr", "row_offset_ptr", "idx_ptr", "counts_ptr", "ctr_ptr"}
DTYPES = {"fp32": "fp32", "bf16": "bf16", "fp16": "fp16"}
#: Elements of one SD3 latent at 1024 px, (16, 128, 128): the launch configuration compiled.
SD3_NUMEL = 16 * 128 * 128


@dataclass(frozen=True)
class Variant:
    """One kernel specialisation: pointer element types, constexprs, launch options."""

    name: str
    kernel: object
    constexprs: dict
    ptrs: dict = field(default_factory=dict)
    num_warps: int = 4
    maxnreg: int | None = None

    def options(self) -> dict:
        """The compile options of this launch: its warps, and its register cap if any."""
        opts = {"num_warps": self.num_warps}
        if self.maxnreg is not None:
            opts["maxnreg"] = self.maxnreg
        return opts


def signature(v: Variant) -> dict[str, str]:
    sig = {}
    for arg in v.kernel.arg_names:
        if arg in v.constexprs:
            sig[arg] = "constexpr"
        elif arg.endswith("_ptr"):
            sig[arg] = "*" + v.ptrs.get(arg, "i64" if arg in INT64_PTRS else "fp32")
        elif arg in FLOAT_ARGS:
            sig[arg] = "fp32"
        else:
            sig[arg] = "i32"
    return sig


def variants() -> Iterator[Variant]:
    seeds = {"SEED_FROM_PTR": True, "ROUND_FROM_PTR": False, "ROW_OFFSET_FROM_PTR": True}
    yield Variant("philox_normal", _philox_normal_kernel, {**seeds, "BLOCK": 1024})
    yield Variant("philox_bits", _philox_bits_kernel, {"BLOCK": 256}, {"out_ptr": "i64"})
    for dt in DTYPES:
        yield Variant(
            f"sample_perturb[{dt}, elem/row/scalar]",
            _sample_perturb_kernel,
            {"MU_MODE": 2, "SIGMA_MODE": 1, "SCALE_MODE": 0, **seeds, "BLOCK": 1024, "TILE": True},
            {"z_ptr": dt, "mean_ptr": dt},
        )
        yield Variant(
            f"x0_estimate[{dt}]",
            _x0_estimate_kernel,
            {"T_MODE": 1, "BLOCK": 2048},
            {"x0_ptr": dt, "z_ptr": dt, "v_ptr": dt},
        )
    yield Variant(
        "sample_perturb[bf16, scalar/elem/row, int seeds, 16 does not divide D]",
        _sample_perturb_kernel,
        {
            "MU_MODE": 0,
            "SIGMA_MODE": 2,
            "SCALE_MODE": 1,
            "SEED_FROM_PTR": False,
            "ROUND_FROM_PTR": True,
            "ROW_OFFSET_FROM_PTR": False,
            "BLOCK": 1024,
            "TILE": False,
        },
        {"z_ptr": "bf16", "mean_ptr": "bf16", "sigma_ptr": "bf16"},
    )
    for dt, block_k, warps in (("fp32", 16, 4), ("bf16", 1024, 4), ("fp16", 4096, 8)):
        yield Variant(
            f"topk_select[{dt}, K<={block_k}]",
            _topk_select_kernel,
            {"BLOCK_K": block_k},
            {"r_ptr": dt, "idx_ptr": "i64"},
            num_warps=warps,
        )
    cem_block = cem_block_size(SD3_NUMEL)  # as launched for SD3 latents
    for per_element, has_counts in ((True, True), (False, False)):
        yield Variant(
            f"cem_update[per_element={per_element}, counts={has_counts}]",
            _cem_update_kernel,
            {"MU_MODE": 2, "SIGMA_MODE": 2 if per_element else 1, "PER_ELEMENT": per_element,
             "HAS_COUNTS": has_counts, **seeds, "BLOCK": cem_block, "ELITES": ELITES},
            num_warps=cem_num_warps(cem_block),
        )  # fmt: skip
    yield Variant(
        "cem_update[pool, counts=True]",
        _cem_pool_kernel,
        {"SIGMA_MODE": 1, "HAS_COUNTS": True, "BLOCK_P": 256},
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    args = parser.parse_args(argv)
    failures = 0
    count = 0
    for arch in args.arch:
        target = GPUTarget("cuda", arch, 32)
        for v in variants():
            start = time.perf_counter()
            try:
                src = ASTSource(fn=v.kernel, signature=signature(v), constexprs=v.constexprs)
                compiled = triton.compile(src, target=target, options=v.options())
                assert "cubin" in compiled.asm and "ptx" in compiled.asm
                status = f"ok   ptx+cubin, {len(compiled.asm['cubin'])} B cubin"
            except Exception as exc:  # report every failure, then fail
                failures += 1
                status = f"FAIL {type(exc).__name__}: {exc}"
            count += 1
            print(f"sm_{arch} {v.name:<48} {time.perf_counter() - start:5.2f}s {status}")
    print(f"compiled {count - failures}/{count} kernel variants")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
