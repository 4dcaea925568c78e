"""SASS instruction counts of the noise kernels for sm_90, without a GPU.

Compiles the Triton kernels of ``cem_update`` and ``sample_perturb`` ahead of time (Triton's AOT
path, as ``tests/aot_compile.py`` does) and ``smartgrpo_fast/csrc/ops_cuda.cu`` with nvcc, then
disassembles each kernel with ``cuobjdump -sass`` (Triton's own copy when none is on PATH) and
prints, per kernel: all instructions, those of its hot loop (of the loops, the spans from a
backward branch's target to the branch, the smallest that holds a ``MUFU``, i.e. the
Box-Muller's square root: the per-elite or per-candidate loop; a loop of the trigonometric
slow path holds none), and counts of a few instruction classes
(``MUFU`` transcendentals, ``BAR`` barriers, shared-memory ``STS``/``LDS``, ``IMAD.HI`` /
``IMAD.WIDE.U32`` of Philox). Run without ``TRITON_INTERPRET``:

    python3 benchmarks/sass_counts.py                 # Triton and nvcc
    python3 benchmarks/sass_counts.py --no-nvcc       # Triton only
    python3 benchmarks/sass_counts.py --no-hints      # Triton without run-time specialisation

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
CLASSES = ("MUFU", "BAR", "STS", "LDS", "IMAD.HI", "IMAD.WIDE.U32", "FFMA", "BRA")


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


def summary(instrs: list[tuple[int, str, str]]) -> dict[str, int]:
    """Counts: all instructions (NOPs excluded), the hot loop's body (see the module docstring),
    and the classes."""
    real = [(a, op, args) for a, op, args in instrs if op != "NOP"]
    loop = 0
    for addr, op, args in real:
        if op.startswith("BRA") and (m := _BRANCH_TARGET.search(args)):
            target = int(m.group(1), 16)
            if target < addr:
                body = [o for a, o, _ in real if target <= a <= addr]
                if any(o.startswith("MUFU") for o in body):
                    loop = len(body) if loop == 0 else min(loop, len(body))
    counts = {"total": len(real), "loop": loop}
    for cls in CLASSES:
        counts[cls] = sum(1 for _, op, _ in real if op == cls or op.startswith(cls + "."))
    return counts


def sass_of(cubin: bytes) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as fh:
        fh.write(cubin)
        fh.flush()
        return subprocess.run(
            [cuobjdump(), "-sass", fh.name], check=True, capture_output=True, text=True
        ).stdout


def triton_rows(
    names: tuple[str, ...], arch: int, hints: bool = True
) -> list[tuple[str, dict[str, int]]]:
    rows = []
    for v in variants():
        if not v.name.startswith(names):
            continue
        rows.append((f"triton {v.name}", summary(_compile_triton(v, arch, hints))))
    return rows


def _hints(v: Variant) -> dict:
    """``tt.divisibility`` 16 on every pointer and on ``D``: Triton's run-time specialisation
    of aligned tensors and of a D that 16 divides."""
    sig = signature(v)
    return {
        (i,): [["tt.divisibility", 16]]
        for i, name in enumerate(v.kernel.arg_names)
        if sig[name] != "constexpr" and (name.endswith("_ptr") or name == "D")
    }


def _compile_triton(v: Variant, arch: int, hints: bool) -> list[tuple[int, str, str]]:
    src = ASTSource(
        fn=v.kernel,
        signature=signature(v),
        constexprs=v.constexprs,
        attrs=_hints(v) if hints else None,
    )
    compiled = triton.compile(
        src, target=GPUTarget("cuda", arch, 32), options={"num_warps": v.num_warps}
    )
    funcs = functions(sass_of(compiled.asm["cubin"]))
    return next(iter(funcs.values()))


def nvcc_rows(arch: int) -> list[tuple[str, dict[str, int]]]:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        print("note: no nvcc on PATH: CUDA C++ kernels left out", file=sys.stderr)
        return []
    csrc = ROOT / "smartgrpo_fast" / "csrc"
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "ops_cuda.cubin"
        subprocess.run(
            [nvcc, f"-gencode=arch=compute_{arch},code=sm_{arch}", "-cubin", "-O3",
             "--fmad=false", "-I", str(csrc), "-o", str(cubin), str(csrc / "ops_cuda.cu")],
            check=True,
        )  # fmt: skip
        funcs = functions(sass_of(cubin.read_bytes()))
    rows = []
    for name, instrs in funcs.items():
        short = re.sub(r"^_ZN\w*?_ops_cuda_cu_\w{8}\d+", "", name)
        short = re.match(r"[a-z_0-9]+", short).group(0) if re.match(r"[a-z_]", short) else name
        if "cem" in short or "sample_perturb" in short:
            rows.append((f"nvcc {short}", summary(instrs)))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--no-nvcc", action="store_true", help="Triton kernels only")
    parser.add_argument("--no-hints", action="store_true",
                        help="compile the Triton kernels without the run-time specialisation "
                             "(aligned pointers, D divisible by 16)")  # fmt: skip
    parser.add_argument("--kernels", nargs="+", default=["cem_update", "sample_perturb"])
    args = parser.parse_args(argv)
    rows = triton_rows(tuple(args.kernels), args.arch, hints=not args.no_hints)
    if not args.no_nvcc:
        rows += nvcc_rows(args.arch)
    width = max(len(name) for name, _ in rows)
    cols = ("total", "loop", *CLASSES)
    hinted = "" if args.no_hints else ", Triton with aligned pointers and 16 | D"
    print(f"sm_{args.arch} SASS instructions (NOPs excluded{hinted})")
    print(f"{'kernel':<{width}}  " + "  ".join(f"{c:>13}" for c in cols))
    for name, counts in rows:
        print(f"{name:<{width}}  " + "  ".join(f"{counts[c]:>13}" for c in cols))
    return 0


if __name__ == "__main__":
    sys.exit(main())
