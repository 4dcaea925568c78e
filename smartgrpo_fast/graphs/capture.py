"""CUDA-graph capture of a static-shape callable, with torch.compile and eager as alternatives.

:class:`GraphedCallable` wraps ``fn(*tensors) -> tensor`` whose tensor arguments are all
batch-major (same leading size N). With ``backend="graph"`` it keeps one CUDA graph per
batch-size *bucket* (N is padded up to the smallest bucket that holds it), all captured into
one shared memory pool:

* static input buffers per bucket; a call copies its inputs into rows ``[:N]`` and replays;
* capture after ``warmup`` eager calls on a side stream (cuBLAS/cuDNN workspaces and lazy
  initialisation must happen outside the capture);
* a new dtype or trailing shape at a bucket re-captures that bucket (counted in
  :class:`GraphStats`);
* a direct call of ``fn`` while an enclosing graph is being captured (the call becomes part
  of that graph, e.g. a whole search round);
* eager execution when not on CUDA, when grad mode needs autograd through ``fn``, when N
  exceeds the largest bucket, or when capture fails; one warning per distinct reason, and
  :attr:`GraphStats.fallback_reason` holds the latest. A failed capture sends that bucket
  and signature (dtype, trailing shapes) to eager for good; other buckets still capture.

Parameters updated *in place* (an optimizer step on LoRA weights, ``param.data.copy_``) are
seen by the next replay: a graph reads parameter memory at replay time. Re-creating a
parameter (``module.weight = nn.Parameter(...)``, ``load_state_dict(assign=True)``, moving
the module) leaves the graph reading the old memory: call :meth:`GraphedCallable.reset` then.

``backend="compile-reduce-overhead"`` / ``"compile-max-autotune"`` run ``torch.compile`` with
that mode on the same call instead, so benchmarks compare eager, graph and compile directly.

Inside an enclosing graph (:func:`enclosing_graph`: a whole search round being warmed up and
captured, :class:`~smartgrpo_fast.search.NoiseSearch`), every backend runs without graphs of
its own, which cannot nest in another capture: ``graph`` calls ``fn`` directly, and the compile
backends call a second compilation of ``fn`` without CUDA graphs (``compile-reduce-overhead``:
Inductor's default mode; ``compile-max-autotune``: ``max-autotune-no-cudagraphs``), whose
kernels the enclosing graph captures and replays.
"""

from __future__ import annotations

import bisect
import contextlib
import threading
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from smartgrpo_fast.devices import is_capturing

__all__ = [
    "BACKENDS",
    "INNER_COMPILE_MODES",
    "GraphConfig",
    "GraphStats",
    "GraphedCallable",
    "capture_graph",
    "enclosing_graph",
    "in_enclosing_graph",
    "pick_bucket",
    "warm_up",
]

BACKENDS = ("eager", "graph", "compile-reduce-overhead", "compile-max-autotune")
#: The torch.compile mode each compile backend runs inside an enclosing graph: the same
#: compilation without CUDA graphs of its own (they cannot nest in another capture).
INNER_COMPILE_MODES = {"reduce-overhead": "default", "max-autotune": "max-autotune-no-cudagraphs"}

_ENCLOSING = threading.local()


@contextlib.contextmanager
def enclosing_graph() -> Iterator[None]:
    """Mark the calls in this block (on this thread) as parts of an enclosing CUDA graph that
    is being warmed up or captured: :class:`GraphedCallable` then runs without graphs of its
    own (module docstring), in the warm-up as in the capture, so what is captured is what was
    warmed up (compiled, autotuned)."""
    depth = getattr(_ENCLOSING, "depth", 0)
    _ENCLOSING.depth = depth + 1
    try:
        yield
    finally:
        _ENCLOSING.depth = depth


def in_enclosing_graph() -> bool:
    """True inside :func:`enclosing_graph` on this thread."""
    return getattr(_ENCLOSING, "depth", 0) > 0


@dataclass(frozen=True)
class GraphConfig:
    """How a :class:`GraphedCallable` runs its function.

    Attributes:
        backend: ``eager``, ``graph`` (CUDA graphs, the default), ``compile-reduce-overhead``
            or ``compile-max-autotune`` (``torch.compile`` modes).
        buckets: batch sizes captured, ascending; a call of N rows uses the smallest bucket
            >= N (padding costs at most 2x at powers of two, and bounds the number of graphs).
        warmup: eager calls on a side stream before each capture.
        clone_outputs: return a copy of the static output (True) or a view into it that the
            next call overwrites (False, saves a copy when the caller consumes it at once).
    """

    backend: str = "graph"
    buckets: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256)
    warmup: int = 2
    clone_outputs: bool = True

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(
                f"backend: expected one of {', '.join(BACKENDS)}, got {self.backend!r}"
            )
        b = tuple(self.buckets)
        if not b or any(not isinstance(x, int) or x < 1 for x in b) or list(b) != sorted(set(b)):
            raise ValueError(f"buckets: expected strictly increasing ints >= 1, got {b!r}")
        if self.warmup < 1:
            raise ValueError(
                f"warmup: expected >= 1 (capture needs a warm-up call), got {self.warmup}"
            )


@dataclass
class GraphStats:
    """Bookkeeping of a :class:`GraphedCallable` (for tests, logs and benchmarks)."""

    captures: int = 0
    recaptures: int = 0
    replays: int = 0
    eager_calls: int = 0
    inner_calls: int = 0  # calls run as part of an enclosing graph (enclosing_graph)
    fallback_reason: str | None = None  # the latest reason a call ran eagerly
    buckets_captured: list[int] = field(default_factory=list)


def pick_bucket(n: int, buckets: tuple[int, ...]) -> int | None:
    """The smallest bucket >= n, or None when n exceeds the largest."""
    i = bisect.bisect_left(buckets, n)
    return buckets[i] if i < len(buckets) else None


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    inputs: list[torch.Tensor]
    output: torch.Tensor
    signature: tuple


def _on_cuda(args: tuple[torch.Tensor, ...]) -> bool:
    return all(a.is_cuda for a in args)


def warm_up(fn: Callable[[], object], device: torch.device, times: int = 1) -> None:
    """Call ``fn`` ``times`` times before a capture: on CUDA on a side stream (lazy
    initialisation, cuBLAS workspaces and Triton compilation must happen outside a capture),
    elsewhere directly."""
    if device.type != "cuda":
        for _ in range(times):
            fn()
        return
    side = torch.cuda.Stream(device=device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(times):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)


def capture_graph(
    fn: Callable[[], object], pool: tuple | None = None
) -> tuple[torch.cuda.CUDAGraph, Any]:
    """Capture one call of ``fn`` into a new CUDA graph (in ``pool``); (graph, fn's output)."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        output = fn()
    return graph, output


def _record(
    fn: Callable[..., torch.Tensor], inputs: list[torch.Tensor], pool: tuple, warmup: int
) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """Warm ``fn`` up on a side stream, then capture one call into a graph in ``pool``."""
    warm_up(lambda: fn(*inputs), inputs[0].device, warmup)
    return capture_graph(lambda: fn(*inputs), pool)


def _pool_handle() -> tuple:
    return torch.cuda.graph_pool_handle()


def _signature(args: tuple[torch.Tensor, ...]) -> tuple:
    return tuple((tuple(a.shape[1:]), a.dtype, a.device) for a in args)


class GraphedCallable:
    """``fn(*tensors) -> tensor`` run eagerly, as CUDA graphs per batch bucket, or compiled.

    Every positional argument must be a tensor with the same leading (batch) size N; the
    output's leading size must be N too. See the module docstring for the rules.
    """

    def __init__(self, fn: Callable[..., torch.Tensor], config: GraphConfig | None = None):
        self.fn = fn
        self.config = config or GraphConfig()
        self.stats = GraphStats()
        self._graphs: dict[int, _Graph] = {}
        self._pool: tuple | None = None
        self._compiled: Callable[..., torch.Tensor] | None = None
        self._compiled_inner: Callable[..., torch.Tensor] | None = None
        # (bucket, signature) -> why its capture failed: that key runs eagerly from then on
        self._broken: dict[tuple, str] = {}
        self._warned: set[str] = set()

    def reset(self) -> None:
        """Drop every captured graph (after parameters were re-created, not updated in place)."""
        self._graphs.clear()
        self._pool = None
        self._compiled = None
        self._compiled_inner = None
        self._broken.clear()

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        backend = self.config.backend
        if backend == "eager":
            self.stats.eager_calls += 1
            return self.fn(*args)
        if backend.startswith("compile"):
            return self._call_compiled(*args)
        return self._call_graph(*args)

    # ------------------------------------------------------------------------- compile

    def _call_compiled(self, *args: torch.Tensor) -> torch.Tensor:
        mode = self.config.backend.removeprefix("compile-")
        if in_enclosing_graph() or (args and is_capturing(args[0].device)):
            # part of an enclosing graph: the compilation without CUDA graphs; its output is
            # the enclosing graph's own buffer (no clone needed, none wanted in a capture)
            if self._compiled_inner is None:
                self._compiled_inner = torch.compile(
                    self.fn, mode=INNER_COMPILE_MODES[mode], dynamic=False
                )
            self.stats.inner_calls += 1
            return self._compiled_inner(*args)
        if self._compiled is None:
            self._compiled = torch.compile(self.fn, mode=mode, dynamic=False)
        if mode == "reduce-overhead" and args and args[0].is_cuda:
            torch.compiler.cudagraph_mark_step_begin()
        out = self._compiled(*args)
        return out.clone() if self.config.clone_outputs else out

    # --------------------------------------------------------------------------- graphs

    def _eager(self, reason: str, *args: torch.Tensor) -> torch.Tensor:
        self.stats.fallback_reason = reason
        if reason not in self._warned:
            self._warned.add(reason)
            warnings.warn(
                f"GraphedCallable: running {getattr(self.fn, '__name__', 'fn')} eagerly: {reason}",
                RuntimeWarning,
                stacklevel=3,
            )
        self.stats.eager_calls += 1
        return self.fn(*args)

    def _call_graph(self, *args: torch.Tensor) -> torch.Tensor:
        if not args or not all(isinstance(a, torch.Tensor) for a in args):
            raise TypeError("GraphedCallable: every positional argument must be a tensor")
        n = args[0].shape[0] if args[0].dim() else 0
        for i, a in enumerate(args):
            if a.dim() == 0 or a.shape[0] != n:
                raise ValueError(
                    f"args[{i}]: expected a batch-major tensor with leading size {n}, "
                    f"got shape {tuple(a.shape)}"
                )
        if in_enclosing_graph() or is_capturing(args[0].device):
            self.stats.inner_calls += 1
            return self.fn(*args)  # inside an enclosing graph (a whole search round)
        if not _on_cuda(args):
            return self._eager("inputs are not CUDA tensors", *args)
        if torch.is_grad_enabled():
            return self._eager("grad mode is on (graphs cover inference only)", *args)
        bucket = pick_bucket(n, self.config.buckets)
        if bucket is None:
            return self._eager(f"batch {n} exceeds the largest bucket", *args)
        sig = _signature(args)
        broken = self._broken.get((bucket, sig))
        if broken is not None:
            return self._eager(broken, *args)
        g = self._graphs.get(bucket)
        if g is None or g.signature != sig:
            try:
                g = self._capture(bucket, args, sig, recapture=g is not None)
            except Exception as exc:  # capture fails in many ways; this key runs eagerly
                self._graphs.pop(bucket, None)
                reason = f"capture failed ({type(exc).__name__}: {exc})"
                self._broken[(bucket, sig)] = reason
                return self._eager(reason, *args)
        for buf, a in zip(g.inputs, args, strict=True):
            buf[:n].copy_(a)
        g.graph.replay()
        self.stats.replays += 1
        out = g.output[:n]
        return out.clone() if self.config.clone_outputs else out

    def _capture(self, bucket: int, args: tuple, sig: tuple, *, recapture: bool) -> _Graph:
        n = args[0].shape[0]
        inputs = []
        for a in args:
            buf = torch.empty((bucket, *a.shape[1:]), dtype=a.dtype, device=a.device)
            buf[:n].copy_(a)
            if bucket > n:
                buf[n:].copy_(a[:1].expand(bucket - n, *a.shape[1:]))  # valid padding rows
            inputs.append(buf)
        if self._pool is None:
            self._pool = _pool_handle()
        graph, output = _record(self.fn, inputs, self._pool, self.config.warmup)
        if not isinstance(output, torch.Tensor) or output.shape[:1] != (bucket,):
            raise TypeError(f"fn must return one batch-major tensor, got {type(output).__name__}")
        g = _Graph(graph, inputs, output, sig)
        self._graphs[bucket] = g
        self.stats.captures += 1
        self.stats.recaptures += int(recapture)
        if bucket not in self.stats.buckets_captured:
            self.stats.buckets_captured.append(bucket)
        return g
