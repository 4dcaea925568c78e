"""Float8 search forwards (issue 21) on CPU. torch's CPU build runs float8 matmuls
(``torch._scaled_mm`` on float8_e4m3fn with per-tensor scales), so torchao's quantized copy
of the tiny random SD3 transformer runs here once the two CUDA gates are lifted: ours
(``check_float8``: CUDA, capability >= 8.9) and torchao's (``_check_hardware_support``, at
quantization). Users never lift them; these tests do, through monkeypatch (``cpu_float8``).
Skipped without torchao (the ``fp8`` extra, not part of ``dev``: ``pip install -e ".[dev,fp8]"``
runs them; pyproject.toml says why) or without CPU float8 matmuls."""

from __future__ import annotations

import json
import os
import re
import sys
import types
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

pytest.importorskip("diffusers")

from smartgrpo_fast import rewards
from smartgrpo_fast.models import fp8

PROMPTS = ["a red circle on a blue background", "a green cross on a white background"]
#: ||v8 - v|| / ||v|| of the tiny random transformer's velocity (0.036 measured, float32 and
#: bfloat16): e4m3 keeps 3 mantissa bits, a rounding of up to 2^-4 of each operand.
#: (CPU float8 matmuls are a slow reference, about 0.1 s for a (1200, 32) x (32, 128) product,
#: so these tests keep the forwards few and small.)
FLOAT8_REL = 0.1


def _cpu_scaled_mm_problem() -> str | None:
    """Why this torch cannot run a float8 matmul on CPU tensors (None when it can)."""
    a = torch.ones(16, 16).to(torch.float8_e4m3fn)
    one = torch.tensor(1.0)
    try:
        out = torch._scaled_mm(a, a.t(), scale_a=one, scale_b=one, out_dtype=torch.float32)
    except (RuntimeError, NotImplementedError) as exc:
        return f"torch {torch.__version__} has no CPU float8 matmul: {exc}"
    return None if bool((out == 16).all()) else "torch._scaled_mm on CPU gave wrong values"


@pytest.fixture
def cpu_float8(monkeypatch: pytest.MonkeyPatch):
    """torchao.quantization, with both CUDA gates lifted for this test (torchao's import kept
    checked); skips without torchao or without CPU float8 matmuls."""
    pytest.importorskip("torchao")
    problem = _cpu_scaled_mm_problem()
    if problem is not None:
        pytest.skip(problem)
    quantization = fp8._torchao_quantization()
    from torchao.quantization import quant_api

    monkeypatch.setattr(quant_api, "_check_hardware_support", lambda granularity: None)
    monkeypatch.setattr(fp8, "check_float8", lambda device: fp8._torchao_quantization())
    return quantization


class _ScaledMM(TorchDispatchMode):
    """Counts the float8 matmuls (aten._scaled_mm) run inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._scaled_mm.default:
            self.calls += 1
        return func(*args, **(kwargs or {}))


def _model(dtype: torch.dtype = torch.float32):
    from smartgrpo_fast.models.sd3 import SD3Config, SD3FlowModel
    from smartgrpo_fast.models.sd3_configs import build_tiny_sd3_pipeline

    pipe = build_tiny_sd3_pipeline(seed=0)
    pipe.transformer.to(dtype)
    model = SD3FlowModel(pipe, SD3Config(), name="tiny-random")
    model.dtype = dtype
    return model


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_float8_copy_quantizes_its_linears_and_leaves_the_model_alone(cpu_float8, dtype):
    model = _model(dtype)
    cond = model.encode_prompts(PROMPTS[:1])
    z = torch.randn((4, *model.latent_shape), generator=torch.Generator().manual_seed(0))
    state = model.transformer.state_dict(keep_vars=True)
    kinds = {n: (type(t), t.dtype) for n, t in state.items()}
    before = {n: t.detach().clone() for n, t in state.items()}
    try:
        v = model.velocity(z, 0.7, cond, k=4)
    except RuntimeError as err:  # a torch limitation, not this library's (as in test_lora)
        if "pack_vnni2" in str(err) and os.environ.get("ATEN_CPU_CAPABILITY") == "default":
            pytest.skip("torch: bfloat16 attention under ATEN_CPU_CAPABILITY=default on an "
                        "AVX-512 CPU calls an AVX-512-only packing (pack_vnni2)")  # fmt: skip
        raise

    fast = model.for_search("float8")
    assert fast is model.for_search("float8") and fast.transformer is not model.transformer
    # (a) the original: the same tensors, bit for bit, of the same classes; the same velocity
    after = model.transformer.state_dict(keep_vars=True)
    assert after.keys() == before.keys()
    for name, t in after.items():
        assert (type(t), t.dtype) == kinds[name], name
        assert torch.equal(t, before[name]), name
    assert torch.equal(model.velocity(z, 0.7, cond, k=4), v)
    # (b) the copy: every linear layer of sizes a float8 matmul takes holds a float8 weight,
    # and one forward runs one float8 matmul per such layer
    linears = {n: m for n, m in fast.transformer.named_modules() if isinstance(m, torch.nn.Linear)}
    sized = {n for n, m in linears.items() if m.in_features % 16 == 0 and m.out_features % 16 == 0}
    assert sized and len(sized) == len(linears)  # the tiny layout: widths of 32, 64, 128, 256
    for name, m in linears.items():
        assert isinstance(m.weight, cpu_float8.Float8Tensor), name
        assert m.weight.qdata.dtype == torch.float8_e4m3fn, name
    assert not any(p.requires_grad for p in fast.transformer.parameters())
    with _ScaledMM() as mm:
        v8 = fast.velocity(z, 0.7, cond, k=4)
    assert mm.calls == len(linears)
    # (c) its velocity: within float8 rounding of the model's
    assert v8.shape == v.shape and torch.isfinite(v8).all()
    rel = float((v8.float() - v.float()).norm() / v.float().norm())
    assert 0 < rel < FLOAT8_REL, rel


@torch.no_grad()
def test_search_on_float8_forwards_makes_the_same_model_calls(cpu_float8, monkeypatch):
    """(d) compare_noise with the float8 copy as the search model: the searches' rows run on
    the copy (float8 matmuls), the rollouts' on the model, in the numbers a search on the model
    itself makes, and the reported model calls are the same."""
    from smartgrpo_fast.search import RolloutConfig, SearchConfig, compare_noise
    from smartgrpo_fast.search.rollout import model_calls

    model = _model()
    fast = model.for_search("float8")
    rows, forwards = {"model": 0, "fast": 0}, {"model": 0, "fast": 0}
    mm = {"model": _ScaledMM(), "fast": _ScaledMM()}
    for name, m in (("model", model), ("fast", fast)):

        def counted(z, *a, _fwd=m._forward, _name=name):
            rows[_name] += z.shape[0]
            forwards[_name] += 1
            with mm[_name]:
                return _fwd(z, *a)

        monkeypatch.setattr(m, "_forward", counted)
    search = SearchConfig(k=2, rounds=2, top=1, graph=False)
    rollout = RolloutConfig(steps=3, step=1, batch=1)
    comp = compare_noise(model, rewards.load("tiny-color"), PROMPTS[:1], search, rollout,
                         search_model=fast)  # fmt: skip
    assert comp.calls == model_calls(search, rollout)  # as a search on the model reports
    assert rows["fast"] == 2 * 1 * 2 * 2  # two searches (cem, best-of) x B * K * N
    per = comp.calls["random"]["transformer_rows"]  # the prefix + the rest, per rollout
    assert rows["model"] == per + 2 * (rollout.steps - rollout.step - 1)
    # a float8 matmul per linear layer (32) and forward on the copy, none on the model
    assert mm["fast"].calls == 32 * forwards["fast"] > 0 and mm["model"].calls == 0
    assert torch.isfinite(comp.reward_searched).all() and torch.isfinite(comp.reward_bestof).all()


@pytest.mark.slow
def test_cli_search_dtype_float8_reports_the_same_model_calls(cpu_float8, tmp_path: Path):
    from smartgrpo_fast.cli import main
    from smartgrpo_fast.models.sd3_configs import save_tiny_sd3_pipeline

    sd3_dir = save_tiny_sd3_pipeline(tmp_path / "tiny_sd3", seed=0)
    results = {}
    for dtype in ("model", "float8"):
        out = tmp_path / dtype
        argv = ["search", "--model", str(sd3_dir), "--num-prompts", "2", "--k", "2",
                "--rounds", "1", "--top", "1", "--reward", "tiny-color", "--steps", "3",
                "--step", "1", "--device", "cpu", "--no-progress", "--search-dtype", dtype,
                "--out", str(out)]  # fmt: skip
        assert main(argv) == 0
        results[dtype] = json.loads((out / "result.json").read_text())
    assert results["float8"]["model_options"].get("search_dtype") == "float8"
    assert "search_dtype" not in results["model"]["model_options"]
    assert results["float8"]["model_calls"] == results["model"]["model_calls"]


@pytest.mark.slow
@torch.no_grad()
def test_bench_search_fp8_variant_logs_its_versions_and_copy(cpu_float8) -> None:
    from smartgrpo_fast.bench import search as bench_search

    cfg = bench_search.SearchBenchConfig(
        model="sd3-tiny", providers=("fused+preview", "fused+preview+fp8"), batch=1, k=2,
        rounds=1, top=1, repeats=1, warmup=1, device="cpu",
    )  # fmt: skip
    lines: list[str] = []
    with _ScaledMM() as mm:
        rows = bench_search.run(cfg, log=lines.append)
    assert mm.calls > 0
    for p in cfg.providers:
        assert {r["metric"] for r in rows if r["provider"] == p} >= {"time", "throughput"}, p
    text = "\n".join(lines)
    assert f"torch {torch.__version__}, torchao " in lines[0], lines[0]
    assert "fp8: 32 linear layers in float8" in text, text
    said = [line.split("] ", 1)[1] for line in lines]  # less the "[   1.2 s] " stamps
    for p in cfg.providers:
        for part in ("first search took", "ms per search", "peak memory", "stage split", "done"):
            assert any(x.startswith(f"{p}: ") and part in x for x in said), (p, part, text)


# ------------------------------------------------------------------- with a LoRA adapter


def _lora_names(transformer: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in transformer.named_parameters() if ".lora_" in n}


@torch.no_grad()
def test_float8_copy_shares_the_lora_adapter_and_follows_its_updates(cpu_float8):
    """The copy's adapter tensors are the model's own (so an optimizer step, in place, reaches
    the search's forwards); only the base layers are float8; a copy made before attach_lora
    is not served after it."""
    from smartgrpo_fast.models.lora import LoraSpec, attach_lora

    model = _model()
    stale = model.for_search("float8")
    params = attach_lora(model, LoraSpec(rank=2, alpha=4.0))
    fast = model.for_search("float8")
    assert fast is not stale and fast is model.for_search("float8")
    mine, theirs = _lora_names(model.transformer), _lora_names(fast.transformer)
    assert mine.keys() == theirs.keys() and len(mine) == len(params) > 0
    for name, p in mine.items():
        assert theirs[name] is p and p.requires_grad, name
        assert not isinstance(p, cpu_float8.Float8Tensor), name
    bases = [m for n, m in fast.transformer.named_modules()
             if n.endswith(".base_layer") and isinstance(m, torch.nn.Linear)]  # fmt: skip
    assert bases and all(isinstance(m.weight, cpu_float8.Float8Tensor) for m in bases)
    # the trained model's frozen base weights stay float32 tensors, untouched
    assert not any(isinstance(p, cpu_float8.Float8Tensor) for p in model.transformer.parameters())

    cond = model.encode_prompts(PROMPTS[:1])
    z = torch.randn((2, *model.latent_shape), generator=torch.Generator().manual_seed(0))
    v8 = fast.velocity(z, 0.7, cond, k=2)
    gen = torch.Generator().manual_seed(1)
    for p in params:  # an "optimizer step" in place, large enough to move the velocity
        p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype), alpha=0.3)
    w, w8 = model.velocity(z, 0.7, cond, k=2), fast.velocity(z, 0.7, cond, k=2)
    # the update moved the model's velocity by far more than float8 rounding (0.27 measured;
    # a copy that kept the old adapter would be that far off) ...
    assert float((v8 - w).norm() / w.norm()) > 2 * FLOAT8_REL
    # ... and the copy followed it: within float8 rounding of the updated model (0.043)
    assert float((w8 - w).norm() / w.norm()) < FLOAT8_REL


def test_trainer_searches_on_float8_forwards_and_trains_the_model(cpu_float8, tmp_path):
    """model.search_dtype float8 in a GRPO step (the sd35-medium config at the tiny size): the
    search's forwards run float8 matmuls on a copy whose adapter is the trainer's parameters,
    the rollout and the update run on the model (log-probabilities equal: ratio 1), the step
    after a searched one makes its own forward (reuse off: the rows of a run without reuse),
    and a resumed run's copy shares the resumed parameters."""
    from helpers import SD35_TINY_STEP

    from smartgrpo_fast.train.config import load_config
    from smartgrpo_fast.train.trainer import GRPOTrainer, _module_bytes

    step = [*SD35_TINY_STEP, "train.memory_limit_gib=64", "train.save_every=1"]
    cfg = load_config("sd35-medium", [*step, "model.search_dtype=float8"])
    trainer = GRPOTrainer(cfg, tmp_path / "run8")
    try:
        fast = trainer.search_model
        assert fast is not trainer.model and trainer.searcher.model is fast
        theirs = _lora_names(fast.transformer)
        assert [theirs[n] for n in trainer.names] == trainer.params  # the same tensors
        assert _module_bytes(trainer.model, fast) > _module_bytes(trainer.model)
        before = [p.detach().clone() for p in trainer.params]
        with _ScaledMM() as mm:
            line = trainer.train_step()
        assert mm.calls > 0  # the search's candidates: float8 matmuls
        assert any(not torch.equal(p, b) for p, b in zip(trainer.params, before, strict=True))
        assert float(line["logp_diff_max"]) < 1e-5
        trainer.save()
    finally:
        trainer.close()
    plain = GRPOTrainer(load_config("sd35-medium", [*step, "sample.reuse_search_velocity=false"]),
                        tmp_path / "plain")  # fmt: skip
    try:
        assert plain.search_model is plain.model
        want = plain.train_step()["model_calls_per_rollout"]
    finally:
        plain.close()
    assert line["model_calls_per_rollout"] == want
    resumed = GRPOTrainer(cfg, tmp_path / "run8", resume=True)
    try:
        theirs = _lora_names(resumed.search_model.transformer)
        assert [theirs[n] for n in resumed.names] == resumed.params
        assert resumed.step == 1
    finally:
        resumed.close()


# ------------------------------------------------------------------------ versions


def test_a_torchao_without_the_float8_classes_is_named_with_the_versions(monkeypatch) -> None:
    quantization = types.ModuleType("torchao.quantization")
    quantization.quantize_ = lambda *a, **k: None
    torchao = types.ModuleType("torchao")
    torchao.quantization = quantization
    monkeypatch.setitem(sys.modules, "torchao", torchao)
    monkeypatch.setitem(sys.modules, "torchao.quantization", quantization)
    monkeypatch.setattr(fp8, "_torchao_version", lambda: "0.12.0")
    with pytest.raises(RuntimeError) as exc:
        fp8._torchao_quantization()
    assert str(exc.value) == (
        "search dtype float8: torchao.quantization has no "
        f"Float8DynamicActivationFloat8WeightConfig, Float8Tensor (torch {torch.__version__}, "
        "torchao 0.12.0); pip install 'smartgrpo-fast[fp8]' (torchao>=0.17,<0.19; 0.17 and "
        "0.18 are built for torch 2.11)"
    )


def test_a_torchao_failing_to_import_is_named_with_the_versions(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "torchao", None)
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)
    monkeypatch.setattr(fp8, "_torchao_version", lambda: "0.18.0")
    with pytest.raises(RuntimeError, match=r"torchao cannot be imported \((ModuleNotFound|Import)"
                       rf"Error: .*; torch {re.escape(torch.__version__)}, torchao 0\.18\.0\); "
                       r"install it with pip install 'smartgrpo-fast\[fp8\]' \(torchao>=0\.17,"
                       r"<0\.19"):  # fmt: skip
        fp8._torchao_quantization()
    monkeypatch.setattr(fp8, "_torchao_version", lambda: None)
    assert fp8.versions() == f"torch {torch.__version__}, torchao not installed"


def test_the_fp8_extra_is_the_requirement_the_module_names() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    extras = project["project"]["optional-dependencies"]
    assert extras["fp8"] == [fp8.TORCHAO_REQUIREMENT]
    # not in dev: torchao's import messages would break the CLI's one-line error tests
    assert not any("fp8" in d for d in extras["dev"] if d.startswith("smartgrpo-fast["))
