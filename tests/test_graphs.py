"""GraphedCallable: config checks, eager fallback with one warning, bucket choice and the
recapture bookkeeping (capture faked on CPU), torch.compile on CPU; real graphs on CUDA."""

from __future__ import annotations

import warnings

import pytest
import torch

from smartgrpo_fast.graphs import GraphConfig, GraphedCallable, pick_bucket
from smartgrpo_fast.graphs import capture as capture_mod


def _fn(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return x * 2 + y.sum(dim=1, keepdim=True)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"backend": "cudagraph"}, "backend"),
        ({"buckets": ()}, "buckets"),
        ({"buckets": (4, 2)}, "buckets"),
        ({"buckets": (0, 2)}, "buckets"),
        ({"warmup": 0}, "warmup"),
    ],
)
def test_config_validation(kwargs, match) -> None:
    with pytest.raises(ValueError, match=f"^{match}:"):
        GraphConfig(**kwargs)


@pytest.mark.parametrize("n,expected", [(1, 1), (2, 2), (3, 4), (16, 16), (17, 32), (256, 256)])
def test_pick_bucket(n, expected) -> None:
    assert pick_bucket(n, GraphConfig().buckets) == expected


def test_pick_bucket_beyond_largest() -> None:
    assert pick_bucket(257, GraphConfig().buckets) is None


def test_eager_backend_passes_through() -> None:
    g = GraphedCallable(_fn, GraphConfig(backend="eager"))
    x, y = torch.randn(3, 4), torch.randn(3, 5)
    assert torch.equal(g(x, y), _fn(x, y))
    assert g.stats.eager_calls == 1 and g.stats.captures == 0


def test_cpu_tensors_fall_back_to_eager_with_one_warning() -> None:
    g = GraphedCallable(_fn, GraphConfig(backend="graph"))
    x, y = torch.randn(3, 4), torch.randn(3, 5)
    with pytest.warns(RuntimeWarning, match="not CUDA tensors"):
        out = g(x, y)
    assert torch.equal(out, _fn(x, y))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second warning would raise
        g(x, y)
    assert g.stats.eager_calls == 2 and g.stats.fallback_reason == "inputs are not CUDA tensors"


def test_arguments_must_be_batch_major() -> None:
    g = GraphedCallable(_fn, GraphConfig(backend="graph"))
    with pytest.raises(ValueError, match=r"args\[1\]: expected a batch-major tensor"):
        g(torch.randn(3, 4), torch.randn(2, 5))


class _FakeGraph:
    """Stands in for a CUDA graph: replay() re-runs the function on the static buffers."""

    def __init__(self, fn, inputs, output) -> None:
        self.fn, self.inputs, self.output = fn, inputs, output

    def replay(self) -> None:
        self.output.copy_(self.fn(*self.inputs))


@pytest.fixture
def fake_cuda(monkeypatch):
    """Pretend CPU tensors are on CUDA and record captures with _FakeGraph."""
    recorded = []

    def record(fn, inputs, pool, warmup):
        for _ in range(warmup):
            fn(*inputs)
        out = fn(*inputs)
        recorded.append(tuple(i.shape for i in inputs))
        return _FakeGraph(fn, inputs, out), out

    monkeypatch.setattr(capture_mod, "_on_cuda", lambda args: True)
    monkeypatch.setattr(capture_mod, "_record", record)
    monkeypatch.setattr(capture_mod, "_pool_handle", lambda: ("pool",))
    return recorded


@torch.no_grad()
def test_buckets_pad_and_replay(fake_cuda) -> None:
    g = GraphedCallable(_fn, GraphConfig(backend="graph", buckets=(2, 4, 8)))
    for n in (3, 4, 1, 3, 8, 7):
        x, y = torch.randn(n, 4), torch.randn(n, 5)
        assert torch.allclose(g(x, y), _fn(x, y))
    assert g.stats.buckets_captured == [4, 2, 8]
    assert g.stats.captures == 3 and g.stats.recaptures == 0 and g.stats.replays == 6
    assert fake_cuda[0] == ((4, 4), (4, 5))  # padded up to the bucket


@torch.no_grad()
def test_new_dtype_or_shape_recaptures_that_bucket(fake_cuda) -> None:
    g = GraphedCallable(_fn, GraphConfig(backend="graph", buckets=(4,)))
    g(torch.randn(4, 4), torch.randn(4, 5))
    g(torch.randn(4, 4), torch.randn(4, 5))
    assert (g.stats.captures, g.stats.recaptures) == (1, 0)
    x, y = torch.randn(4, 4, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    assert torch.allclose(g(x, y), _fn(x, y))
    x, y = torch.randn(3, 6), torch.randn(3, 2)
    assert torch.allclose(g(x, y), _fn(x, y))
    assert (g.stats.captures, g.stats.recaptures) == (3, 2)


@torch.no_grad()
def test_view_outputs_are_overwritten_by_the_next_call(fake_cuda) -> None:
    g = GraphedCallable(_fn, GraphConfig(backend="graph", buckets=(4,), clone_outputs=False))
    first = g(torch.ones(4, 1), torch.zeros(4, 1))
    g(torch.zeros(4, 1), torch.zeros(4, 1))
    assert torch.equal(first, torch.zeros(4, 1))  # a view into the static output


@torch.no_grad()
def test_batch_above_largest_bucket_runs_eagerly(fake_cuda) -> None:
    g = GraphedCallable(_fn, GraphConfig(backend="graph", buckets=(2,)))
    x, y = torch.randn(3, 4), torch.randn(3, 5)
    with pytest.warns(RuntimeWarning, match="exceeds the largest bucket"):
        assert torch.equal(g(x, y), _fn(x, y))


@torch.no_grad()
def test_failed_capture_falls_back_for_good(monkeypatch, fake_cuda) -> None:
    def broken(fn, inputs, pool, warmup):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(capture_mod, "_record", broken)
    g = GraphedCallable(_fn, GraphConfig(backend="graph"))
    x, y = torch.randn(2, 4), torch.randn(2, 5)
    with pytest.warns(RuntimeWarning, match="capture failed"):
        assert torch.equal(g(x, y), _fn(x, y))
    g(x, y)
    assert g.stats.captures == 0 and g.stats.eager_calls == 2


@torch.no_grad()
def test_failed_capture_is_remembered_per_bucket(monkeypatch, fake_cuda) -> None:
    """A capture that fails for one bucket (and signature) leaves the others graphed."""
    record = capture_mod._record

    def fails_at_two(fn, inputs, pool, warmup):
        if inputs[0].shape[0] == 2:
            raise RuntimeError("operation not permitted when stream is capturing")
        return record(fn, inputs, pool, warmup)

    monkeypatch.setattr(capture_mod, "_record", fails_at_two)
    g = GraphedCallable(_fn, GraphConfig(backend="graph", buckets=(2, 4)))
    with pytest.warns(RuntimeWarning, match="capture failed"):
        g(torch.randn(2, 4), torch.randn(2, 5))
    for n in (4, 3, 2, 4):
        x, y = torch.randn(n, 4), torch.randn(n, 5)
        assert torch.allclose(g(x, y), _fn(x, y))
    assert g.stats.captures == 1 and g.stats.buckets_captured == [4]
    assert g.stats.replays == 3 and g.stats.eager_calls == 2


def test_one_warning_per_distinct_reason_and_the_latest_is_kept(fake_cuda) -> None:
    g = GraphedCallable(_fn, GraphConfig(backend="graph", buckets=(2,)))
    x, y = torch.randn(3, 4), torch.randn(3, 5)
    with pytest.warns(RuntimeWarning, match="grad mode") as first:
        g(x, y)
        g(x, y)
    assert len(first) == 1
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="exceeds") as second:
        g(x, y)
        g(x, y)
    assert len(second) == 1
    assert g.stats.fallback_reason == "batch 3 exceeds the largest bucket"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # both reasons were warned about already
        g(x, y)
        with torch.no_grad():
            g(x, y)
    assert g.stats.eager_calls == 6


def test_grad_mode_runs_eagerly(fake_cuda) -> None:
    g = GraphedCallable(_fn, GraphConfig(backend="graph"))
    x = torch.randn(2, 4, requires_grad=True)
    with pytest.warns(RuntimeWarning, match="grad mode"):
        g(x, torch.randn(2, 5)).sum().backward()
    assert x.grad is not None


@torch.no_grad()
def test_reset_drops_graphs(fake_cuda) -> None:
    g = GraphedCallable(_fn, GraphConfig(backend="graph", buckets=(4,)))
    g(torch.randn(4, 4), torch.randn(4, 5))
    g.reset()
    g(torch.randn(4, 4), torch.randn(4, 5))
    assert g.stats.captures == 2 and g.stats.recaptures == 0


@pytest.mark.slow
def test_compile_backend_on_cpu(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    g = GraphedCallable(_fn, GraphConfig(backend="compile-max-autotune"))
    x, y = torch.randn(3, 4), torch.randn(3, 5)
    assert torch.allclose(g(x, y), _fn(x, y), atol=1e-6)


# ------------------------------------------------------------------------------ CUDA


@pytest.mark.cuda
@torch.no_grad()
def test_real_graph_matches_eager_and_sees_in_place_parameter_updates() -> None:
    lin = torch.nn.Linear(8, 8, device="cuda")
    g = GraphedCallable(lambda x: lin(x), GraphConfig(backend="graph", buckets=(4, 8)))
    x = torch.randn(3, 8, device="cuda")
    assert torch.allclose(g(x), lin(x), atol=1e-6)
    lin.weight.add_(1.0)  # an optimizer step: in place
    assert torch.allclose(g(x), lin(x), atol=1e-6)
    assert g.stats.captures == 1 and g.stats.replays == 2
    g(torch.randn(8, 8, device="cuda", dtype=torch.float32))
    assert g.stats.captures == 2


def test_graphs_import_no_private_name_of_ops() -> None:
    """graphs/ uses the public smartgrpo_fast.devices, not ops' private modules."""
    import ast
    from pathlib import Path

    import smartgrpo_fast.graphs as graphs

    for path in Path(graphs.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                parts = node.module.split(".")
                private = [p for p in parts[1:] if p.startswith("_")]
                names = [a.name for a in node.names if a.name.startswith("_")]
                assert not (parts[:2] == ["smartgrpo_fast", "ops"] and (private or names)), (
                    f"{path.name}: from {node.module} import ..."
                )
