"""The trainer's pure parts: config and overrides, draw keys, prompts, advantages, the loss,
atomic checkpoints."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from smartgrpo_fast.models.lora import LoraSpec
from smartgrpo_fast.train import checkpoint as ckpt
from smartgrpo_fast.train.config import (
    ConfigError,
    LogConfig,
    RunConfig,
    SampleConfig,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    load_config,
    shipped_configs,
)
from smartgrpo_fast.train.data import (
    EVAL_PROMPT_SEED,
    PromptSource,
    derive_seed,
    eval_prompts,
    read_prompt_file,
)
from smartgrpo_fast.train.loss import group_advantages, policy_terms
from smartgrpo_fast.train.rollout import sde_window

# ----------------------------------------------------------------------------- config


def test_shipped_configs_parse_and_round_trip() -> None:
    assert {"tiny", "tiny-align", "sd35-medium"} <= set(shipped_configs())
    for name in shipped_configs():
        cfg = load_config(name)
        assert isinstance(cfg, RunConfig)
        assert config_from_dict(config_to_dict(cfg)) == cfg


def test_tiny_align_config_is_the_prompt_match_reward_at_gpu_scale() -> None:
    """tiny-align: the embedded model and its prompt-match reward at benchmarks/gpu_lease.sh's
    train_scale size (sample.prompts_per_step=64 sample.batch=256 train.micro_batch=256
    train.steps=200 train.save_every=25 eval.every=50, CUDA)."""
    cfg = load_config("tiny-align")
    assert cfg.model.name == "tiny" and cfg.reward == "tiny" and cfg.device == "cuda"
    assert cfg.sample.prompts_per_step * cfg.sample.group_size == 512
    assert (cfg.sample.batch, cfg.train.micro_batch) == (256, 256)
    assert (cfg.train.steps, cfg.train.save_every, cfg.eval.every) == (200, 25, 50)
    assert "tiny-align" in shipped_configs()


def test_tiny_config_values() -> None:
    cfg = load_config("tiny")
    assert cfg.model.name == "tiny" and cfg.reward == "shape-area" and cfg.noise == "smart"
    assert cfg.train.lr == pytest.approx(1e-3)  # written 1.0e-3 in YAML
    assert cfg.sample.shared_initial_noise and not SampleConfig().shared_initial_noise
    assert isinstance(cfg.lora, LoraSpec)
    # every run folder gets tensorboard/ unless a config turns it off
    assert cfg.log.tensorboard and LogConfig().tensorboard


def test_sd35_config_is_flow_grpo_fast_like() -> None:
    cfg = load_config("sd35-medium")
    assert cfg.sample.sde_type == "cps" and cfg.sample.noise_level == 0.8
    assert cfg.sample.sde_window_size == 2 and cfg.sample.sde_window_range == (0, 5)
    assert cfg.model.guidance_scale == 1.0 and cfg.model.resolution == 512
    assert cfg.train.clip_range == pytest.approx(1e-5) and cfg.reward == "imagereward"
    assert cfg.lora.rank == 32 and cfg.lora.alpha == 64.0 and cfg.model.gradient_checkpointing


def test_overrides_set_nested_values_with_yaml_types() -> None:
    cfg = load_config(
        "tiny",
        ["seed=3", "noise=random", "train.steps=3", "search.k=4", "search.top=2",
         "sample.sde_window_range=[0, 4]", "train.ema_decay=0.9", "lora=null",
         "train.lr=1e-4"],
    )  # fmt: skip
    assert cfg.seed == 3 and cfg.noise == "random" and cfg.train.steps == 3
    assert cfg.search.k == 4 and cfg.sample.sde_window_range == (0, 4)
    assert cfg.train.ema_decay == 0.9 and cfg.lora is None and cfg.train.lr == 1e-4


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("train.stepz=3", "train.stepz"),
        ("bogus=1", "bogus"),
        ("search.k=0", "search.k"),
        ("search.top=99", "search.top"),
        ("noise=fancy", "noise"),
        ("train.steps=abc", "train.steps"),
        ("train.lr=-1", "train.lr"),
        ("sample.group_size=1", "sample.group_size"),
        ("sample.sde_window_range=[4, 5]", "sample.sde_window_range"),
        ("sample.sde_type=ode", "sample.sde_type"),
        ("sample.search_steps=0", "sample.search_steps"),
        ("sample.search_steps=3", "sample.search_steps"),  # more than the window's 2
        ("sample.search_steps=true", "sample.search_steps"),
        ("sample.search_steps_at=middle", "sample.search_steps_at"),
        ("search_reward_args=[1]", "search_reward_args"),
        ("sample.sde_type=cps", "sample.sde_window_range"),  # window [0, 5) reaches t = 0
        ("lora.rank=0", "lora.rank"),
        ("model=null", "model"),
        ("log.tensorboard=maybe", "log.tensorboard"),
        ("eval.images_per_prompt=0", "eval.images_per_prompt"),
        ("steps", "steps"),
    ],
)
def test_bad_key_or_value_names_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{key}"):
        load_config("tiny", ["sample.sde_window_size=2", "sample.sde_window_range=[0, 10]",
                             override])  # fmt: skip


def test_unknown_config_file_is_an_error(tmp_path) -> None:
    with pytest.raises(ConfigError, match="config"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)


def test_apply_overrides_does_not_mutate_its_input() -> None:
    data = {"train": {"steps": 1}}
    out = apply_overrides(data, ["train.steps=2"])
    assert data == {"train": {"steps": 1}} and out == {"train": {"steps": 2}}


# ----------------------------------------------------------------------------- draw keys, data


def test_derive_seed_is_stable_distinct_and_in_range() -> None:
    a = derive_seed(0, "x_T", 1)
    assert a == derive_seed(0, "x_T", 1)
    seeds = {derive_seed(s, tag, step) for s in range(3) for tag in ("x_T", "eps")
             for step in range(50)}  # fmt: skip
    assert len(seeds) == 300
    assert all(0 <= s < 2**63 for s in seeds)


def test_sde_window_is_keyed_and_inside_its_range() -> None:
    starts = set()
    for step in range(1, 200):
        w = sde_window(7, step, 2, 1, 6)
        assert w == sde_window(7, step, 2, 1, 6)
        assert len(w) == 2 and w[0] >= 1 and w[-1] <= 5 and w[1] == w[0] + 1
        starts.add(w[0])
    assert starts == {1, 2, 3, 4}  # every allowed start is drawn
    with pytest.raises(ValueError, match="sde_window_range"):
        sde_window(0, 1, 3, 0, 2)


def test_tiny_prompt_source_is_keyed_by_seed_and_step() -> None:
    src = PromptSource("tiny", seed=5)
    a = src.batch(3, 4)
    assert a == PromptSource("tiny", seed=5).batch(3, 4) and len(a) == 4
    assert a != src.batch(4, 4)
    assert eval_prompts("tiny", 6) == eval_prompts("tiny", 6)
    from smartgrpo_fast.shapes import sample_prompts

    assert eval_prompts("tiny", 6) == sample_prompts(6, EVAL_PROMPT_SEED)


def test_file_prompt_source_covers_each_prompt_once_per_pass(tmp_path) -> None:
    f = tmp_path / "p.txt"
    f.write_text("a\n\nb\nc\n d \ne\n")
    assert read_prompt_file(f) == ["a", "b", "c", "d", "e"]
    src = PromptSource(str(f), seed=0)
    first_pass = src.batch(1, 2) + src.batch(2, 2) + src.batch(3, 2)[:1]
    assert sorted(first_pass) == ["a", "b", "c", "d", "e"]


def test_jsonl_prompts_and_errors(tmp_path) -> None:
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"prompt": "x"}) + "\n\n" + json.dumps({"prompt": "y", "k": 1}) + "\n")
    assert read_prompt_file(f) == ["x", "y"]
    f.write_text(json.dumps({"text": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"p\.jsonl:1"):
        read_prompt_file(f)
    with pytest.raises(FileNotFoundError, match="nope"):
        read_prompt_file(tmp_path / "nope.txt")


# ----------------------------------------------------------------------------- advantages, loss


def _reference_advantages(r, g, clip, global_std=False):
    out = torch.zeros_like(r, dtype=torch.float64)
    fin = torch.isfinite(r)
    all_std = r[fin].double().std(unbiased=False)
    for gid in g.unique():
        m = (g == gid) & fin
        vals = r[m].double()
        std = all_std if global_std else vals.std(unbiased=False)
        out[m] = ((vals - vals.mean()) / (std + 1e-4)).clamp(-clip, clip)
    return out.float()


@pytest.mark.parametrize("global_std", [False, True])
def test_group_advantages_match_a_loop(global_std: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    r = torch.randn(24, generator=gen) * 3
    g = torch.arange(4).repeat_interleave(6)[torch.randperm(24, generator=gen)]
    adv = group_advantages(r, g, adv_clip=1.5, global_std=global_std)
    torch.testing.assert_close(adv.values, _reference_advantages(r, g, 1.5, global_std))
    assert adv.nonfinite == 0 and adv.zero_std_frac == 0.0
    assert float(adv.values.abs().max()) <= 1.5


def test_group_advantages_nonfinite_rewards_get_zero_and_are_counted() -> None:
    r = torch.tensor([1.0, float("nan"), 3.0, float("inf"), 2.0, 2.0, float("nan"), 5.0])
    g = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2])
    adv = group_advantages(r, g)
    assert adv.nonfinite == 3
    assert adv.values[1] == 0 and adv.values[3] == 0 and adv.values[6] == 0
    assert torch.isfinite(adv.values).all()
    # group 0: finite {1, 3} -> -1/(1+1e-4), +1/(1+1e-4); group 1: {2, 2} no spread; group 2: one
    assert adv.values[0] == pytest.approx(-1 / (1 + 1e-4)) and adv.values[2] == -adv.values[0]
    assert adv.values[4] == 0 and adv.values[5] == 0 and adv.values[7] == 0
    assert adv.zero_std_frac == pytest.approx(2 / 3)


def test_group_advantages_shape_error() -> None:
    with pytest.raises(ValueError, match="rewards, groups"):
        group_advantages(torch.zeros(4), torch.zeros(3, dtype=torch.long))


def test_policy_terms_is_flow_grpo_clipped_objective() -> None:
    logp_old = torch.tensor([0.0, 0.0, 0.0, 0.0])
    logp = torch.tensor([0.5, -0.5, 0.5, 1e-6], requires_grad=True)
    adv = torch.tensor([1.0, 1.0, -1.0, 2.0])
    c = 0.1
    loss, st = policy_terms(logp, logp_old, adv, c)
    ratio = torch.exp(logp.detach())
    expected = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - c, 1 + c))
    torch.testing.assert_close(loss.detach(), expected)
    assert st["clipped"].tolist() == [1.0, 1.0, 1.0, 0.0]
    torch.testing.assert_close(st["approx_kl"], 0.5 * logp.detach() ** 2)
    # at ratio == 1 the gradient is -A (the policy gradient)
    logp1 = torch.zeros(4, requires_grad=True)
    loss1, _ = policy_terms(logp1, logp_old, adv, c)
    (g,) = torch.autograd.grad(loss1.sum(), logp1)
    torch.testing.assert_close(g, -adv)


# ----------------------------------------------------------------------------- checkpoints


def test_checkpoints_are_atomic_pruned_and_found(tmp_path) -> None:
    def weights(folder):
        (folder / "adapter").mkdir()
        (folder / "adapter" / "w.txt").write_text("w")

    assert ckpt.latest_checkpoint(tmp_path) is None
    for step in (1, 2, 3):
        p = ckpt.save_checkpoint(tmp_path, step, write_weights=weights,
                                 state={"step": step, "t": torch.ones(2)}, keep_last=2)  # fmt: skip
        assert p.name == f"step-{step:06d}" and (p / ckpt.COMPLETE).is_file()
    assert [s for s, _ in ckpt.complete_checkpoints(tmp_path)] == [2, 3]
    # an incomplete (killed) checkpoint and a leftover temporary folder are ignored
    broken = ckpt.checkpoint_path(tmp_path, 4)
    broken.mkdir()
    (tmp_path / "checkpoints" / ".tmp-step-000005-1").mkdir()
    step, folder = ckpt.latest_checkpoint(tmp_path)
    assert step == 3 and folder.name == "step-000003"
    state = ckpt.load_state(folder)
    assert state["step"] == 3 and torch.equal(state["t"], torch.ones(2))
    ckpt.save_checkpoint(tmp_path, 6, write_weights=weights, state={"step": 6}, keep_last=2)
    assert not (tmp_path / "checkpoints" / ".tmp-step-000005-1").exists()


def test_failed_weight_write_leaves_no_complete_checkpoint(tmp_path) -> None:
    def fail(folder):
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(tmp_path, 1, write_weights=fail, state={}, keep_last=1)
    assert ckpt.latest_checkpoint(tmp_path) is None


def test_load_state_needs_the_file(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match=ckpt.STATE_FILE):
        ckpt.load_state(tmp_path)


def test_state_with_rng_loads_weights_only(tmp_path) -> None:
    state = {"rng": {"torch": torch.get_rng_state()}, "step": 2, "identity": {"lora": None}}
    torch.save(state, tmp_path / ckpt.STATE_FILE)
    back = ckpt.load_state(tmp_path)
    assert torch.equal(back["rng"]["torch"], state["rng"]["torch"])
    assert math.isfinite(back["step"]) and os.path.isfile(tmp_path / ckpt.STATE_FILE)
