"""SASS instruction counts of the noise kernels for sm_90, without a GPU.

Compiles the Triton kernels of ``cem_update`` and ``sample_perturb`` ahead of time (Triton's AOT
path, as ``tests/aot_compile.py`` does) and ``smartgrpo_fast/csrc/ops_cuda.cu`` with nvcc, then
disassembles each kernel with ``cuobjdump -sass`` (Triton's own copy when none is on PATH) and
prints, per kernel: all instructions, those of its hot loop (of the loops, the spans from a
backward branch's target to the branch, the smallest that holds a ``MUFU``, i.e. the
Box-Muller's square root: the per-elite or per-candidate loop; a loop of the trigonometric
slow path holds none), and counts of a few instruction classes
(``MUFU`` transcendentals, ``BAR`` barriers, shared-memory ``STS``/``LDS``, ``IMAD.HI`` /
``IMAD.WIDE.U32`` of Philox, ``STL``/``LDL`` local-memory stores and loads, i.e. spills).
Per kernel it also prints the resources ``cuobjdump -res-usage`` reads from the cubin:
registers a thread, stack and local memory bytes a thread (spills), shared memory a block
(static, plus Triton's dynamic allocation), and what they allow on an SM of the target:
thread blocks (programs) a multiprocessor holds at once and the occupancy, resident warps
of the 64 (sm_80/sm_90: 64K registers, allocated 256 a warp; 2048 threads, 32 blocks;
shared memory 164 KB on sm_80, 228 KB on sm_90, 1 KB of it reserved a block). Run without
``TRITON_INTERPRET``:

    python3 benchmarks/sass_counts.py                 # Triton and nvcc
    python3 benchmarks/sass_counts.py --no-nvcc       # Triton only
    python3 benchmarks/sass_counts.py --no-hints      # Triton without run-time specialisation
    python3 benchmarks/sass_counts.py --kernels cem_update --no-nvcc --sweep
        # cem_update's kernel at other launch configurations (BLOCK, warps, ELITES, maxnreg)

By default the Triton kernels are compiled as Triton specialises them at run time for SD3
latents: every pointer 16-byte aligned and ``D`` divisible by 16 (``tt.divisibility``), which
is what lets masked loads and stores vectorise; ``--no-hints`` compiles the general case.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("sass_counts.py: unset TRITON_INTERPRET; interpreted kernels cannot be compiled")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import triton  # noqa: E402
from aot_compile import Variant, signature, variants  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
_BRANCH_TARGET = re.compile(r"0x([0-9a-f]+)")
_RES_FUNCTION = re.compile(r"^\s*Function\s+(\S+?):?\s*$")
_RES_FIELD = re.compile(r"([A-Z]+(?:\[\d+\])?):(\d+)")
CLASSES = ("MUFU", "BAR", "STS", "LDS", "STL", "LDL", "IMAD.HI", "IMAD.WIDE.U32", "FFMA", "BRA")
RESOURCES = ("regs", "stack", "local", "smem", "blocks/SM", "warps/SM")
#: Per SM: shared memory bytes a multiprocessor holds (sm_80: 164 KB, sm_90: 228 KB).
SMEM_PER_SM = {80: 164 * 1024, 90: 228 * 1024}


def cuobjdump() -> str:
    found = shutil.which("cuobjdump")
    if found:
        return found
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if bundled.is_file():
        return str(bundled)
    sys.exit("sass_counts.py: no cuobjdump on PATH nor in triton's package")


def functions(sass: str) -> dict[str, list[tuple[int, str, str]]]:
    """{function name: [(address, opcode, operands)]} of a ``cuobjdump -sass`` listing."""
    out: dict[str, list[tuple[int, str, str]]] = {}
    current = None
    for line in sass.splitlines():
        if "Function :" in line:
            current = line.split("Function :", 1)[1].strip()
            out[current] = []
        elif current is not None and (m := _LINE.search(line)):
            out[current].append((int(m.group(1), 16), m.group(2), m.group(3)))
    return out


def resources(listing: str) -> dict[str, dict[str, int]]:
    """{function name: {"REG", "STACK", "SHARED", "LOCAL", ...: value}} of a
    ``cuobjdump -res-usage`` listing (a ``Function NAME:`` line, then its fields)."""
    out: dict[str, dict[str, int]] = {}
    current = None
    for line in listing.splitlines():
        if m := _RES_FUNCTION.match(line):
            current = m.group(1)
        elif current is not None and "REG:" in line:
            out[current] = {k: int(v) for k, v in _RES_FIELD.findall(line)}
            current = None
    return out


def occupancy(regs: int, threads: int, smem: int, arch: int) -> tuple[int, int]:
    """(thread blocks, warps) an SM holds at once, as CUDA's occupancy calculator counts them
    (``cuda_occupancy.h``): registers go 256 at a time to a warp, from four sub-partitions
    of 16K each; at most 2048 threads, 32 blocks, and the shared memory of
    ``SMEM_PER_SM`` (1 KB of it reserved a block, allocated 128 bytes at a time)."""
    warps = -(-threads // 32)
    regs_warp = -(-max(regs, 1) * 32 // 256) * 256
    by_regs = 4 * ((64 * 1024 // 4) // regs_warp) // warps
    smem_block = -(-(smem + 1024) // 128) * 128
    by_smem = SMEM_PER_SM.get(arch, SMEM_PER_SM[90]) // smem_block
    blocks = min(by_regs, 2048 // (32 * warps), by_smem, 32)
    return blocks, blocks * warps


def summary(
    instrs: list[tuple[int, str, str]],
    res: dict[str, int] | None = None,
    threads: int = 0,
    dynamic_smem: int = 0,
    arch: int = 90,
) -> dict[str, int | str]:
    """Counts: all instructions (NOPs excluded), the hot loop's body (see the module docstring),
    and the classes; with ``res`` (``resources``' fields of the function) and the block's
    ``threads``, its registers, stack, local memory, shared memory (static + ``dynamic_smem``)
    and the blocks and warps an SM holds."""
    real = [(a, op, args) for a, op, args in instrs if op != "NOP"]
    loop = 0
    for addr, op, args in real:
        if op.startswith("BRA") and (m := _BRANCH_TARGET.search(args)):
            target = int(m.group(1), 16)
            if target < addr:
                body = [o for a, o, _ in real if target <= a <= addr]
                if any(o.startswith("MUFU") for o in body):
                    loop = len(body) if loop == 0 else min(loop, len(body))
    counts: dict[str, int | str] = {"total": len(real), "loop": loop}
    for cls in CLASSES:
        counts[cls] = sum(1 for _, op, _ in real if op == cls or op.startswith(cls + "."))
    if res is None:
        counts.update(dict.fromkeys(RESOURCES, "?"))
        return counts
    smem = res.get("SHARED", 0) + dynamic_smem
    blocks, warps = occupancy(res["REG"], threads, smem, arch)
    counts.update({"regs": res["REG"], "stack": res.get("STACK", 0),
                   "local": res.get("LOCAL", 0), "smem": smem, "blocks/SM": blocks,
                   "warps/SM": warps})  # fmt: skip
    return counts


def _cuobjdump(cubin: bytes, flag: str) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as fh:
        fh.write(cubin)
        fh.flush()
        return subprocess.run(
            [cuobjdump(), flag, fh.name], check=True, capture_output=True, text=True
        ).stdout


def sass_of(cubin: bytes) -> str:
    return _cuobjdump(cubin, "-sass")


def res_usage_of(cubin: bytes) -> str:
    return _cuobjdump(cubin, "-res-usage")


def triton_rows(
    names: tuple[str, ...], arch: int, hints: bool = True, sweep: bool = False
) -> list[tuple[str, dict[str, int | str]]]:
    rows = []
    for v in variants():
        if not v.name.startswith(names):
            continue
        rows.append((f"triton {v.name}", _compile_triton(v, arch, hints)))
        if sweep and v.name.startswith("cem_update[per_element=True"):
            for w in sweep_variants(v):
                rows.append((f"  sweep {w.name}", _compile_triton(w, arch, hints)))
    return rows


def sweep_variants(v: Variant) -> list[Variant]:
    """cem_update's kernel ``v`` at other launch configurations: elements a program (BLOCK),
    warps, elites a step (ELITES) and a register cap (maxnreg). The first is the launch of
    commit 2c0a967 (two Philox groups a thread), the others what issue 22 weighed against
    the shipped one (one group a thread, 4 elites)."""
    configs = [
        (1024, 4, 4, None), (1024, 4, 4, 128), (1024, 4, 2, None), (1024, 4, 2, 96),
        (1024, 8, 4, None), (512, 4, 4, 80), (512, 4, 2, None), (512, 4, 1, None),
        (512, 4, 8, None), (256, 2, 4, None),
    ]  # fmt: skip
    out = []
    for block, warps, elites, maxnreg in configs:
        name = f"BLOCK {block}, {warps} warps, ELITES {elites}, maxnreg {maxnreg}"
        constexprs = {**v.constexprs, "BLOCK": block, "ELITES": elites}
        out.append(Variant(name, v.kernel, constexprs, v.ptrs, warps, maxnreg))
    return out


def _hints(v: Variant) -> dict:
    """``tt.divisibility`` 16 on every pointer and on ``D``: Triton's run-time specialisation
    of aligned tensors and of a D that 16 divides."""
    sig = signature(v)
    return {
        (i,): [["tt.divisibility", 16]]
        for i, name in enumerate(v.kernel.arg_names)
        if sig[name] != "constexpr" and (name.endswith("_ptr") or name == "D")
    }


def _compile_triton(v: Variant, arch: int, hints: bool) -> dict[str, int | str]:
    src = ASTSource(
        fn=v.kernel,
        signature=signature(v),
        constexprs=v.constexprs,
        attrs=_hints(v) if hints else None,
    )
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=v.options())
    cubin = compiled.asm["cubin"]
    name, instrs = next(iter(functions(sass_of(cubin)).items()))
    res = resources(res_usage_of(cubin)).get(name)
    return summary(instrs, res, 32 * v.num_warps, compiled.metadata.shared, arch)


def nvcc_rows(arch: int) -> list[tuple[str, dict[str, int | str]]]:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        print("note: no nvcc on PATH: CUDA C++ kernels left out", file=sys.stderr)
        return []
    csrc = ROOT / "smartgrpo_fast" / "csrc"
    source = csrc / "ops_cuda.cu"
    # every kernel of ops_cuda.cu runs kThreads threads a block
    threads = int(re.search(r"constexpr int kThreads = (\d+);", source.read_text()).group(1))
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "ops_cuda.cubin"
        subprocess.run(
            [nvcc, f"-gencode=arch=compute_{arch},code=sm_{arch}", "-cubin", "-O3",
             "--fmad=false", "-I", str(csrc), "-o", str(cubin), str(source)],
            check=True,
        )  # fmt: skip
        funcs = functions(sass_of(cubin.read_bytes()))
        res = resources(res_usage_of(cubin.read_bytes()))
    rows = []
    for name, instrs in funcs.items():
        short = re.sub(r"^_ZN\w*?_ops_cuda_cu_\w{8}\d+", "", name)
        short = re.match(r"[a-z_0-9]+", short).group(0) if re.match(r"[a-z_]", short) else name
        if "cem" in short or "sample_perturb" in short:
            rows.append((f"nvcc {short}", summary(instrs, res.get(name), threads, 0, arch)))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--no-nvcc", action="store_true", help="Triton kernels only")
    parser.add_argument("--no-hints", action="store_true",
                        help="compile the Triton kernels without the run-time specialisation "
                             "(aligned pointers, D divisible by 16)")  # fmt: skip
    parser.add_argument("--kernels", nargs="+", default=["cem_update", "sample_perturb"])
    parser.add_argument("--sweep", action="store_true",
                        help="also cem_update's per-element kernel at other launch "
                             "configurations (BLOCK, warps, ELITES, maxnreg)")  # fmt: skip
    args = parser.parse_args(argv)
    rows = triton_rows(tuple(args.kernels), args.arch, hints=not args.no_hints, sweep=args.sweep)
    if not args.no_nvcc:
        rows += nvcc_rows(args.arch)
    width = max(len(name) for name, _ in rows)
    cols = ("total", "loop", *CLASSES, *RESOURCES)
    hinted = "" if args.no_hints else ", Triton with aligned pointers and 16 | D"
    print(f"sm_{args.arch} SASS instructions (NOPs excluded{hinted}), Triton "
          f"{triton.__version__}; resources: registers a thread, stack and local bytes a "
          f"thread, shared bytes a block, blocks and warps (of 64) an SM holds")  # fmt: skip
    print(f"{'kernel':<{width}}  " + "  ".join(f"{c:>9}" for c in cols))
    for name, counts in rows:
        print(f"{name:<{width}}  " + "  ".join(f"{counts[c]:>9}" for c in cols))
    return 0


if __name__ == "__main__":
    sys.exit(main())
