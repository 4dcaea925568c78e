"""``bench train``: the split of a GRPO step and the trainer's overhead (structure, not time)."""

from __future__ import annotations

import csv
import time

import pytest
import torch

from smartgrpo_fast.bench.train import CALLS, STAGES, CallTimers, run_train_bench
from smartgrpo_fast.cli import main
from smartgrpo_fast.train.config import load_config

SMALL = [
    "sample.prompts_per_step=1", "sample.group_size=2", "sample.steps=3",
    "sample.sde_window_range=[0, 3]", "search.k=2", "search.rounds=1", "search.top=1",
    "lora.rank=2", "lora.alpha=4", "device=cpu",
]  # fmt: skip


def test_rows_split_the_step_into_calls_and_overhead() -> None:
    rows = run_train_bench(load_config("tiny", SMALL), steps=1, warmup=0, progress=False)
    med = {r["metric"]: r["median"] for r in rows}
    keys = (*STAGES, "time_step", "overhead", "overhead_frac", "peak_mem_bytes",
            "model_calls_per_rollout", "logp_diff_max", *(f"call_{c}" for c in CALLS))  # fmt: skip
    assert set(med) == set(keys)  # no estimated_peak_bytes: no memory check on a CPU by default
    units = {r["metric"]: r["unit"] for r in rows}
    assert units["model_calls_per_rollout"] == "rows" and units["logp_diff_max"] == "nats"
    cfg = load_config("tiny", SMALL)  # one searched step (window 1), its velocity reused after
    assert med["model_calls_per_rollout"] == cfg.sample.steps + cfg.search.forward_rows - 1
    assert 0 <= med["logp_diff_max"] < 1e-5
    assert med["peak_mem_bytes"] > 2**20
    assert all(r["repeats"] == 1 and r["op"] == "grpo_step" for r in rows)
    calls = sum(med[f"call_{c}"] for c in CALLS)
    for c in CALLS:
        assert med[f"call_{c}"] > 0, c
    assert abs(med["overhead"] - (med["time_step"] - calls)) < 1e-9
    assert med["overhead_frac"] == med["overhead"] / med["time_step"]
    assert calls < med["time_step"]
    # The search is timed as a whole, inside the trainer's own time_search window.
    assert med["time_search"] / 2 < med["call_search"] <= med["time_search"] + 1e-3


def test_a_failed_call_does_not_stop_the_timers(monkeypatch) -> None:
    """A synchronize that raised after a call (a failed graph capture inside the search, seen
    on an H200) left the nesting depth up: every later call went uncounted (all call_* 0)."""
    syncs = []

    def sync(*_: object) -> None:
        syncs.append(1)
        if len(syncs) == 2:
            raise RuntimeError("operation failed due to a previous error during capture")

    monkeypatch.setattr(torch.cuda, "synchronize", sync)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    timers = CallTimers(torch.device("cuda", 0))
    with pytest.raises(RuntimeError, match="during capture"), timers.timed("search"):
        pass
    with timers.timed("decode"):
        time.sleep(0.002)
    assert timers.seconds["decode"] >= 0.002 and len(syncs) == 4


def test_timers_never_synchronise_inside_a_graph_capture(monkeypatch) -> None:
    def no_sync(*_: object) -> None:
        raise AssertionError("synchronize during capture")

    monkeypatch.setattr(torch.cuda, "synchronize", no_sync)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    timers = CallTimers(torch.device("cuda", 0))
    with timers.timed("forward"):
        pass
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    with pytest.raises(AssertionError, match="during capture"), timers.timed("forward"):
        pass


def test_cli_writes_csv_and_prints_the_split(tmp_path, capsys) -> None:
    assert main(["bench", "train", "--steps", "1", "--warmup", "0", "--no-progress",
                 "--out", str(tmp_path), *SMALL]) == 0  # fmt: skip
    out = capsys.readouterr().out
    for word in ("time_search", "call_forward", "overhead", "overhead_frac", "peak memory"):
        assert word in out
    (csv_file,) = tmp_path.glob("train_smart_cpu.csv")
    rows = list(csv.DictReader(csv_file.open()))
    assert {r["metric"] for r in rows} >= {"overhead_frac", "call_backward"}


def test_cli_estimates_memory_and_refuses_what_does_not_fit(tmp_path, capsys) -> None:
    """With train.memory_limit_gib the estimate is printed beside the measured peak; below the
    estimate the command stops before any step with the setting to lower."""
    args = ["bench", "train", "--steps", "1", "--warmup", "0", "--no-progress",
            "--out", str(tmp_path), *SMALL]  # fmt: skip
    assert main([*args, "train.memory_limit_gib=64"]) == 0
    assert "estimated peak" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main([*args, "train.memory_limit_gib=0.0001"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "a step needs about" in err and "train.memory_limit_gib = 0.0001 has" in err


#: One step of the sd35-medium config on the tiny random SD3 model (SD3's decode path).
SD3_SMALL = [
    "model.name=random:sd3-tiny", "model.dtype=float32", "model.resolution=null",
    "model.graph=eager", "device=cpu", "reward=tiny-color", "sample.prompts_per_step=1",
    "sample.group_size=2", "sample.steps=4", "sample.sde_window_range=[0, 3]", "search.k=2",
    "search.rounds=1", "search.top=1", "search.decode_size=null", "lora.rank=2",
    "lora.alpha=4", "train.micro_batch=2",
]  # fmt: skip


@pytest.mark.parametrize("preview", [None, "random"])
def test_the_search_decodes_are_timed_inside_the_search(tmp_path, capsys, preview) -> None:
    """An SD3 model's candidate decodes (``decode_preview``: the preview decoder, or the VAE
    without one) are timed as call_preview_decode, a part of call_search (stage by stage on a
    CPU: no replayed rounds); the overhead subtracts them once, inside the search."""
    extra = [] if preview is None else [f"model.preview_decoder={preview}"]
    args = ["bench", "train", "--config", "sd35-medium", "--steps", "1", "--warmup", "0",
            "--no-progress", "--out", str(tmp_path), *SD3_SMALL, *extra]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "preview_decode" in out and "of call_search" in out and "not timed" not in out
    (csv_file,) = tmp_path.glob("train_smart_cpu.csv")
    med = {r["metric"]: float(r["median"]) for r in csv.DictReader(csv_file.open())}
    assert 0 < med["call_preview_decode"] < med["call_search"]
    assert med["search_rounds_replayed"] == 0
    calls = sum(med[f"call_{c}"] for c in CALLS)
    assert abs(med["overhead"] - (med["time_step"] - calls)) < 1e-6
