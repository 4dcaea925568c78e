"""search/report.py: result.json's prompt-match rates and the plots on host copies."""

from __future__ import annotations

import pytest
import torch

from smartgrpo_fast.search.config import RoundStats
from smartgrpo_fast.search.report import MATCH_ATTRIBUTES, prompt_match
from smartgrpo_fast.search.rollout import Comparison


def _comparison(images: dict[str, torch.Tensor], prompts: list[str]) -> Comparison:
    n = len(prompts)
    stats = RoundStats(*(torch.zeros(3, n) for _ in range(3)), torch.zeros(3, n, dtype=torch.long))
    return Comparison(
        prompts=prompts,
        **{f"reward_{k}": torch.zeros(n) for k in ("searched", "random", "bestof")},
        **{f"images_{k}": v for k, v in images.items()},
        rounds=stats,
        rounds_bestof=stats,
    )


class _TableJudge:
    """matches() returns a fixed (N, 3) table per image batch (keyed by its first pixel)."""

    def __init__(self, tables: dict[float, torch.Tensor]) -> None:
        self.tables = tables

    def matches(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return self.tables[float(images[0, 0, 0, 0])]


def test_prompt_match_rates_per_attribute_and_all() -> None:
    tables = {
        0.0: torch.tensor([[1, 1, 1], [0, 1, 1], [0, 0, 1], [0, 0, 0]], dtype=torch.bool),
        1.0: torch.ones(4, 3, dtype=torch.bool),
        2.0: torch.tensor([[1, 0, 1], [1, 1, 1], [1, 1, 0], [1, 1, 1]], dtype=torch.bool),
    }
    images = {k: torch.full((4, 3, 8, 8), v) for k, v in
              (("random", 0.0), ("searched", 1.0), ("bestof", 2.0))}  # fmt: skip
    got = prompt_match(_comparison(images, ["p"] * 4), _TableJudge(tables))
    assert set(got) == {"random", "bestof", "searched"}
    assert got["random"] == {"shape": 0.25, "color": 0.5, "background": 0.75, "all": 0.25}
    assert got["searched"] == dict.fromkeys((*MATCH_ATTRIBUTES, "all"), 1.0)
    assert got["bestof"] == {"shape": 1.0, "color": 0.75, "background": 0.75, "all": 0.5}


def test_prompt_match_refuses_a_judge_of_another_shape() -> None:
    images = {k: torch.zeros(2, 3, 8, 8) for k in ("random", "bestof", "searched")}
    judge = _TableJudge({0.0: torch.ones(2, 2, dtype=torch.bool)})
    with pytest.raises(ValueError, match=r"judge.matches: expected a \(2, 3\) bool tensor"):
        prompt_match(_comparison(images, ["a", "b"]), judge)


def test_prompt_match_with_the_embedded_classifier_on_rendered_images() -> None:
    """Renders of the prompts match (the classifier reads real renders right); renders of
    other prompts do not."""
    from smartgrpo_fast import rewards
    from smartgrpo_fast.shapes.data import sample_batch

    images, attrs = sample_batch(32, torch.Generator().manual_seed(3))
    prompts = attrs.prompts()
    shuffled = images[torch.roll(torch.arange(32), 1)]
    comp = _comparison({"random": shuffled, "bestof": images, "searched": images}, prompts)
    got = prompt_match(comp, rewards.load("tiny"))
    assert got["searched"]["all"] == got["bestof"]["all"] == 1.0
    assert got["random"]["all"] < 0.5


def test_result_model_calls_match_the_calls_made() -> None:
    """result.json's model-call counts, audited: the transformer rows, decodes and reward
    images actually passed while comparing the three continuations equal the per-rollout
    counts summed over strategies, less the shared prefix counted in each."""
    from smartgrpo_fast import models, rewards
    from smartgrpo_fast.search import RolloutConfig, SearchConfig, compare_noise
    from smartgrpo_fast.search.report import result_dict

    model, reward = models.load("tiny"), rewards.load("tiny")
    seen = {"transformer_rows": 0, "decodes": 0, "reward_images": 0}
    forward, decode = model._forward, model.decode

    def counted_forward(z, *args, **kwargs):
        seen["transformer_rows"] += z.shape[0]
        return forward(z, *args, **kwargs)

    def counted_decode(x, *args, **kwargs):
        seen["decodes"] += x.shape[0]
        return decode(x, *args, **kwargs)

    class CountedReward:
        def __call__(self, images, prompts):
            seen["reward_images"] += images.shape[0]
            return reward(images, prompts)

    model._forward, model.decode = counted_forward, counted_decode
    search = SearchConfig(k=3, rounds=2, top=1, graph=False)
    rollout = RolloutConfig(steps=5, step=2, batch=2)
    comp = compare_noise(model, CountedReward(), ["a red circle on a blue background"] * 3,
                         search, rollout)  # fmt: skip
    per = comp.calls
    assert model.guidance_scale > 1 and per["random"]["transformer_rows"] == 2 * 5
    assert per["bestof"] == per["searched"]
    prefix_rows = 2 * (rollout.step + 1)  # run once per prompt, counted in all three
    for what, made in seen.items():
        counted = sum(per[k][what] for k in per) - (
            2 * prefix_rows if what == "transformer_rows" else 0
        )
        assert made == 3 * counted, what
    res = result_dict(comp, search, rollout, model="tiny", reward="tiny", device="cpu")
    assert res["model_calls"]["total"]["searched"]["transformer_rows"] == 3 * 2 * (5 + 6)
