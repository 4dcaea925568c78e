"""benchmarks/grad_snr.py: the signal/noise estimates of batch gradients and the script."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import load_benchmark

from smartgrpo_fast.train.config import load_config
from smartgrpo_fast.train.trainer import GRPOTrainer

#: 1 prompt x 4 rollouts, 4 sampling steps, one SDE step: a batch in a second on CPU.
SMALL = [
    "sample.prompts_per_step=1", "sample.group_size=4", "sample.steps=4",
    "sample.sde_window_size=1", "sample.sde_window_range=[1, 3]", "search.k=2",
    "search.rounds=1", "search.top=1", "train.micro_batch=3", "lora.rank=2", "lora.alpha=4",
    "device=cpu", "log.progress=false", "eval.every=0",
]  # fmt: skip


@pytest.fixture(scope="module")
def gs():
    return load_benchmark("grad_snr")


@pytest.mark.parametrize(("signal", "noise"), [(0.0, 1.0), (1.0, 1.0), (4.0, 0.25)])
def test_signal_and_noise_recover_known_values(gs, signal: float, noise: float) -> None:
    """g_s = mu + n_s with |mu|^2 = signal, E|n|^2 = noise: the estimates land within a few
    standard errors (P = 20000 dimensions, S = 64 batches)."""
    g = torch.Generator().manual_seed(0)
    p, s = 20000, 64
    mu = torch.randn(p, generator=g, dtype=torch.float64)
    mu *= (signal / mu.square().sum()).sqrt() if signal else 0.0
    n = torch.randn(s, p, generator=g, dtype=torch.float64) * (noise / p) ** 0.5
    est = gs.signal_and_noise(mu + n, rollouts_per_batch=32)
    assert est["signal_sq"] == pytest.approx(signal, abs=4 * est["signal_sq_se"] + 1e-3)
    assert est["signal_sq_se"] < 0.05 * noise + 0.05 * signal
    assert est["noise_sq"] == pytest.approx(noise, rel=0.05)
    if signal:
        want_cos = signal / (signal + noise)
        assert est["mean_cos"] == pytest.approx(want_cos, abs=0.03)
        assert est["rollouts_for_snr_1"] == pytest.approx(32 * noise / signal, rel=0.15)


def test_signal_and_noise_needs_two_batches(gs) -> None:
    with pytest.raises(ValueError, match=r"grads: expected at least 2 .*\(1, 5\)"):
        gs.signal_and_noise(torch.ones(1, 5, dtype=torch.float64), 4)


def test_batch_gradient_is_the_one_the_update_clips(gs, tmp_path: Path) -> None:
    """The script's gradient of step 1 is the trainer's: its norm is the ``grad_norm`` that
    ``train_step`` logs (before clipping), and the weights are left as they were."""
    cfg = load_config("tiny", [*SMALL, "noise=random", "train.max_grad_norm=0"])
    a = GRPOTrainer(cfg, tmp_path / "a")
    before = [p.detach().clone() for p in a.params]
    grads = gs.batch_gradients(a, 2)
    assert grads.shape == (2, sum(p.numel() for p in a.params))
    assert all(torch.equal(x, p) for x, p in zip(before, a.params, strict=True))
    a.close()
    b = GRPOTrainer(cfg, tmp_path / "b")
    line = b.train_step()
    b.close()
    assert float(grads[0].norm()) == pytest.approx(line["grad_norm"], rel=1e-5)
    assert not torch.equal(grads[0], grads[1])  # another step: other prompts, other noise


def test_script_rows_and_table(gs, tmp_path: Path, capsys) -> None:
    out = tmp_path / "snr.jsonl"
    assert gs.main(["--batches", "3", "--noise", "random,smart", "--out", str(out), *SMALL]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["noise"] for r in rows] == ["random", "smart"]
    for r in rows:
        assert r["rollouts_per_batch"] == 4 and r["batches"] == 3
        assert r["noise_sq"] > 0 and r["grad_norm"] > 0 and -1 <= r["mean_cos"] <= 1
    table = capsys.readouterr().out
    assert "| smart | 4 |" in table and "3 batches per noise" in table


@pytest.mark.parametrize(
    ("argv", "flag"),
    [(["--batches", "1"], "--batches"), (["--noise", "random,greedy"], "--noise")],
)
def test_bad_arguments_name_the_flag(gs, capsys, argv: list[str], flag: str) -> None:
    with pytest.raises(SystemExit) as exc:
        gs.main(argv)
    assert exc.value.code == 2 and flag in capsys.readouterr().err
