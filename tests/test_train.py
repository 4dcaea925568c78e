"""The GRPO trainer on the embedded model: rollouts, consistency of log-probabilities, the run
folder contract, checkpoints and exact resume, DDP with gloo, the shipped configs."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import assert_float_order_close

from smartgrpo_fast import models
from smartgrpo_fast.graphs import GraphConfig
from smartgrpo_fast.models.lora import adapter_disabled, lora_parameters
from smartgrpo_fast.train.checkpoint import latest_checkpoint
from smartgrpo_fast.train.config import ConfigError, load_config
from smartgrpo_fast.train.trainer import METRIC_KEYS, GRPOTrainer

#: A run small enough for CI: 2 prompts x 4 rollouts, 4 sampling steps, K 4 x 2 rounds; the
#: prompt-match reward (the config's own, shape-area, has no match rate to check).
TINY = [
    "sample.prompts_per_step=2", "sample.group_size=4", "sample.steps=4",
    "sample.sde_window_size=2", "sample.sde_window_range=[0, 3]", "search.k=4",
    "search.rounds=2", "search.top=2", "train.steps=2", "train.save_every=1", "eval.every=2",
    "eval.num_prompts=4", "eval.steps=2", "log.progress=false", "lora.rank=4", "lora.alpha=8",
    "device=cpu", "reward=tiny",
]  # fmt: skip
_TIME_KEYS = {k for k in METRIC_KEYS if k.startswith("time_")} | {"peak_mem_bytes"}


def _trainer(tmp_path: Path, *overrides: str, model=None, reward=None, **kw) -> GRPOTrainer:
    cfg = load_config("tiny", [*TINY, *overrides])
    return GRPOTrainer(cfg, tmp_path / "run", model=model, reward=reward, **kw)


def _metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x]


def _without_times(lines: list[dict]) -> list[dict]:
    return [{k: v for k, v in line.items() if k not in _TIME_KEYS} for line in lines]


# ----------------------------------------------------------------------------- consistency


@pytest.mark.parametrize(
    ("noise", "micro", "backend"),
    [("random", 3, "eager"), ("smart", 5, "eager"), ("bestof", 8, "eager"),
     ("smart", 3, "graph")],
)  # fmt: skip
def test_recomputed_log_prob_equals_the_rollouts(tmp_path, noise, micro, backend) -> None:
    """Before the first update the training forward's log-probability of every stored
    x_next equals the rollout's (ratio 1), with micro-batches of another size than the
    rollout's batch; 'graph' runs the rollout through the graph wrapper (eager fallback on
    CPU, replays on CUDA)."""
    model = models.load("tiny", graph=GraphConfig(backend=backend))
    t = _trainer(tmp_path, f"noise={noise}", f"train.micro_batch={micro}", "sample.batch=4",
                 model=model)  # fmt: skip
    try:
        with torch.no_grad():
            for p in lora_parameters(t.model):  # a non-trivial adapter
                p.add_(0.05 * torch.randn_like(p))
        ro = t.rollouts(1)
        assert ro.log_probs.shape == (8, 2) and torch.isfinite(ro.log_probs).all()
        # every row kept (rows with advantage 0 are dropped before the update)
        adv = torch.where(torch.arange(ro.size) % 2 == 0, 1.0, -1.0)
        upd = t.update(ro, adv)
        assert upd["rows_kept"] == ro.size
        assert upd["logp_diff_max"] < 1e-5
        assert upd["ratio_mean"] == pytest.approx(1.0, abs=1e-6)
    finally:
        t.close()


@pytest.mark.float_order
def test_rollouts_do_not_depend_on_the_batch_size(tmp_path) -> None:
    outs = []
    for batch in (3, 8):
        t = _trainer(tmp_path / str(batch), "noise=smart", f"sample.batch={batch}")
        outs.append(t.rollouts(1))
        t.close()
    a, b = outs
    assert a.prompts == b.prompts and a.sde_steps == b.sde_steps
    # Four sampling steps and a search through the transformer, then the classifier: 256
    # roundings of the values' scale (rewards reach ~30; CI saw 6.9e-6 relative, 60 roundings).
    assert_float_order_close(a.next_latents, b.next_latents, name="next latents")
    assert_float_order_close(a.rewards, b.rewards, name="rewards")


def _count_velocity_rows(t: GRPOTrainer) -> list[int]:
    """Rows of every model.velocity call of ``t`` (its rollouts' and its search's)."""
    rows: list[int] = []
    forward = t.model.velocity

    def counted(x, *args, **kwargs):
        rows.append(x.shape[0])
        return forward(x, *args, **kwargs)

    t.model.velocity = counted
    return rows


@pytest.mark.float_order
@pytest.mark.parametrize("noise", ["smart", "bestof"])
def test_the_search_velocity_replaces_the_next_forward(tmp_path, noise) -> None:
    """With sample.reuse_search_velocity the step after a searched one takes the velocity the
    search computed at the chosen candidate: one forward row fewer per searched step and
    rollout, the same rollouts up to float order (the search's batch is B*K rows)."""
    got = {}
    for reuse in (True, False):
        t = _trainer(tmp_path / str(reuse), f"noise={noise}", "sample.batch=3",
                     f"sample.reuse_search_velocity={str(reuse).lower()}")  # fmt: skip
        rows = _count_velocity_rows(t)
        got[reuse] = (t.rollouts(1), sum(rows))
        t.close()
    (on, rows_on), (off, rows_off) = got[True], got[False]
    # 4 sampling steps, window [0, 3) of 2 steps: both searched steps have a step after them
    assert off.model_calls == 4 + 2 * 4 * 2 and on.model_calls == off.model_calls - 2
    assert rows_on == on.model_calls * on.size and rows_off == off.model_calls * off.size
    assert on.sde_steps == off.sde_steps
    assert_float_order_close(on.latents, off.latents, name="latents")
    assert_float_order_close(on.next_latents, off.next_latents, name="next latents")
    assert_float_order_close(on.log_probs, off.log_probs, name="log-probabilities")


@pytest.mark.parametrize("at", ["start", "end"])
def test_search_steps_searches_the_window_s_first_or_last_steps(tmp_path, at) -> None:
    """sample.search_steps=1 of a window of 2: one search per batch, at the window's first
    (start) or last (end) step; the other SDE step takes its random draw (no search gain)."""
    t = _trainer(tmp_path, "noise=smart", "sample.search_steps=1", "sample.batch=8",
                 f"sample.search_steps_at={at}")  # fmt: skip
    searched_at: list[float] = []
    run = t.searcher.run

    def spy(mean, scale, t_next, cond, **kw):
        searched_at.append(t_next)
        return run(mean, scale, t_next, cond, **kw)

    t.searcher.run = spy
    try:
        ro = t.rollouts(1)
        line = t.train_step()
    finally:
        t.close()
    j = 0 if at == "start" else 1
    step = ro.sde_steps[j]
    assert ro.searched_steps == [step]
    assert searched_at[0] == ro.sigmas[step + 1]  # 8 rollouts in one batch, one search
    assert len(searched_at) == 2  # and one more in train_step's own rollouts
    assert ro.model_calls == 4 + 4 * 2 - 1  # the searched step's velocity is reused
    assert (ro.search_gain[:, 1 - j] == 0).all() and (ro.search_gain[:, j] >= 0).all()
    assert (ro.search_gain[:, j] > 0).any()
    assert line["search_gain"] > 0  # the mean over the searched step only


def test_groups_keep_their_spread_and_noise_strategies_differ(tmp_path) -> None:
    got = {}
    for noise in ("random", "smart", "bestof"):
        t = _trainer(tmp_path / noise, f"noise={noise}")
        got[noise] = t.rollouts(1)
        t.close()
    r = got["smart"]
    # each rollout of a group has its own search: no two rows share a trajectory
    flat = r.next_latents[:, 0].flatten(1)
    assert torch.cdist(flat, flat).fill_diagonal_(1.0).min() > 1e-3
    assert not torch.equal(got["random"].next_latents, r.next_latents)
    assert not torch.equal(got["bestof"].next_latents, r.next_latents)
    # random noise has no search, so no search gain; a search never keeps a worse candidate
    assert (got["random"].search_gain == 0).all() and (r.search_gain >= 0).all()


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.float_order
def test_shared_initial_noise_gives_each_group_one_x_t(tmp_path, shared) -> None:
    """With the option the rows of a group reach the first SDE step from one x_T (the ODE
    steps before it are deterministic) and still part there; without it no two rows meet."""
    t = _trainer(tmp_path, "noise=random", f"sample.shared_initial_noise={str(shared).lower()}",
                 "sample.batch=3")  # fmt: skip
    try:
        ro = t.rollouts(1)
    finally:
        t.close()
    g = t.cfg.sample.group_size
    first = ro.latents[:, 0].flatten(1).view(-1, g, ro.latents[0, 0].numel())  # (P, G, D)
    spread = (first - first[:, :1]).abs().amax(dim=(1, 2))  # (P,) within each group
    between = (first[0, 0] - first[1, 0]).abs().amax()
    assert between > 1e-2
    if shared:  # rows of a group may sit in different batches: equal up to float32 order
        for p in range(first.shape[0]):
            assert_float_order_close(first[p, 1:], first[p, :1].expand_as(first[p, 1:]),
                                     name=f"group {p}'s x at the first SDE step")  # fmt: skip
    else:
        assert spread.min() > 1e-2
    after = ro.next_latents[:, 0].flatten(1)
    assert torch.cdist(after, after).fill_diagonal_(1.0).min() > 1e-3


def test_kl_to_the_base_model_carries_gradient(tmp_path) -> None:
    t = _trainer(tmp_path, "train.kl_beta=0.1", "noise=random")
    try:
        ro = t.rollouts(1)
        with torch.no_grad():
            for p in lora_parameters(t.model):
                p.add_(0.05 * torch.randn_like(p))
        logp, st = t.policy_log_probs(ro, slice(0, 4), 0)
        kl = t._kl(ro, slice(0, 4), 0, st)
        assert (kl > 0).all()
        grads = torch.autograd.grad(kl.sum(), lora_parameters(t.model), allow_unused=True)
        assert any(g is not None and g.abs().sum() > 0 for g in grads)
        with adapter_disabled(t.model):  # restored afterwards
            pass
        logp2, _ = t.policy_log_probs(ro, slice(0, 4), 0)
        torch.testing.assert_close(logp, logp2)
    finally:
        t.close()


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_an_update_moves_log_probabilities_toward_the_advantages(tmp_path, sign) -> None:
    """One optimizer step (Adam, lr 1e-3) moves the SDE steps' log-probabilities with the
    advantages: sum A (logp_new - logp_old) > 0, for the rollouts' advantages and for their
    negation (a sign slip in the loss, or an optimizer that ascends it, fails both). Seen on
    CPU: the largest |logp_new - logp_old| 1.6e-3 to 2.5e-3, the sum 7e-3 (both a tenth of
    that at lr 1e-4: first order)."""
    t = _trainer(tmp_path, "noise=random", "train.lr=1e-3")
    try:
        ro = t.rollouts(1)
        adv = sign * t.advantages(ro.rewards, ro.groups).values
        assert adv.abs().max() > 0.1
        t.update(ro, adv)
        rows = slice(0, ro.size)
        with torch.no_grad():
            new = torch.stack(
                [t.policy_log_probs(ro, rows, j)[0] for j in range(len(ro.sde_steps))], dim=1
            )  # (R, W)
        delta = new - ro.log_probs
        moved = delta.abs().max()
        assert moved > 5e-4  # the step changed the policy
        assert (adv[:, None] * delta).sum() > moved
    finally:
        t.close()


# ----------------------------------------------------------------------------- run folder


def test_eval_images_per_prompt(tmp_path) -> None:
    """eval.images_per_prompt 2: the logged mean is evaluate()'s over 2 images a prompt, the
    grid shows every image (4 prompts x 2 on one row of 8)."""
    from PIL import Image

    from smartgrpo_fast.train.evaluate import EvalConfig, evaluate

    t = _trainer(tmp_path, "eval.images_per_prompt=2")
    out = t.evaluate()
    want = evaluate(t.model, t.reward, t.eval_prompts,
                    EvalConfig(steps=2, seed=t.cfg.eval.seed, images_per_prompt=2))  # fmt: skip
    assert out["eval_reward_mean"] == pytest.approx(want.mean, abs=1e-5)
    assert out["eval_match_rate"] == want.match_rate and want.images.shape[0] == 8
    one = _trainer(tmp_path / "one").evaluate()
    assert out["eval_reward_mean"] != one["eval_reward_mean"]  # the second images count
    with Image.open(tmp_path / "run" / "samples" / "step-000000.png") as a, \
            Image.open(tmp_path / "one" / "run" / "samples" / "step-000000.png") as b:  # fmt: skip
        assert a.size == b.size  # 8 images on one row, as 4 were on one row of 8


def test_run_folder_contract(tmp_path) -> None:
    t = _trainer(tmp_path)  # log.tensorboard is on by default
    t.train()
    run = tmp_path / "run"
    lines = _metrics(run)
    assert [x["step"] for x in lines] == [1, 2]
    for line in lines:
        assert set(METRIC_KEYS) <= set(line)
        assert line["world_size"] == 1 and line["logp_diff_max"] < 1e-5
        assert line["peak_mem_bytes"] > 0 and line["time_step"] > 0
    assert "eval_reward_mean" in lines[1]
    evals = [json.loads(x) for x in (run / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [0, 2]
    assert (run / "samples" / "step-000000.png").is_file()
    assert (run / "samples" / "step-000002.png").is_file()
    assert load_config(run / "config.yaml") == t.cfg
    step, folder = latest_checkpoint(run)
    assert step == 2
    for name in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors",
                 "training_state.pt", "COMPLETE"):  # fmt: skip
        assert (folder / name).is_file(), name
    state = torch.load(folder / "training_state.pt", weights_only=True)
    assert state["step"] == 2
    assert any((run / "tensorboard").iterdir())
    # keep_last 2: steps 1 and 2
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "step-000001", "step-000002"]  # fmt: skip
    # the adapter loads into a fresh model and changed it
    trained = models.load("tiny", lora=folder / "adapter")
    base = models.load("tiny")
    cond = base.encode_prompts(["a red circle on a blue background"])
    x = torch.randn(1, *base.latent_shape, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(trained.velocity(x, 0.8, cond), base.velocity(x, 0.8, cond))
    with pytest.raises(FileExistsError, match="resume"):
        _trainer(tmp_path)


def test_full_fine_tuning_without_lora(tmp_path) -> None:
    t = _trainer(tmp_path, "lora=null", "train.steps=1", "eval.every=0")
    before = [p.detach().clone() for p in t.params]
    t.train()
    assert len(t.params) == len(list(t.model.transformer.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(before, t.params, strict=True))
    _, folder = latest_checkpoint(tmp_path / "run")
    assert (folder / "transformer.safetensors").is_file()
    with pytest.raises(ConfigError, match="kl_beta"):
        _trainer(tmp_path / "b", "lora=null", "train.kl_beta=0.1")


def test_resume_refuses_another_lora_shape_or_reward(tmp_path) -> None:
    _trainer(tmp_path, "train.steps=1", "eval.every=0").train()
    with pytest.raises(ConfigError, match=r"^lora"):
        _trainer(tmp_path, "train.steps=2", "lora.rank=8", resume=True)
    with pytest.raises(ConfigError, match=r"^reward"):
        _trainer(tmp_path, "train.steps=2", "reward=tiny-prob", resume=True)
    with pytest.raises(FileNotFoundError, match="checkpoint"):
        GRPOTrainer(load_config("tiny", TINY), tmp_path / "empty", resume=True)


# ----------------------------------------------------------------------------- processes


def _cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env |= {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("SMARTGRPO_BACKEND", None)
    return env


def _train_cmd(out: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "smartgrpo_fast", "train", "--config", "tiny", "--out",
            str(out), *TINY, "train.steps=3", "eval.every=0", *overrides]  # fmt: skip


@pytest.mark.slow
def test_sigkill_then_resume_is_bit_identical(tmp_path) -> None:
    env = _cli_env()
    full, killed = tmp_path / "full", tmp_path / "killed"
    subprocess.run(_train_cmd(full), env=env, check=True, capture_output=True, timeout=600)
    proc = subprocess.Popen(_train_cmd(killed), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 600
    while not (killed / "checkpoints" / "step-000001" / "COMPLETE").exists():
        assert proc.poll() is None, "the run ended before its first checkpoint"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "checkpoints" / "step-000003").exists(), "killed too late to test"
    subprocess.run([sys.executable, "-m", "smartgrpo_fast", "train", "--resume", str(killed)],
                   env=env, check=True, capture_output=True, timeout=600)  # fmt: skip
    assert _without_times(_metrics(killed)) == _without_times(_metrics(full))
    for name in ("adapter/adapter_model.safetensors", "adapter/adapter_config.json"):
        a = (full / "checkpoints" / "step-000003" / name).read_bytes()
        assert a == (killed / "checkpoints" / "step-000003" / name).read_bytes(), name


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.float_order
def test_two_processes_reproduce_one(tmp_path) -> None:
    """torchrun with gloo: the same config on 2 processes gives the 1-process rewards and, up
    to float reduction order, the same adapter."""
    env = _cli_env()
    one, two = tmp_path / "one", tmp_path / "two"
    overrides = ["train.steps=1", "sample.prompts_per_step=2", "train.async_reward=false"]
    subprocess.run(_train_cmd(one, *overrides), env=env, check=True, capture_output=True,
                   timeout=600)  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           f"--master_port={_free_port()}", "-m", "smartgrpo_fast", "train", "--config", "tiny",
           "--out", str(two), *TINY, "train.steps=3", "eval.every=0", *overrides]  # fmt: skip
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = _metrics(one)[0], _metrics(two)[0]
    assert b["world_size"] == 2 and a["world_size"] == 1
    # Each process samples half the rows in its batches: float32 order (seen: 1.4e-5 on a std
    # of 2.75, 43 roundings).
    for key in ("reward_mean", "reward_std"):
        assert_float_order_close(torch.tensor(b[key]), torch.tensor(a[key]), name=key)
    from safetensors.torch import load_file

    wa = load_file(one / "checkpoints" / "step-000001" / "adapter" / "adapter_model.safetensors")
    wb = load_file(two / "checkpoints" / "step-000001" / "adapter" / "adapter_model.safetensors")
    assert wa.keys() == wb.keys()
    # Adam's first step is lr g / (|g| + eps), about +-lr per element: where |g| is near eps
    # (1e-8) the order in which DDP sums the gradient moves that element's step by a fraction
    # of lr (CI saw lr / 188 on 2 of 512 elements). A wrong gradient flips the sign of most
    # steps (differences near 2 lr); require lr / 300 on all but 1% and lr everywhere.
    lr = load_config(two / "config.yaml").train.lr
    for k in wa:
        diff = (wa[k] - wb[k]).abs()
        assert float((diff > lr / 300).float().mean()) < 0.01, k
        assert float(diff.max()) < lr, k


# ----------------------------------------------------------------------------- CLI, configs


def test_cli_errors_name_the_key(tmp_path, capsys) -> None:
    from smartgrpo_fast.cli import main

    assert main(["train", "--out", str(tmp_path / "r"), "search.kk=3"]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("smartgrpo-fast train: error: search.kk: unknown key")
        and err.count("\n") == 1
    )  # one line, no usage
    with pytest.raises(SystemExit):
        main(["train", "search.k=3"])
    assert "--out" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path / "r"), "--print-config", "seed=9"]) == 0
    assert "seed: 9" in capsys.readouterr().out
    assert not (tmp_path / "r").exists()


def test_sd35_config_runs_one_step_on_the_tiny_random_sd3_pipeline(tmp_path) -> None:
    """The shipped sd35-medium config, with the model path overridden to a tiny random SD3
    pipeline (save_pretrained) and a CPU-sized batch, runs one GRPO step on CPU."""
    from smartgrpo_fast.models.sd3_configs import save_tiny_sd3_pipeline

    folder = save_tiny_sd3_pipeline(tmp_path / "sd3", seed=0)
    cfg = load_config("sd35-medium", [
        f"model.name={folder}", "model.dtype=float32", "model.resolution=null",
        "model.graph=eager", "model.gradient_checkpointing=false", "device=cpu",
        "reward=tiny-color", "sample.prompts_per_step=1", "sample.group_size=2",
        "sample.steps=4", "sample.sde_window_range=[0, 3]", "search.k=2", "search.rounds=1",
        "search.top=1", "search.decode_size=null", "train.steps=1", "train.micro_batch=2",
        "eval.every=0", "log.progress=false", "log.tensorboard=false", "lora.rank=2",
        "lora.alpha=4", "train.ema_decay=null",
    ])  # fmt: skip
    t = GRPOTrainer(cfg, tmp_path / "run")
    t.train()
    (line,) = _metrics(tmp_path / "run")
    assert line["step"] == 1 and line["logp_diff_max"] < 1e-4 and len(line["sde_steps"]) == 2
    adapter = tmp_path / "run" / "checkpoints" / "step-000001" / "adapter"
    assert (adapter / "adapter_config.json").is_file()
    # diffusers' format beside peft's: the pipeline loads the trained adapter
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(folder)
    base_pipe = StableDiffusion3Pipeline.from_pretrained(folder)
    pipe.load_lora_weights(adapter)
    c = pipe.transformer.config
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(1, *t.model.latent_shape, generator=gen)
    ehs = torch.randn(1, 5, c.joint_attention_dim, generator=gen)
    pooled = torch.randn(1, c.pooled_projection_dim, generator=gen)
    ts = torch.tensor([700.0])
    with torch.no_grad():
        ours = t.model._transformer_forward(z, ts, ehs, pooled)
        theirs = pipe.transformer(
            hidden_states=z,
            encoder_hidden_states=ehs,
            pooled_projections=pooled,
            timestep=ts,
            return_dict=False,
        )[0]
        base = base_pipe.transformer(
            hidden_states=z,
            encoder_hidden_states=ehs,
            pooled_projections=pooled,
            timestep=ts,
            return_dict=False,
        )[0]
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
    assert not torch.equal(theirs, base)  # the step changed the adapter
