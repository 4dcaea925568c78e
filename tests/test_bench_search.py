"""``bench search``: the stage split rows, peak memory, the stacked-bar plot, the table, and
the fair naive baseline (its noise drawn on the model's device).

The benchmark runs here on a small analytic flow model patched in for the embedded one
(v = 0.5 z + c_p, decode a sigmoid, a distance reward), so these tests take a second;
tests/test_search_cli.py runs the command on the embedded model. No timing is asserted.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from smartgrpo_fast.bench import rows as bench_rows
from smartgrpo_fast.bench import search as bench_search
from smartgrpo_fast.cli import main
from smartgrpo_fast.models.base import Cond, repeat_rows
from smartgrpo_fast.search import NoiseSearch, SearchConfig, search_reference

SHAPE = (3, 8, 8)
B, K = 1, 2
ARGV = ["bench", "search", "--batch", str(B), "--k", str(K), "--rounds", "1", "--top", "1",
        "--repeats", "1", "--warmup", "0", "--device", "cpu"]  # fmt: skip
STEM = "search_tiny_cpu_float32"
PROVIDERS = ("reference", "fused")


class Flow:
    """FlowModel stand-in: v = 0.5 z + c_p, decode = sigmoid; latents scaled and shifted."""

    latent_shape = SHAPE
    scaling_factor = 2.0
    shift_factor = 0.1
    dtype = torch.float32
    device = torch.device("cpu")

    def encode_prompts(self, prompts: list[str]) -> Cond:
        gen = torch.Generator().manual_seed(1)
        c = 0.3 * torch.randn((1, math.prod(SHAPE)), generator=gen)
        emb = c.expand(len(prompts), -1).unsqueeze(1)
        return Cond(emb, emb[:, 0], prompts=tuple(prompts))

    def velocity(self, z: torch.Tensor, t, cond: Cond, k: int = 1) -> torch.Tensor:
        return 0.5 * z + repeat_rows(cond.prompt_embeds[:, 0], k).view(-1, *SHAPE)

    def decode(self, x0: torch.Tensor, *, size: int | None = None) -> torch.Tensor:
        return torch.sigmoid(x0)


def distance_reward(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """-mean |image - 0.7|^2 per image: (N,) float32."""
    return -((images - 0.7) ** 2).flatten(1).mean(1)


def flow_model_and_cond(config: bench_search.SearchBenchConfig):
    model = Flow()
    return model, distance_reward, model.encode_prompts(["a prompt"] * config.batch)


class RandnSpy:
    """torch.randn that records (shape, kwargs, result) of every call."""

    def __init__(self) -> None:
        self.real = torch.randn
        self.calls: list[tuple[tuple, dict, torch.Tensor]] = []

    def __call__(self, *args, **kwargs) -> torch.Tensor:
        out = self.real(*args, **kwargs)
        self.calls.append((tuple(out.shape), kwargs, out))
        return out


def run_cli(out: Path, *extra: str) -> SimpleNamespace:
    spy, printed = RandnSpy(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(bench_search, "_model_and_cond", flow_model_and_cond)
        mp.setattr(torch, "randn", spy)
        with contextlib.redirect_stdout(printed):
            assert main([*ARGV, "--out", str(out), *extra]) == 0
    rows = json.loads((out / f"{STEM}.json").read_text())
    return SimpleNamespace(out=out, rows=rows, printed=printed.getvalue(), draws=spy.calls)


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    return run_cli(tmp_path_factory.mktemp("bench_search"))


def test_split_rows_have_all_six_stages_per_provider(bench) -> None:
    split = [r for r in bench.rows if r["op"].startswith("round:")]
    for provider in PROVIDERS:
        for metric, unit in (("stage_time", "s"), ("stage_fraction", "of round")):
            got = [r for r in split if r["provider"] == provider and r["metric"] == metric]
            assert [r["op"].removeprefix("round:") for r in got] == list(bench_search.STAGES)
            for r in got:
                assert r["unit"] == unit and r["x"] == B * K and r["x_name"] == "candidates/round"
                assert r["repeats"] == 1  # repeats * rounds timed rounds
                assert 0 <= r["p20"] <= r["p80"] and r["median"] >= 0
                if metric == "stage_time":
                    assert r["p20"] <= r["median"] <= r["p80"]
        fractions = [r["median"] for r in split
                     if r["provider"] == provider and r["metric"] == "stage_fraction"]  # fmt: skip
        assert math.isclose(sum(fractions), 1.0, rel_tol=1e-9)
    # the CSV holds the same rows as the JSON
    assert len(bench_rows.read_csv(bench.out / f"{STEM}.csv")) == len(bench.rows)


def test_whole_search_rows_kept(bench) -> None:
    metrics = {(r["provider"], r["metric"]) for r in bench.rows if r["op"] == "search"}
    assert {("reference", "time"), ("fused", "time"), ("fused", "throughput"),
            ("fused", "speedup")} <= metrics  # fmt: skip


def test_peak_memory_is_a_positive_int_per_provider(bench) -> None:
    name = "peak_rss_bytes" if Path("/proc/self/clear_refs").exists() else "max_rss_bytes"
    for provider in PROVIDERS:
        peak = [r for r in bench.rows if r["provider"] == provider and r["metric"] == name]
        over = [r for r in bench.rows if r["provider"] == provider
                and r["metric"] == name.removesuffix("_bytes") + "_over_start_bytes"]  # fmt: skip
        assert len(peak) == 1 and len(over) == 1
        assert peak[0]["unit"] == "bytes" and type(peak[0]["median"]) is int
        assert peak[0]["median"] > 0 and peak[0]["p20"] == peak[0]["p80"] == peak[0]["median"]
        assert type(over[0]["median"]) is int and 0 <= over[0]["median"] <= peak[0]["median"]


def test_peak_memory_sees_an_allocation() -> None:
    mib = 2**20

    def allocate() -> None:
        x = torch.empty(64 * mib // 4)
        x.fill_(1.0)  # touch every page
        del x

    metric, peak, over = bench_search.peak_memory(allocate, torch.device("cpu"))
    if metric != "peak_rss_bytes":
        pytest.skip("VmHWM cannot be reset here (not Linux): only the lifetime peak")
    assert isinstance(peak, int) and isinstance(over, int)
    assert over >= 48 * mib and peak >= over


def test_table_prints_the_stage_split(bench) -> None:
    text = bench.printed
    assert "stage split of a round" in text and "peak RSS MiB" in text
    lines = text.splitlines()
    for stage in (*bench_search.STAGES, "sum"):
        line = next(ln for ln in lines if ln.startswith(stage + " "))
        assert line.count("%)") == len(PROVIDERS), line
    header = next(ln for ln in lines if ln.startswith("stage   "))
    assert header.split()[1:] == list(PROVIDERS)


def test_stage_plot_is_written(bench) -> None:
    pytest.importorskip("matplotlib")
    png = bench.out / f"{STEM}_stages.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"PNG:  {png}" in bench.printed


def test_no_plot_option(tmp_path: Path) -> None:
    got = run_cli(tmp_path, "--no-plot")
    assert not list(tmp_path.glob("*.png")) and "PNG:" not in got.printed


def test_help_names_the_new_option_default(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["bench", "search", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--no-plot" in text and "(default: drawn)" in text and "select/update" in text


def test_plot_needs_stage_rows(bench, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    path = bench_rows.write_csv([r for r in bench.rows if r["op"] == "search"], tmp_path / "a.csv")
    with pytest.raises(ValueError, match="no 'stage_time' rows"):
        bench_search.plot_stage_split(path)


def test_table_without_split_rows(bench) -> None:
    text = bench_search.format_search_table([r for r in bench.rows if r["op"] == "search"])
    assert "stage split" not in text and text.splitlines()[1].startswith("reference ")


def test_reference_draws_on_the_model_device(bench) -> None:
    """The naive baseline (whole search and its split) draws its (B, K, *S) noise with
    ``device=`` the model's device and a generator on it, not on the host then copied."""
    noise = [(kw, out) for shape, kw, out in bench.draws if shape == (B, K, *SHAPE)]
    assert len(noise) >= 2  # the whole-search reference and the split's reference round
    for kwargs, out in noise:
        assert torch.device(kwargs["device"]) == torch.device("cpu") == out.device
        assert kwargs["generator"].device == torch.device("cpu")


def test_search_reference_draws_on_the_device_same_cpu_stream(monkeypatch) -> None:
    model, cond = Flow(), Flow().encode_prompts(["p", "q"])
    mean = torch.zeros((2, *SHAPE))
    cfg = SearchConfig(k=3, rounds=2, top=2, use="sample")
    spy = RandnSpy()
    monkeypatch.setattr(torch, "randn", spy)
    search_reference(model, distance_reward, mean, 0.5, 0.5, cond, cfg, noise="torch",
                     generator=torch.Generator().manual_seed(4))  # fmt: skip
    monkeypatch.undo()
    assert [s for s, _, _ in spy.calls] == [(2, 3, *SHAPE), (2, 3, *SHAPE), (2, 1, *SHAPE)]
    old = torch.Generator().manual_seed(4)  # the host stream of the former host draw + copy
    for _, kwargs, out in spy.calls:
        assert torch.device(kwargs["device"]) == mean.device
        torch.testing.assert_close(out, torch.randn(out.shape, generator=old), rtol=0, atol=0)


CONFIGS = [
    dict(),
    dict(per_element=False),
    dict(alpha=0.5, min_sigma=0.2),
    dict(strategy="best_of"),
    dict(decode_size=4),
]


@pytest.mark.parametrize("extra", CONFIGS, ids=lambda e: ",".join(e) or "default")
@pytest.mark.parametrize("b", [1, 3])
def test_split_rounds_compute_what_the_searches_compute(extra: dict, b: int) -> None:
    """The split runs the searches' own stages on their state: after N rounds its mu, sigma,
    best reward and per-round statistics are the fused search's (same Philox noise) and the
    naive reference's (same torch.randn stream)."""
    model, cfg = Flow(), SearchConfig(k=4, rounds=3, top=2, graph=False, **extra)
    cond = model.encode_prompts([f"p{i}" for i in range(b)])
    mean = torch.randn((b, *SHAPE), generator=torch.Generator().manual_seed(5))
    scale = torch.full((b,), 0.4)
    fused = NoiseSearch(model, distance_reward, cfg)
    staged_f = bench_search._FusedRound(fused, mean, scale, 0.6, cond)
    staged_r = bench_search._ReferenceRound(model, distance_reward, cfg, mean, scale, 0.6, cond,
                                            generator=torch.Generator().manual_seed(6))  # fmt: skip
    with torch.no_grad():
        for staged in (staged_f, staged_r):
            staged.reset()
            for _ in range(cfg.rounds):
                for stage in staged.stages():
                    stage()
    want_f = fused.run(mean, 0.4, 0.6, cond)
    want_r = search_reference(model, distance_reward, mean, 0.4, 0.6, cond, cfg, noise="torch",
                              generator=torch.Generator().manual_seed(6))  # fmt: skip
    st = staged_f.st
    got_f = (st.mu, st.sigma, st.best_reward, st.stats[0], st.stats[1], st.stats[2])
    got_r = (staged_r.mu, staged_r.sigma, staged_r.best_r, *staged_r.stats[:3])
    for got, want in ((got_f, want_f), (got_r, want_r)):
        wanted = (want.mu, want.sigma, want.best_reward, want.rounds.best,
                  want.rounds.elite_mean, want.rounds.mean)  # fmt: skip
        for g, w in zip(got, wanted, strict=True):
            torch.testing.assert_close(g, w, rtol=0, atol=0, equal_nan=True)


def test_reward_option_scores_with_that_reward(tmp_path: Path, monkeypatch) -> None:
    """``--reward`` (with ``--reward-arg``) replaces the model's analytic reward: every
    candidate of every provider is scored by it, and the table's header names it."""
    from smartgrpo_fast.cli import build

    scored: list[int] = []
    real = build.build_reward

    def spy(args, device):
        reward = real(args, device)

        def counted(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
            scored.append(len(images))
            return reward(images, prompts)

        return counted

    monkeypatch.setattr(build, "build_reward", spy)
    got = run_cli(tmp_path, "--reward", "brightness", "--no-plot")
    assert "reward: brightness" in got.printed
    # 2 providers x (a timed search, the peak-memory search, a split round), no warm-up
    assert scored == [B * K] * 6


def test_reward_arg_needs_reward(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exc:
        main([*ARGV, "--out", str(tmp_path), "--reward-arg", "imagereward.random=true"])
    assert exc.value.code == 2
    assert "argument --reward-arg: needs --reward" in capsys.readouterr().err
