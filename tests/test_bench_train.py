"""``bench train``: the split of a GRPO step and the trainer's overhead (structure, not time)."""

from __future__ import annotations

import csv

from smartgrpo_fast.bench.train import CALLS, STAGES, run_train_bench
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
    keys = (*STAGES, "time_step", "overhead", "overhead_frac", *(f"call_{c}" for c in CALLS))
    assert set(med) == set(keys)
    assert all(r["repeats"] == 1 and r["op"] == "grpo_step" for r in rows)
    calls = sum(med[f"call_{c}"] for c in CALLS)
    for c in CALLS:
        assert med[f"call_{c}"] > 0, c
    assert abs(med["overhead"] - (med["time_step"] - calls)) < 1e-9
    assert med["overhead_frac"] == med["overhead"] / med["time_step"]
    assert calls < med["time_step"]


def test_cli_writes_csv_and_prints_the_split(tmp_path, capsys) -> None:
    assert main(["bench", "train", "--steps", "1", "--warmup", "0", "--no-progress",
                 "--out", str(tmp_path), *SMALL]) == 0  # fmt: skip
    out = capsys.readouterr().out
    for word in ("time_search", "call_forward", "overhead", "overhead_frac"):
        assert word in out
    (csv_file,) = tmp_path.glob("train_smart_cpu.csv")
    rows = list(csv.DictReader(csv_file.open()))
    assert {r["metric"] for r in rows} >= {"overhead_frac", "call_backward"}
