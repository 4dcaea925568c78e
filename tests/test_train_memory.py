"""Full-size steps without weights: the memory estimate's arithmetic, the error that names the
setting to lower, random-weight SD3 models and ImageReward at full size."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import SD35_TINY_STEP

from smartgrpo_fast import models, rewards
from smartgrpo_fast.ops import philox_normal
from smartgrpo_fast.sde import flow_sigmas, integrate_ode
from smartgrpo_fast.train.config import ConfigError, load_config
from smartgrpo_fast.train.data import eval_prompts
from smartgrpo_fast.train.evaluate import EvalConfig, evaluate
from smartgrpo_fast.train.memory import (
    DECODE_BYTES_PER_PIXEL,
    FWD_LIVE,
    MARGIN,
    PREVIEW_DECODE_BYTES_PER_PIXEL,
    TRAIN_LIVE,
    StepShape,
    check_fits,
    estimate_step_memory,
)
from smartgrpo_fast.train.trainer import GRPOTrainer

GIB = 2**30
#: SD3.5-medium at 512 px with 128 T5 tokens, bf16.
SD35_512 = StepShape(layers=24, width=1536, image_tokens=32 * 32, text_tokens=77 + 128,
                     latent_elems=16 * 64 * 64, image_pixels=512 * 512, act_bytes=2)  # fmt: skip
#: The sd35-medium config's step: 4 prompts x 8 rollouts, window 2, K 8, micro-batch 4.
STEP = dict(rows=32, window=2, search_k=8, micro_batch=4, gradient_checkpointing=True, kl=True,
            ema=True)  # fmt: skip


def test_estimate_arithmetic_written_out() -> None:
    est = estimate_step_memory(SD35_512, resident_bytes=7 * GIB, trainable_bytes=10**8,
                               rollout_batch=4, graphs=True, **STEP)  # fmt: skip
    hidden = (1024 + 205) * 1536 * 2  # one row's hidden states at one layer, bytes
    decode = 512 * 512 * DECODE_BYTES_PER_PIXEL  # one 512 px image through the VAE
    assert est.parts == {
        "resident": 7 * GIB,
        "optimizer": 10**8 * (1 + 2 + 1),  # gradient, AdamW's two moments, EMA
        "rollout_store": 32 * (2 * 2 * 16 * 64 * 64 + 3 * 512 * 512) * 4,
        "search": 4 * 8 * (hidden * FWD_LIVE + decode),
        "rollout": 4 * (hidden * FWD_LIVE + decode),
        "training": 4 * hidden * (2 * 24 + TRAIN_LIVE) + 4 * hidden * FWD_LIVE,
    }
    assert est.peak == math.ceil(MARGIN * sum(est.parts.values()))  # graphs: all phases held
    eager = estimate_step_memory(SD35_512, resident_bytes=7 * GIB, trainable_bytes=10**8,
                                 rollout_batch=4, graphs=False, **STEP)  # fmt: skip
    fixed = sum(eager.parts[k] for k in ("resident", "optimizer", "rollout_store"))
    phases = max(eager.parts[k] for k in ("search", "rollout", "training"))
    assert eager.peak == math.ceil(MARGIN * (fixed + phases)) < est.peak
    # no checkpointing: every layer's activations; random noise: no search
    plain = estimate_step_memory(SD35_512, resident_bytes=0, trainable_bytes=0, rollout_batch=4,
                                 graphs=False, **{**STEP, "gradient_checkpointing": False,
                                                  "kl": False, "search_k": 0})  # fmt: skip
    assert plain.parts["training"] == 4 * hidden * TRAIN_LIVE * 24
    assert plain.parts["search"] == 0
    # guidance doubles the transformer rows of sampling, not the decodes
    cfg = estimate_step_memory(SD35_512, resident_bytes=0, trainable_bytes=0, rollout_batch=4,
                               graphs=True, guidance=True, **STEP)  # fmt: skip
    assert cfg.parts["rollout"] == 4 * (2 * hidden * FWD_LIVE + decode)


def test_a_preview_decoder_prices_the_search_decodes_at_its_own_cost() -> None:
    """With ``model.preview_decoder`` the search round's B*K decodes cost the preview
    decoder's bytes per pixel in the transformer's dtype (bf16: half the float32 figure);
    the rollout's final decodes stay the VAE's. The sd35-medium step at sample.batch 8 then
    fits 80 GiB (~33 GiB instead of ~97)."""
    from dataclasses import replace

    kw = dict(resident_bytes=int(7.5 * GIB), trainable_bytes=2 * 10**8, graphs=True, **STEP)
    preview = replace(SD35_512, preview=True)
    hidden = (1024 + 205) * 1536 * 2
    vae = 512 * 512 * DECODE_BYTES_PER_PIXEL
    tiny = 512 * 512 * PREVIEW_DECODE_BYTES_PER_PIXEL * 2 // 4  # bf16
    for b in (4, 8):
        est = estimate_step_memory(preview, rollout_batch=b, **kw)
        ref = estimate_step_memory(SD35_512, rollout_batch=b, **kw)
        assert est.parts["search"] == b * 8 * (hidden * FWD_LIVE + tiny)
        assert ref.parts["search"] == b * 8 * (hidden * FWD_LIVE + vae)
        assert est.parts["rollout"] == ref.parts["rollout"] == b * (hidden * FWD_LIVE + vae)
        assert {k: v for k, v in est.parts.items() if k != "search"} == {
            k: v for k, v in ref.parts.items() if k != "search"
        }
        assert est.peak == math.ceil(MARGIN * sum(est.parts.values()))
    check_fits(estimate_step_memory(preview, rollout_batch=8, **kw), 80 * GIB, "an 80 GB GPU")
    fp32 = replace(preview, act_bytes=4)
    est = estimate_step_memory(fp32, rollout_batch=4, **kw)
    assert est.parts["search"] == 4 * 8 * (
        2 * hidden * FWD_LIVE + 512 * 512 * PREVIEW_DECODE_BYTES_PER_PIXEL
    )
    # the advice names the preview decoder only where there is none
    assert (
        "model.preview_decoder"
        in estimate_step_memory(SD35_512, rollout_batch=8, **kw).knobs["search"]
    )
    assert "model.preview_decoder" not in est.knobs["search"]


def test_the_error_names_the_setting_to_lower() -> None:
    """At 80 GiB the sd35-medium step fits with sample.batch 4 (~54 GiB) and not with 8 (~97
    GiB: the search's B*K decodes); without gradient checkpointing a micro-batch of 32 (47 GiB
    of activations) names that setting on a 48 GB GPU."""
    kw = dict(resident_bytes=int(7.5 * GIB), trainable_bytes=2 * 10**8, graphs=True, **STEP)
    check_fits(estimate_step_memory(SD35_512, rollout_batch=4, **kw), 80 * GIB, "an 80 GB GPU")
    big = estimate_step_memory(SD35_512, rollout_batch=8, **kw)
    with pytest.raises(
        ConfigError,
        match=r"^sample\.batch: a step needs about .* GiB .* but an "
        r"80 GB GPU has 80\.0 GiB; the largest part is "
        r"search .*: sample\.batch: lower it",
    ):
        check_fits(big, 80 * GIB, "an 80 GB GPU")
    check_fits(big, 141 * GIB, "an H200")
    no_ckpt = estimate_step_memory(
        SD35_512,
        rollout_batch=1,
        **{**kw, "graphs": False, "gradient_checkpointing": False, "micro_batch": 32},
    )
    with pytest.raises(
        ConfigError,
        match=r"^model\.gradient_checkpointing: .* the largest part "
        r"is training .*: set it to true",
    ):
        check_fits(no_ckpt, 48 * GIB, "a 48 GB GPU")


def test_random_sd3_model_has_the_protocol_and_fixed_prompt_embeddings() -> None:
    from smartgrpo_fast.models.sd3 import SD3Config, SD3FlowModel

    m = models.load("random:sd3-tiny", dtype=torch.float32,
                    config=SD3Config(guidance_scale=2.0, max_sequence_length=16))  # fmt: skip
    assert isinstance(m, SD3FlowModel) and m.time_shift == 3.0 and m.name == "random:sd3-tiny"
    c = m.encode_prompts(["a cat", "a dog"])
    assert c.prompt_embeds.shape == (2, 77 + 16, 32) and c.pooled.shape == (2, 64)
    assert c.has_negative and not torch.equal(c.prompt_embeds, c.negative_prompt_embeds)
    again = m.encode_prompts(["a dog"])
    assert torch.equal(again.prompt_embeds[0], c.prompt_embeds[1])
    assert not torch.equal(c.prompt_embeds[0], c.prompt_embeds[1])
    v = m.velocity(torch.randn(2, *m.latent_shape), 0.5, c)
    assert v.shape == (2, *m.latent_shape) and torch.isfinite(v).all()
    with pytest.raises(ValueError, match=r"random:sd35-medium or random:sd3-tiny"):
        models.load("random:sd4")


def test_random_imagereward_has_the_checkpoints_architecture() -> None:
    """Built through the trainer's path (reward spec + reward_args.random), on the meta device:
    every tensor has the shape the real ImageReward.pt gives the same classes."""
    fixture = Path(__file__).parent / "fixtures" / "imagereward"
    keys = json.loads((fixture / "keys.json").read_text())
    med = json.loads((fixture / "med_config.json").read_text())
    from smartgrpo_fast.rewards.imagereward import ImageRewardModel

    sd = {k: torch.arange(s[-1]).expand(s).clone() if dt == "int64"
          else torch.empty(s, device="meta") for k, s, dt in keys}  # fmt: skip
    real = ImageRewardModel.from_state_dict(sd, med, tokenizer=fixture / "vocab", device="meta")
    rand = rewards.reward_from_spec("imagereward", device="meta", random=True)

    def shapes(m: torch.nn.Module) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in m.state_dict().items()}

    for part in ("vision", "text", "head"):
        assert shapes(getattr(rand, part)) == shapes(getattr(real, part)), part
    assert rand.image_size == 224
    enc = rand.tokenizer(["a red circle on a blue background"], padding="max_length",
                         truncation=True, max_length=35, return_tensors="pt")  # fmt: skip
    assert enc["input_ids"].shape == (1, 35) and int(enc["input_ids"].max()) < 30524
    with pytest.raises(ValueError, match="do not also give checkpoint"):
        rewards.load("imagereward", random=True, checkpoint="x.pt")


_STEP = SD35_TINY_STEP


def test_sd35_config_on_a_random_model_checks_memory_then_steps(tmp_path) -> None:
    """The sd35-medium config with model.name=random:... (the full-size command's path, at the
    tiny size): too small a memory limit is a ConfigError naming a setting, before the run
    folder exists; a generous one gives an estimate and a step whose ratio is 1."""
    small = load_config("sd35-medium", [*_STEP, "train.memory_limit_gib=0.001"])
    with pytest.raises(
        ConfigError,
        match=r"^[a-z_.]+: a step needs about .* but "
        r"train\.memory_limit_gib = 0\.001 has",
    ):
        GRPOTrainer(small, tmp_path / "small")
    assert not (tmp_path / "small").exists()
    cfg = load_config("sd35-medium", [*_STEP, "train.memory_limit_gib=64"])
    t = GRPOTrainer(cfg, tmp_path / "run")
    assert t.memory_estimate is not None and 0 < t.memory_estimate.peak < 64 * GIB
    t.train()
    (line,) = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert line["logp_diff_max"] < 1e-5 and len(line["sde_steps"]) == 2


def test_final_latents_are_unscaled_before_the_vae(tmp_path) -> None:
    """SD3's latents live in the VAE's scaled space (x / 1.5305 + 0.0609 is what the VAE
    decodes, as in diffusers' pipeline and Flow-GRPO): the rollouts' and the evaluation's
    images are the decode of the un-scaled final latent, recomputed here from the stored
    trajectory."""
    cfg = load_config("sd35-medium", [*_STEP, "noise=random"])
    t = GRPOTrainer(cfg, tmp_path / "run")
    try:
        m = t.model
        assert (m.scaling_factor, m.shift_factor) == (1.5305, 0.0609)
        ro = t.rollouts(1)
        last = ro.sde_steps[-1]
        with torch.no_grad():
            x0 = integrate_ode(m, ro.cond, ro.next_latents[:, -1], ro.sigmas[last + 1 :])
            want = m.decode(x0 / 1.5305 + 0.0609)
        torch.testing.assert_close(ro.images, want, atol=1e-5, rtol=1e-5)
        assert (ro.images - m.decode(x0)).abs().max() > 1e-3  # the scale matters
        prompts = eval_prompts("tiny", 2)
        res = evaluate(m, t.reward, prompts, EvalConfig(steps=2, batch=2))
        z = philox_normal((2, 1, *m.latent_shape), seed=EvalConfig().seed, round=0).flatten(0, 1)
        with torch.no_grad():
            x0 = integrate_ode(m, m.encode_prompts(prompts), z, flow_sigmas(2, 3.0).tolist())
            torch.testing.assert_close(res.images, m.decode(x0 / 1.5305 + 0.0609))
    finally:
        t.close()


def test_gradient_checkpointing_gives_the_lora_the_same_gradient(tmp_path) -> None:
    """The sd35-medium config checkpoints the transformer's activations (recomputed in the
    backward pass): the adapter's gradient, KL included, is the one without checkpointing
    (a checkpoint whose inputs need no grad would silently give none)."""
    grads = {}
    for ckpt in ("false", "true"):
        cfg = load_config("sd35-medium", [*_STEP, "noise=random", "sample.group_size=4",
                                          "train.micro_batch=4", "train.kl_beta=0.01",
                                          f"model.gradient_checkpointing={ckpt}"])  # fmt: skip
        t = GRPOTrainer(cfg, tmp_path / f"run-{ckpt}")
        try:
            with torch.no_grad():
                for p in t.params:
                    p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(7)))
            assert t.model.transformer.is_gradient_checkpointing == (ckpt == "true")
            ro = t.rollouts(1)
            t.backward(ro, torch.tensor([1.0, -1.0, 0.5, -0.5]))
            grads[ckpt] = torch.cat([p.grad.flatten() for p in t.params])
        finally:
            t.close()
    assert grads["false"].abs().max() > 0
    torch.testing.assert_close(grads["true"], grads["false"], rtol=1e-5, atol=1e-9)


def test_train_cli_refuses_a_step_that_does_not_fit_in_one_line(tmp_path, capsys) -> None:
    from smartgrpo_fast.cli import main

    out = tmp_path / "run"
    code = main(["train", "--config", "sd35-medium", "--out", str(out), *_STEP,
                 "train.memory_limit_gib=0.001"])  # fmt: skip
    assert code == 2 and not out.exists()
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("smartgrpo-fast train: error: ") and "a step needs about" in line
    assert ": lower it" in line or ": set it to true" in line


def test_resident_bytes_count_a_tensor_subclass_by_its_inner_tensors() -> None:
    """A quantized weight (torchao's Float8Tensor: a wrapper subclass, here torch's TwoTensor) is
    counted by the tensors it flattens to; a tensor shared by two modules counts once."""
    from torch.testing._internal.two_tensor import TwoTensor

    from smartgrpo_fast.train.trainer import _module_bytes

    plain = torch.nn.Linear(4, 4)  # 16 + 4 float32: 80 bytes
    quantized = torch.nn.Linear(4, 4)
    inner = torch.zeros(4, 4), torch.ones(4, 4)  # 64 + 64 bytes
    quantized.weight = torch.nn.Parameter(TwoTensor(*inner), requires_grad=False)
    quantized.bias = plain.bias  # shared
    assert _module_bytes(plain) == 80
    assert _module_bytes(quantized) == 64 + 64 + 16
    assert _module_bytes(plain, quantized) == 80 + 64 + 64
