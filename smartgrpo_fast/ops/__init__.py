"""The fused ops of Smart-GRPO's noise search.

Each op validates its arguments, then runs a Triton kernel on CUDA tensors, the compiled C++
ops (``smartgrpo_fast/csrc``, built on first use) on CPU tensors, and its PyTorch reference
elsewhere or when the C++ build fails (``SMARTGRPO_BACKEND=reference|cpp|triton|cuda`` forces
one, see :func:`resolve_backend`; with ``TRITON_INTERPRET=1`` the Triton kernels also run on
CPU tensors). All noise comes from the one Philox stream defined in
:mod:`smartgrpo_fast.ops.philox`.

Each op calls a torch operator, ``torch.ops.smartgrpo_fast.<op>`` (with ``<op>_triton``, a
``triton_op``, for Triton under ``torch.compile``), so ``torch.compile(fullgraph=True)`` traces
the ops without a graph break; argument validation runs eagerly only. See
:mod:`smartgrpo_fast.ops._library`.
"""

from smartgrpo_fast.ops._common import BACKEND_ENV, resolve_backend
from smartgrpo_fast.ops.cem_update import cem_update, cem_update_reference
from smartgrpo_fast.ops.philox import philox_normal
from smartgrpo_fast.ops.sample_perturb import sample_perturb, sample_perturb_reference
from smartgrpo_fast.ops.topk_select import topk_select, topk_select_reference
from smartgrpo_fast.ops.x0_estimate import x0_estimate, x0_estimate_reference

__all__ = [
    "BACKEND_ENV",
    "cem_update",
    "cem_update_reference",
    "philox_normal",
    "resolve_backend",
    "sample_perturb",
    "sample_perturb_reference",
    "topk_select",
    "topk_select_reference",
    "x0_estimate",
    "x0_estimate_reference",
]
