"""LoRA on the flow models' transformer: attach, disable, save/load in peft's and diffusers'
formats, on the embedded tiny model and on a tiny random SD3 pipeline (offline, float32)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

import peft
from helpers import assert_close
from safetensors.torch import load_file, save_file

from smartgrpo_fast import models
from smartgrpo_fast.models import Cond
from smartgrpo_fast.models.lora import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    DIFFUSERS_WEIGHTS,
    FLOW_GRPO_TARGETS,
    LoraSpec,
    adapter_disabled,
    attach_lora,
    attached_spec,
    load_adapter,
    lora_parameters,
    read_adapter_spec,
    save_adapter,
    save_diffusers_lora,
)
from smartgrpo_fast.models.sd3 import SD3FlowModel
from smartgrpo_fast.models.sd3_configs import save_tiny_sd3_pipeline

#: rank 4 / alpha 8: alpha != rank, so a format that drops alpha (diffusers without metadata
#: assumes alpha = rank) changes the output by a factor 2 on the update.
SPEC = LoraSpec(rank=4, alpha=8.0)
KINDS = ("tiny", "sd3")


@pytest.fixture(autouse=True)
def offline(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: these forwards are tiny, and on a shared CPU two OpenMP threads
    wait on each other at every op (measured: 1.6 s vs 0.04 s per tiny-model forward)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory) -> Path:
    return save_tiny_sd3_pipeline(tmp_path_factory.mktemp("tiny_sd3"), seed=0)


@pytest.fixture
def make(sd3_dir):
    """make(kind, **kwargs) -> a freshly loaded float32 model."""

    def _make(kind: str, **kwargs):
        if kind == "tiny":
            return models.load("tiny", **kwargs)
        return SD3FlowModel.from_pretrained(sd3_dir, dtype=torch.float32, **kwargs)

    return _make


def inputs(model, kind: str) -> tuple[torch.Tensor, Cond]:
    """z (1, C, H, W) and the conditioning of 1 prompt, fixed by seed (one row keeps the
    CPU forwards short)."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1, *model.latent_shape, generator=g)
    if kind == "tiny":
        cond = model.encode_prompts(["a red circle on a blue background"])
    else:  # random embeddings: the SD3 text encoders are not what is tested here
        cond = Cond(torch.randn(1, 12, 32, generator=g), torch.randn(1, 64, generator=g))
    return z, cond


def velocity(model, z: torch.Tensor, cond: Cond) -> torch.Tensor:
    with torch.no_grad():
        return model.velocity(z, 0.7, cond)


def perturb(params: list[torch.nn.Parameter], seed: int = 1) -> None:
    """Give A and B random values, so the adapter is not the identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


# ------------------------------------------------------------------------------- LoraSpec


def test_spec_defaults_are_flow_grpo() -> None:
    spec = LoraSpec()
    assert (spec.rank, spec.alpha, spec.dropout, spec.scaling) == (32, 64.0, 0.0, 2.0)
    assert spec.targets == FLOW_GRPO_TARGETS and len(FLOW_GRPO_TARGETS) == 8
    cfg = spec.as_peft_config()
    assert isinstance(cfg, peft.LoraConfig)
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout) == (32, 64.0, 0.0)
    assert set(cfg.target_modules) == set(FLOW_GRPO_TARGETS)
    assert cfg.init_lora_weights is True and cfg.bias == "none" and not cfg.use_rslora


def test_spec_normalizes_lists_and_ints() -> None:
    spec = LoraSpec(rank=2, alpha=3, targets=["attn.to_q"], dropout=0)
    assert spec == LoraSpec(rank=2, alpha=3.0, targets=("attn.to_q",), dropout=0.0)
    assert isinstance(spec.alpha, float) and isinstance(spec.targets, tuple)
    assert hash(spec) == hash(LoraSpec(rank=2, alpha=3.0, targets=("attn.to_q",)))
    two = LoraSpec(targets=("attn.to_q", "attn.to_k"))
    swapped = LoraSpec(targets=("attn.to_k", "attn.to_q"))
    assert two != swapped and two.same_adapter(swapped)
    for other in (
        LoraSpec(rank=4, targets=two.targets),
        LoraSpec(alpha=1.0, targets=two.targets),
        LoraSpec(dropout=0.1, targets=two.targets),
        LoraSpec(targets=("attn.to_q",)),
    ):
        assert not two.same_adapter(other)  # fmt: skip


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"rank": 0}, "rank"),
        ({"rank": -3}, "rank"),
        ({"rank": 2.0}, "rank"),
        ({"rank": True}, "rank"),
        ({"alpha": 0.0}, "alpha"),
        ({"alpha": -1.0}, "alpha"),
        ({"alpha": math.nan}, "alpha"),
        ({"alpha": math.inf}, "alpha"),
        ({"alpha": "64"}, "alpha"),
        ({"targets": ()}, "targets"),
        ({"targets": ("",)}, "targets"),
        ({"targets": (".attn.to_q",)}, "targets"),
        ({"targets": ("attn.to_q", "attn.to_q")}, "targets"),
        ({"targets": ("attn.to_q", 3)}, "targets"),
        ({"dropout": 1.0}, "dropout"),
        ({"dropout": -0.1}, "dropout"),
        ({"dropout": math.nan}, "dropout"),
    ],
)
def test_spec_rejects_bad_fields(kwargs, field) -> None:
    with pytest.raises(ValueError, match=f"^{field}: "):
        LoraSpec(**kwargs)


@pytest.mark.parametrize("targets", ["attn.to_q", None, {"attn.to_q"}])
def test_spec_targets_must_be_a_sequence(targets) -> None:
    with pytest.raises(TypeError, match=r"^targets: "):
        LoraSpec(targets=targets)


# ---------------------------------------------------------------------------- attach


@pytest.mark.parametrize("kind", KINDS)
def test_attach_returns_only_lora_params_and_starts_as_identity(make, kind) -> None:
    model = make(kind)
    z, cond = inputs(model, kind)
    base = velocity(model, z, cond)
    params = attach_lora(model, SPEC)
    tr = model.transformer
    assert type(tr).__name__ == "SD3Transformer2DModel"  # adapted in place, class kept
    assert attached_spec(model) == SPEC
    lora_names = {n for n, _ in tr.named_parameters() if ".lora_A." in n or ".lora_B." in n}
    assert {id(p) for p in params} == {id(p) for n, p in tr.named_parameters() if n in lora_names}
    assert {n for n, p in tr.named_parameters() if p.requires_grad} == lora_names
    # 8 targets per block, minus the last block's text-stream outputs (context_pre_only)
    adapted = {n.rsplit(".lora_", 1)[0] for n in lora_names}
    assert len(params) == 2 * len(adapted)
    assert all(any(n.endswith("." + t) for t in SPEC.targets) for n in adapted)
    for n, p in tr.named_parameters():
        if n in lora_names:
            assert p.dtype == torch.float32
            assert p.shape[0 if ".lora_A." in n else 1] == SPEC.rank
            assert (p.abs().sum() == 0) == (".lora_B." in n), n  # B = 0, A random
    assert torch.equal(velocity(model, z, cond), base)


def test_attach_depends_only_on_the_rng_state(make) -> None:
    a, b, c = make("tiny"), make("tiny"), make("tiny")
    torch.manual_seed(5)
    pa = attach_lora(a, SPEC)
    torch.manual_seed(5)
    pb = attach_lora(b, SPEC)
    torch.manual_seed(6)
    pc = attach_lora(c, SPEC)
    assert all(torch.equal(x, y) for x, y in zip(pa, pb, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(pa, pc, strict=True))


def test_attach_default_spec_and_dtype_none(make) -> None:
    model = make("tiny", dtype=torch.bfloat16)
    params = attach_lora(model, dtype=None)
    assert attached_spec(model) == LoraSpec()
    assert {p.dtype for p in params} == {torch.bfloat16}
    model = make("tiny", dtype=torch.bfloat16)
    assert {p.dtype for p in attach_lora(model)} == {torch.float32}  # trainable in fp32
    z, cond = inputs(model, "tiny")
    try:
        out = velocity(model, z.bfloat16(), cond)
    except RuntimeError as err:  # a torch limitation, not this library's
        if "pack_vnni2" in str(err) and os.environ.get("ATEN_CPU_CAPABILITY") == "default":
            pytest.skip("torch: bfloat16 attention under ATEN_CPU_CAPABILITY=default on an "
                        "AVX-512 CPU calls an AVX-512-only packing (pack_vnni2)")  # fmt: skip
        raise
    assert out.dtype == torch.bfloat16


@pytest.mark.parametrize("kind", KINDS)
def test_perturbed_adapter_changes_output_and_disabled_restores_base(make, kind) -> None:
    model = make(kind)
    z, cond = inputs(model, kind)
    base = velocity(model, z, cond)
    params = attach_lora(model, SPEC)
    perturb(params)
    adapted = velocity(model, z, cond)
    assert (adapted - base).abs().max() > 1e-3
    with adapter_disabled(model) as m:
        assert m is model
        assert torch.equal(velocity(model, z, cond), base)
    assert torch.equal(velocity(model, z, cond), adapted)
    assert all(p.requires_grad for p in params)
    with pytest.raises(RuntimeError, match="boom"), adapter_disabled(model):
        raise RuntimeError("boom")
    assert torch.equal(velocity(model, z, cond), adapted)
    assert all(p.requires_grad for p in params)


@pytest.mark.filterwarnings("ignore:GraphedCallable:RuntimeWarning")  # CPU: graphs run eagerly
def test_graphed_forward_gets_a_separate_base_callable(make, monkeypatch) -> None:
    """With CUDA graphs, the base model must not replay graphs captured with the adapter on:
    adapter_disabled swaps in a second GraphedCallable (same config, kept across blocks), and
    attach_lora drops graphs captured before the adapter existed."""
    from smartgrpo_fast.graphs import GraphConfig, GraphedCallable

    config = GraphConfig(backend="graph", buckets=(1,))
    model = make("tiny", graph=config)
    z, cond = inputs(model, "tiny")
    base = velocity(model, z, cond)
    outer = model._forward
    resets = []
    monkeypatch.setattr(outer, "reset", lambda: resets.append(1))
    perturb(attach_lora(model, SPEC))
    assert resets == [1]
    adapted = velocity(model, z, cond)
    seen = []
    for _ in range(2):
        with adapter_disabled(model):
            seen.append(model._forward)
            assert torch.equal(velocity(model, z, cond), base)
        assert model._forward is outer
    assert isinstance(seen[0], GraphedCallable) and seen[0] is seen[1] and seen[0] is not outer
    assert seen[0].config == config
    assert torch.equal(velocity(model, z, cond), adapted)


def test_gradients_reach_only_the_adapter(make) -> None:
    model = make("tiny")
    z, cond = inputs(model, "tiny")
    params = attach_lora(model, SPEC)
    perturb(params)
    model.velocity(z, 0.7, cond).square().mean().backward()
    assert all(p.grad is not None for p in params)
    # The last block's text-query projection is dead (its text outputs are dropped:
    # context_pre_only); every other adapter weight gets a gradient.
    zero = {n for n, p in model.transformer.named_parameters()
            if p.requires_grad and p.grad.abs().sum() == 0}  # fmt: skip
    last = model.arch.layers - 1
    assert zero == {f"transformer_blocks.{last}.attn.add_q_proj.lora_{ab}.default.weight"
                    for ab in "AB"}  # fmt: skip
    assert all(p.grad is None for p in model.transformer.parameters() if not p.requires_grad)
    with adapter_disabled(model):  # the KL reference: no graph to the adapter
        assert not model.velocity(z, 0.7, cond).requires_grad


def test_dropout_follows_the_transformer_mode(make) -> None:
    model = make("tiny")
    z, cond = inputs(model, "tiny")
    perturb(attach_lora(model, LoraSpec(rank=4, alpha=8.0, dropout=0.5)))
    first = velocity(model, z, cond)
    assert torch.equal(velocity(model, z, cond), first)  # eval mode: dropout off
    model.transformer.train()
    assert not torch.equal(velocity(model, z, cond), first)


# ---------------------------------------------------------------------- peft folder


@pytest.mark.parametrize("kind", KINDS)
def test_save_load_round_trip_is_exact(make, kind, tmp_path) -> None:
    model = make(kind)
    z, cond = inputs(model, kind)
    perturb(attach_lora(model, SPEC))
    adapted = velocity(model, z, cond)
    assert save_adapter(model, tmp_path, SPEC) == tmp_path
    assert sorted(p.name for p in tmp_path.iterdir()) == [ADAPTER_CONFIG, ADAPTER_WEIGHTS]
    assert read_adapter_spec(tmp_path) == SPEC

    fresh = make(kind)
    state = torch.random.get_rng_state()
    assert load_adapter(fresh, tmp_path) == SPEC
    assert torch.equal(torch.random.get_rng_state(), state)  # loading draws nothing
    assert torch.equal(velocity(fresh, z, cond), adapted)
    assert all(p.requires_grad for p in lora_parameters(fresh))

    via_loader = make(kind, lora=tmp_path)  # from_pretrained(lora=...) / models.load
    assert attached_spec(via_loader) == SPEC
    assert torch.equal(velocity(via_loader, z, cond), adapted)


def test_models_load_tiny_with_lora(make, tmp_path) -> None:
    model = make("tiny")
    z, cond = inputs(model, "tiny")
    perturb(attach_lora(model, SPEC))
    save_adapter(model, tmp_path)
    loaded = models.load("tiny", lora=str(tmp_path))
    assert torch.equal(velocity(loaded, z, cond), velocity(model, z, cond))


def test_load_into_an_attached_adapter_keeps_its_parameters(make, tmp_path) -> None:
    model = make("tiny")
    z, cond = inputs(model, "tiny")
    perturb(attach_lora(model, SPEC))
    save_adapter(model, tmp_path)
    target = make("tiny")
    params = attach_lora(target, SPEC)
    assert not torch.equal(velocity(target, z, cond), velocity(model, z, cond))
    load_adapter(target, tmp_path)
    assert [id(p) for p in lora_parameters(target)] == [id(p) for p in params]
    assert torch.equal(velocity(target, z, cond), velocity(model, z, cond))
    other = make("tiny")
    attach_lora(other, LoraSpec(rank=8, alpha=8.0))
    with pytest.raises(ValueError, match="the model has LoraSpec"):
        load_adapter(other, tmp_path)


def test_save_writes_what_peft_model_writes(make, tmp_path) -> None:
    """Same files, keys, dtypes and config as PeftModel.save_pretrained on the same adapter."""
    model = make("tiny")
    perturb(attach_lora(model, SPEC))
    save_adapter(model, tmp_path / "ours")
    ref_tr = make("tiny").transformer
    ref = peft.get_peft_model(ref_tr, SPEC.as_peft_config())
    ref.save_pretrained(tmp_path / "ref")
    ours_w = load_file(tmp_path / "ours" / ADAPTER_WEIGHTS)
    ref_w = load_file(tmp_path / "ref" / ADAPTER_WEIGHTS)
    assert ours_w.keys() == ref_w.keys()
    assert all(ours_w[k].shape == ref_w[k].shape and ours_w[k].dtype == ref_w[k].dtype
               for k in ref_w)  # fmt: skip
    ours_c = json.loads((tmp_path / "ours" / ADAPTER_CONFIG).read_text())
    ref_c = json.loads((tmp_path / "ref" / ADAPTER_CONFIG).read_text())
    assert ours_c["target_modules"] == list(SPEC.targets)  # the spec's order is kept
    assert set(ref_c["target_modules"]) == set(SPEC.targets)
    assert {k: v for k, v in ours_c.items() if k != "target_modules"} == {
        k: v for k, v in ref_c.items() if k != "target_modules"
    }
    # and a folder PeftModel wrote (targets in a set's order) loads into our model
    assert load_adapter(make("tiny"), tmp_path / "ref").same_adapter(SPEC)


@pytest.mark.parametrize("kind", KINDS)
def test_peft_model_reads_our_folder(make, kind, tmp_path) -> None:
    model = make(kind)
    z, cond = inputs(model, kind)
    perturb(attach_lora(model, SPEC))
    save_adapter(model, tmp_path)
    fresh = make(kind)
    peft_model = peft.PeftModel.from_pretrained(fresh.transformer, tmp_path)
    assert peft_model.peft_config["default"].lora_alpha == SPEC.alpha
    assert torch.equal(velocity(fresh, z, cond), velocity(model, z, cond))


# ------------------------------------------------------------------ diffusers format


def test_diffusers_lora_round_trip(make, sd3_dir, tmp_path) -> None:
    from diffusers import StableDiffusion3Pipeline

    model = make("sd3")
    z, cond = inputs(model, "sd3")
    base = velocity(model, z, cond)
    perturb(attach_lora(model, SPEC))
    adapted = velocity(model, z, cond)
    path = save_diffusers_lora(model, tmp_path, SPEC)
    assert path == tmp_path / DIFFUSERS_WEIGHTS and path.is_file()
    assert all(k.startswith("transformer.") for k in load_file(path))

    pipe = StableDiffusion3Pipeline.from_pretrained(sd3_dir, dtype=torch.float32)
    pipe.load_lora_weights(tmp_path)
    theirs = velocity(SD3FlowModel(pipe), z, cond)
    assert (adapted - base).abs().max() > 1e-2  # the adapter matters ...
    assert_close(theirs, adapted, atol=1e-6, rtol=1e-6, name="diffusers-loaded velocity")


# ---------------------------------------------------------------------------- errors


def test_unknown_target_is_an_error_and_leaves_the_model_alone(make) -> None:
    model = make("tiny")
    spec = LoraSpec(targets=("attn.to_q", "attn.to_qq"))
    with pytest.raises(ValueError, match=r"^targets: \['attn.to_qq'\] match no module"):
        attach_lora(model, spec)
    assert attached_spec(model) is None
    assert not any(".lora_" in n for n, _ in model.transformer.named_parameters())
    with pytest.raises(ValueError, match=r"^targets: .*Linear layers only"):
        attach_lora(model, LoraSpec(targets=("norm1",)))  # AdaLayerNormZero
    attach_lora(model, LoraSpec(targets=("attn.to_q",)))  # still attachable


def test_attach_twice_and_missing_adapter_are_errors(make, tmp_path) -> None:
    model = make("tiny")
    with pytest.raises(ValueError, match=r"^model: .*no LoRA adapter"), adapter_disabled(model):
        pass
    with pytest.raises(ValueError, match=r"^model: .*no LoRA adapter"):
        save_adapter(model, tmp_path)
    with pytest.raises(ValueError, match=r"^model: .*no LoRA adapter"):
        lora_parameters(model)
    attach_lora(model, SPEC)
    with pytest.raises(ValueError, match=r"^model: .*already has a LoRA adapter"):
        attach_lora(model, SPEC)
    with pytest.raises(ValueError, match=r"^spec: .*differs"):
        save_adapter(model, tmp_path, LoraSpec(rank=4, alpha=4.0))
    with pytest.raises(TypeError, match=r"^spec: "):
        attach_lora(make("tiny"), {"rank": 4})
    with pytest.raises(TypeError, match=r"^model: "):
        attach_lora(object(), SPEC)


def test_missing_files_are_named(make, tmp_path) -> None:
    model = make("tiny")
    with pytest.raises(FileNotFoundError, match=ADAPTER_CONFIG):
        read_adapter_spec(tmp_path)
    with pytest.raises(FileNotFoundError, match=ADAPTER_CONFIG):
        load_adapter(model, tmp_path)
    with pytest.raises(FileNotFoundError, match=ADAPTER_CONFIG):
        models.load("tiny", lora=tmp_path)
    perturb(attach_lora(model, SPEC))
    save_adapter(model, tmp_path)
    (tmp_path / ADAPTER_WEIGHTS).unlink()
    fresh = make("tiny")
    with pytest.raises(FileNotFoundError, match=ADAPTER_WEIGHTS):
        load_adapter(fresh, tmp_path)
    assert attached_spec(fresh) is None


def _rewrite(folder: Path, edit) -> None:
    state = load_file(folder / ADAPTER_WEIGHTS)
    edit(state)
    save_file(state, folder / ADAPTER_WEIGHTS)


@pytest.mark.parametrize("damage", ["extra", "missing", "shape"])
def test_load_is_strict(make, tmp_path, damage) -> None:
    model = make("tiny")
    attach_lora(model, SPEC)
    save_adapter(model, tmp_path)
    key = sorted(load_file(tmp_path / ADAPTER_WEIGHTS))[0]
    if damage == "extra":
        _rewrite(
            tmp_path,
            lambda s: s.__setitem__("base_model.model.extra.lora_A.weight", s[key].clone()),
        )
        match = "1 unexpected"
    elif damage == "missing":
        _rewrite(tmp_path, lambda s: s.pop(key))
        match = "1 missing"
    else:
        _rewrite(tmp_path, lambda s: s.__setitem__(key, s[key][:, :-1].contiguous()))
        match = "wrong shape"
    fresh = make("tiny")
    with pytest.raises(ValueError, match=match):
        load_adapter(fresh, tmp_path)
    assert attached_spec(fresh) is None  # checked before anything was injected


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        ({"use_rslora": True}, "use_rslora"),
        ({"use_dora": True}, "use_dora"),
        ({"rank_pattern": {"attn.to_q": 8}}, "rank_pattern"),
        ({"peft_type": "LOHA"}, "peft_type"),
        ({"target_modules": ".*attn.*"}, "target_modules"),
        ({"r": 0}, "rank"),
        ({"lora_alpha": -1}, "alpha"),
    ],
)
def test_read_spec_refuses_configs_it_cannot_describe(make, tmp_path, edit, match) -> None:
    model = make("tiny")
    attach_lora(model, SPEC)
    save_adapter(model, tmp_path)
    cfg = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    (tmp_path / ADAPTER_CONFIG).write_text(json.dumps(cfg | edit))
    with pytest.raises(ValueError, match=match):
        read_adapter_spec(tmp_path)
