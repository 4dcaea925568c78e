"""The GRPO update against Flow-GRPO's code (yifan123/flow_grpo, scripts/train_sd3.py and
flow_grpo/diffusers_patch/sd3_sde_with_logprob.py), each formula written out here: the KL
term's scale, dropping the rows whose advantage is 0, the EMA's warm-up."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from smartgrpo_fast.models.lora import adapter_disabled, lora_parameters
from smartgrpo_fast.train.config import load_config
from smartgrpo_fast.train.loss import policy_terms
from smartgrpo_fast.train.trainer import GRPOTrainer, ema_decay_at

#: 2 prompts x 4 rollouts, 4 steps, the SDE window fixed to steps 0 and 1 (0 starts at t = 1,
#: where the sde step's std substitutes sigma_max in its denominator).
SMALL = [
    "sample.prompts_per_step=2", "sample.group_size=4", "sample.steps=4",
    "sample.sde_window_size=2", "sample.sde_window_range=[0, 2]", "noise=random",
    "train.steps=2", "eval.every=0", "log.progress=false", "log.tensorboard=false",
    "lora.rank=4", "lora.alpha=8", "device=cpu", "train.micro_batch=3",
]  # fmt: skip


def _perturb(t: GRPOTrainer) -> GRPOTrainer:
    """An adapter that differs from the base model (LoRA's B starts at 0), the same in every
    process."""
    with torch.no_grad():
        for i, p in enumerate(lora_parameters(t.model)):
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(i)))
    return t


def _trainer(tmp_path: Path, *overrides: str) -> GRPOTrainer:
    return _perturb(GRPOTrainer(load_config("tiny", [*SMALL, *overrides]), tmp_path / "run"))


def _flow_grpo_std_dev_t(sde_type: str, sigma: float, sigma_prev: float, sigma_max: float,
                         noise_level: float) -> float:  # fmt: skip
    """``std_dev_t`` as sde_step_with_logprob returns it (and the KL divides by)."""
    if sde_type == "sde":
        return math.sqrt(sigma / (1 - (sigma_max if sigma == 1 else sigma))) * noise_level
    return sigma_prev * math.sin(noise_level * math.pi / 2)  # cps


def _flow_grpo_mean(sde_type: str, x, v, sigma: float, sigma_prev: float, std_dev_t: float):
    """``prev_sample_mean`` of sde_step_with_logprob."""
    if sde_type == "sde":
        dt = sigma_prev - sigma
        return (x * (1 + std_dev_t**2 / (2 * sigma) * dt)
                + v * (1 + std_dev_t**2 * (1 - sigma) / (2 * sigma)) * dt)  # fmt: skip
    x0, x1 = x - sigma * v, x + v * (1 - sigma)
    return x0 * (1 - sigma_prev) + x1 * math.sqrt(sigma_prev**2 - std_dev_t**2)


@pytest.mark.parametrize(("sde_type", "noise_level"), [("sde", 0.7), ("cps", 0.8)])
def test_kl_is_flow_grpos(tmp_path, sde_type: str, noise_level: float) -> None:
    """kl_loss = ((prev_sample_mean - prev_sample_mean_ref) ** 2).mean(dim=(1, 2, 3)) /
    (2 * std_dev_t ** 2), with std_dev_t = noise_level sqrt(sigma / (1 - sigma')) for sde (no
    sqrt(-dt): dividing by the Gaussian's own variance made it 14.7-28x larger at 10 steps,
    shift 3) and sigma_prev sin(noise_level pi / 2) for cps."""
    window = "[0, 2]" if sde_type == "sde" else "[1, 3]"  # cps: the last step stays ODE
    t = _trainer(tmp_path, f"sample.sde_type={sde_type}", f"sample.noise_level={noise_level}",
                 f"sample.sde_window_range={window}", "train.kl_beta=0.04")  # fmt: skip
    try:
        ro = t.rollouts(1)
        rows = slice(0, 5)
        c = ro.cond.select(list(range(5)))
        for j, i in enumerate(ro.sde_steps):
            sigma, sigma_prev, sigma_max = ro.sigmas[i], ro.sigmas[i + 1], ro.sigmas[1]
            std_dev_t = _flow_grpo_std_dev_t(sde_type, sigma, sigma_prev, sigma_max, noise_level)
            x = ro.latents[rows, j]
            with torch.no_grad():
                v = t.model.velocity(x, sigma, c)
                with adapter_disabled(t.model):
                    v_ref = t.model.velocity(x, sigma, c)
            mean = _flow_grpo_mean(sde_type, x, v, sigma, sigma_prev, std_dev_t)
            mean_ref = _flow_grpo_mean(sde_type, x, v_ref, sigma, sigma_prev, std_dev_t)
            want = ((mean - mean_ref) ** 2).mean(dim=(1, 2, 3)) / (2 * std_dev_t**2)
            _, st = t.policy_log_probs(ro, rows, j)
            got = t._kl(ro, rows, j, st)
            assert (want > 0).all()
            torch.testing.assert_close(got.detach(), want, rtol=1e-4, atol=1e-9)
    finally:
        t.close()


@pytest.mark.float_order
def test_rows_with_zero_advantage_are_dropped_and_the_mean_is_over_the_rest(tmp_path) -> None:
    """Flow-GRPO: mask = advantages.abs().sum(1) != 0; samples = samples[mask]; the loss is the
    mean over the kept rows and the SDE steps. The dropped rows cost no forward (only kept rows
    reach the model) and do not dilute the gradient."""
    t = _trainer(tmp_path)
    try:
        ro = t.rollouts(1)
        adv = torch.tensor([0.0, 1.3, -0.7, 0.0, 0.0, 2.0, -1.1, 0.4])
        kept = [1, 2, 5, 6, 7]
        seen: list[list[int]] = []
        log_probs = t.policy_log_probs

        def spy(ro_, rows, j):
            seen.append(list(rows))
            return log_probs(ro_, rows, j)

        t.policy_log_probs = spy
        sums, diff_max, n = t.backward(ro, adv)
        assert float(diff_max) < 1e-5  # before the step: ratio 1 on the kept rows
        got = [p.grad.clone() for p in t.params]
        assert n == 5 and sorted({r for rows in seen for r in rows}) == kept
        assert all(len(rows) <= 3 for rows in seen)  # micro-batches of train.micro_batch rows
        # The same loss written out over the kept rows only, one forward for all of them.
        t.policy_log_probs = log_probs
        t.optimizer.zero_grad(set_to_none=True)
        w = len(ro.sde_steps)
        total = 0.0
        for j in range(w):
            logp, _ = t.policy_log_probs(ro, kept, j)
            ratio = torch.exp(logp - ro.log_probs[kept, j])
            a = adv[kept]
            c = t.cfg.train.clip_range
            loss = torch.maximum(-a * ratio, -a * torch.clamp(ratio, 1 - c, 1 + c)).mean()
            total = total + loss / w
        total.backward()
        scale = max(float(g.abs().max()) for g in got)
        assert scale > 0
        # Equal up to float32 order (micro-batches of 3 against one batch of 5): within 2e-5 of
        # the gradient's own scale (~170 roundings; seen: 5e-6). tests/helpers' check floors
        # its scale at 1, far above these gradients (~3e-5), so it would pass anything here.
        for g, p in zip(got, t.params, strict=True):
            torch.testing.assert_close(g, p.grad, rtol=0, atol=2e-5 * scale)
        # the metric sums run over the kept rows only
        with torch.no_grad():
            want = sum(float(policy_terms(t.policy_log_probs(ro, kept, j)[0], ro.log_probs[kept, j],
                                          adv[kept], t.cfg.train.clip_range)[0].sum())
                       for j in range(w))  # fmt: skip
        assert float(sums[1]) == pytest.approx(want, rel=1e-5, abs=1e-9)
        upd = t.update(ro, adv)
        assert upd["rows_kept"] == 5 and upd["ratio_mean"] == pytest.approx(1.0, abs=1e-6)
    finally:
        t.close()


def test_no_row_kept_is_no_optimizer_step(tmp_path) -> None:
    t = _trainer(tmp_path)
    try:
        ro = t.rollouts(1)
        before = [p.detach().clone() for p in t.params]
        upd = t.update(ro, torch.zeros(ro.size))
        assert upd["rows_kept"] == 0 and upd["grad_norm"] == 0.0 and upd["loss"] == 0.0
        for b, p in zip(before, t.params, strict=True):
            assert torch.equal(b, p)  # no AdamW step (its weight decay would move them)
    finally:
        t.close()


def test_ema_warms_up_as_flow_grpo() -> None:
    """EMAModuleWrapper.get_current_decay: min((1 + optimization_step) / (10 + optimization_step),
    decay)."""
    for step in range(0, 200, 7):
        for decay in (0.9, 0.99, 0.999):
            assert ema_decay_at(step, decay) == min((1 + step) / (10 + step), decay)
    assert ema_decay_at(1, 0.9) == pytest.approx(2 / 11)
    assert ema_decay_at(80, 0.9) == 0.9  # (81 / 90 = 0.9)


def test_trainer_ema_follows_the_warm_up(tmp_path) -> None:
    """ema <- ema + (1 - decay_s) (p - ema) after optimizer step s (ema_every 1), starting from
    the initial weights; decay_s = min((1 + s) / (10 + s), 0.9)."""
    t = _trainer(tmp_path, "train.ema_decay=0.9", "train.ema_every=1", "train.lr=1e-2")
    try:
        ema = [e.clone() for e in t.ema]  # the weights at construction
        for s in (1, 2):
            t.train_step()
            d = min((1 + s) / (10 + s), 0.9)
            ema = [e + (1 - d) * (p.detach() - e) for e, p in zip(ema, t.params, strict=True)]
            for e, mine in zip(ema, t.ema, strict=True):
                torch.testing.assert_close(mine, e, rtol=1e-6, atol=1e-8)
        pairs = zip(t.ema, t.params, strict=True)
        moved = max(float((e - p.detach()).abs().max()) for e, p in pairs)
        assert moved > 1e-5  # not simply a copy of the weights
    finally:
        t.close()


@pytest.mark.slow
def test_ratio_is_one_with_the_transformer_compiled(tmp_path) -> None:
    """Flow-GRPO's users report compile wrappers breaking ratio == 1. With the transformer under
    torch.compile (reduce-overhead; on a CPU: inductor's C++ kernels, no CUDA graphs), the
    rollouts' forwards (no grad) and the update's (with grad: another compiled graph) give the
    same log-probabilities: logp_diff_max < 1e-5 (0.0 seen). About 100 s on 2 CPU cores, most
    of it compiling."""
    from smartgrpo_fast import models
    from smartgrpo_fast.graphs import GraphConfig

    model = models.load("tiny", graph=GraphConfig(backend="compile-reduce-overhead"))
    cfg = load_config("tiny", [*SMALL, "sample.batch=8", "train.micro_batch=8"])
    t = GRPOTrainer(cfg, tmp_path / "run", model=model)
    try:
        with torch.no_grad():
            for p in lora_parameters(t.model):
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(3)))
        ro = t.rollouts(1)
        upd = t.update(ro, torch.where(torch.arange(ro.size) % 2 == 0, 1.0, -1.0))
        assert model._forward._compiled is not None  # the forwards did go through compile
        assert upd["rows_kept"] == ro.size
        assert upd["logp_diff_max"] < 1e-5
        assert upd["ratio_mean"] == pytest.approx(1.0, abs=1e-6)
    finally:
        t.close()


def _ddp_worker(rank: int, port: int, out: str, overrides: list[str]) -> None:
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE="2")  # fmt: skip
    torch.set_num_threads(1)
    t = _perturb(GRPOTrainer(load_config("tiny", [*SMALL, *overrides]), Path(out) / "run"))
    try:
        ro = t.rollouts(1)
        adv = torch.tensor([1.0, -1.0, 0.5, -0.5]) if rank == 0 else torch.zeros(ro.size)
        _, _, n = t.backward(ro, adv)
        torch.save({"n": n, "grads": [p.grad.clone() for p in t.params]},
                   Path(out) / f"rank{rank}.pt")  # fmt: skip
    finally:
        t.close()
        t.dist.close()


@pytest.mark.slow
@pytest.mark.float_order
def test_ddp_rank_without_kept_rows_joins_the_all_reduce(tmp_path) -> None:
    """With 2 processes, one whose rows all have advantage 0 still joins DDP's gradient
    all-reduce (with a zero contribution: no hang) and the gradient is the 1-process one: the
    mean over the kept rows of both processes."""
    import socket

    import torch.multiprocessing as mp

    overrides = ["sample.prompts_per_step=2", "train.async_reward=false", "train.micro_batch=4"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(port, str(tmp_path), overrides), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["n"] == r1["n"] == 4
    t = _perturb(GRPOTrainer(load_config("tiny", [*SMALL, *overrides]), tmp_path / "one"))
    try:
        ro = t.rollouts(1)
        _, _, n = t.backward(ro, torch.tensor([1.0, -1.0, 0.5, -0.5, 0, 0, 0, 0]))
        assert n == 4
        scale = max(float(p.grad.abs().max()) for p in t.params)
        assert scale > 0
        for p, g0, g1 in zip(t.params, r0["grads"], r1["grads"], strict=True):
            torch.testing.assert_close(g0, g1)  # DDP: the same averaged gradient on both
            torch.testing.assert_close(g0, p.grad, rtol=0, atol=2e-5 * scale)  # float32 order
    finally:
        t.close()
