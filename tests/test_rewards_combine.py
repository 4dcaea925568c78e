"""Reward combinators: WeightedSum against a hand-computed sum of the tiny rewards,
parse_reward_spec, and AsyncReward's semantics (same result, errors, ordering; no timing)."""

from __future__ import annotations

import math
import threading

import pytest
import torch

from smartgrpo_fast import rewards
from smartgrpo_fast.rewards.combine import (
    AsyncReward,
    RewardFuture,
    WeightedSum,
    parse_reward_spec,
)
from smartgrpo_fast.shapes.data import prompt_of, sample_batch

WAIT = 30.0  # seconds: a safety net against hangs, never a timing assertion


def _batch(n: int = 8, seed: int = 0) -> tuple[torch.Tensor, list[str]]:
    images, a = sample_batch(n, torch.Generator().manual_seed(seed))
    prompts = [
        prompt_of(int(s), int(c), int(b))
        for s, c, b in zip(a.shape, a.color, a.background, strict=True)
    ]
    return images, prompts


@pytest.fixture(scope="module")
def tiny():
    return rewards.load("tiny")


@pytest.fixture(scope="module")
def color():
    return rewards.load("tiny-color")


class Const:
    """A reward returning fixed values, counting its calls."""

    def __init__(self, values) -> None:
        self.values = torch.as_tensor(values, dtype=torch.float32)
        self.calls = 0

    def __call__(self, images, prompts):
        self.calls += 1
        return self.values[: images.shape[0]].clone()


# ------------------------------------------------------------------------------------------
# WeightedSum
# ------------------------------------------------------------------------------------------


# ------------------------------------------------------------------------------------------
# prepare / score (the graph-safe split)
# ------------------------------------------------------------------------------------------


def _swapped(prepared: rewards.PreparedPrompts) -> rewards.PreparedPrompts:
    """The same tensors under other prompt strings: score must read only the tensors."""
    return rewards.PreparedPrompts(("unrelated",) * len(prepared), prepared.tensors)


@pytest.mark.parametrize("n", [1, 5])
@pytest.mark.parametrize("spec", ["tiny", "tiny-prob", "tiny-min", "tiny-margin", "tiny-color",
                                  "tiny:1,tiny-color:0.5"])  # fmt: skip
def test_prepare_then_score_equals_the_call(spec: str, n: int) -> None:
    reward = rewards.reward_from_spec(spec)
    images, prompts = _batch(n, seed=3)
    prepared = reward.prepare(prompts)
    assert isinstance(reward, rewards.PreparedReward) and prepared.complete
    for name, t in prepared.tensors.items():
        assert t.shape[0] == n, name
    want = reward(images, prompts)
    torch.testing.assert_close(reward.score(images, prepared), want, atol=0, rtol=0)
    torch.testing.assert_close(reward.score(images, _swapped(prepared)), want, atol=0, rtol=0)
    other = reward.prepare(_batch(n, seed=4)[1])  # other prompts: the same shapes
    assert other.signature() == prepared.signature()


def test_weighted_sum_prepares_each_component_and_knows_when_it_is_incomplete(tiny) -> None:
    images, prompts = _batch(4)
    const = Const([1.0, 2.0, 3.0, 4.0])
    ws = WeightedSum({"tiny": 1.0, "const": 0.5}, rewards={"tiny": tiny, "const": const})
    prepared = ws.prepare(prompts)
    assert list(prepared.tensors) == ["tiny/targets"] and not prepared.complete
    want = tiny(images, prompts) + 0.5 * const.values
    torch.testing.assert_close(ws.score(images, prepared), want, atol=1e-6, rtol=0)


def test_prepare_prompts_and_score_prepared_serve_any_reward(tiny) -> None:
    images, prompts = _batch(3)
    const = Const([1.0, 2.0, 3.0])
    bare = rewards.prepare_prompts(const, prompts)
    assert bare.prompts == tuple(prompts) and not bare.tensors and not bare.complete
    assert torch.equal(rewards.score_prepared(const, images, bare), const.values)
    prepared = rewards.prepare_prompts(tiny, prompts)
    assert prepared.complete and set(prepared.tensors) == {"targets"}
    assert torch.equal(rewards.score_prepared(tiny, images, prepared), tiny(images, prompts))


def test_score_checks_the_prepared_prompts(tiny) -> None:
    images, prompts = _batch(3)
    with pytest.raises(TypeError, match="prepared: expected PreparedPrompts, got list"):
        tiny.score(images, prompts)
    with pytest.raises(ValueError, match="prompts: expected 3 prompts"):
        tiny.score(images, tiny.prepare(prompts[:2]))
    bad = rewards.PreparedPrompts(tuple(prompts), {"targets": torch.zeros(2, 3, dtype=torch.long)})
    with pytest.raises(ValueError, match="prepared: tensor 'targets' has shape \\(2, 3\\)"):
        tiny.score(images, bad)
    with pytest.raises(ValueError, match="tensors: expected the names \\['targets'\\]"):
        tiny.prepare(prompts).with_tensors({"other": torch.zeros(3)})


def test_weighted_sum_equals_the_hand_computed_sum(tiny, color) -> None:
    images, prompts = _batch()
    ws = WeightedSum({"tiny": 1.0, "tiny-color": 0.5}, {"tiny": tiny, "tiny-color": color})
    expected = 1.0 * tiny(images, prompts) + 0.5 * color(images, prompts)
    out = ws(images, prompts)
    assert out.shape == (8,) and out.dtype == torch.float32
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    comps = ws.components(images, prompts)
    assert list(comps) == ["tiny", "tiny-color"]
    torch.testing.assert_close(comps["tiny"], tiny(images, prompts), atol=0, rtol=0)
    torch.testing.assert_close(comps["tiny-color"], color(images, prompts), atol=0, rtol=0)
    assert repr(ws) == "WeightedSum(1*tiny + 0.5*tiny-color)"


def test_rewards_not_given_are_loaded_by_name(color) -> None:
    images, prompts = _batch(seed=1)
    ws = WeightedSum({"tiny-prob": 2.0, "tiny-color": -1.0}, {"tiny-color": color})
    assert ws.rewards["tiny-color"] is color
    expected = 2.0 * rewards.load("tiny-prob")(images, prompts) - color(images, prompts)
    torch.testing.assert_close(ws(images, prompts), expected, atol=1e-6, rtol=0)
    spec = WeightedSum.from_spec("tiny-color:0.25", min_cover=0.5)  # load_kwargs reach load()
    assert spec.rewards["tiny-color"].min_cover == 0.5 and spec.weights == {"tiny-color": 0.25}


def test_each_component_is_scored_once_per_call() -> None:
    a, b = Const([1.0, 2.0]), Const([10.0, 20.0])
    ws = WeightedSum({"a": 1.0, "b": 0.1}, {"a": a, "b": b})
    torch.testing.assert_close(ws(torch.zeros(2, 3, 4, 4), ["p", "q"]), torch.tensor([2.0, 4.0]))
    assert a.calls == b.calls == 1


def test_zero_weight_is_logged_not_summed_and_nan_propagates() -> None:
    images = torch.zeros(2, 3, 4, 4)
    ws = WeightedSum({"a": 1.0, "z": 0.0}, {"a": Const([1.0, 2.0]), "z": Const([math.nan] * 2)})
    torch.testing.assert_close(ws(images, ["p", "q"]), torch.tensor([1.0, 2.0]))
    assert ws.components(images, ["p", "q"])["z"].isnan().all()
    ws = WeightedSum({"a": 1.0, "n": 0.5}, {"a": Const([1.0, 2.0]), "n": Const([math.nan, 1.0])})
    out = ws(images, ["p", "q"])
    assert math.isnan(out[0]) and float(out[1]) == 2.5
    ws = WeightedSum({"a": 1.0, "i": -1.0}, {"a": Const([1.0, 2.0]), "i": Const([math.inf, 0])})
    assert ws(images, ["p", "q"])[0] == -math.inf


@pytest.mark.parametrize(
    "weights,match",
    [
        ({}, r"^weights: expected a non-empty mapping"),
        ([("a", 1.0)], r"^weights: expected a non-empty mapping"),
        ({"a": math.nan}, r"^weights: weight of 'a' must be finite"),
        ({"a": math.inf}, r"^weights: weight of 'a' must be finite"),
        ({"a": "1"}, r"^weights: weight of 'a' must be a number"),
        ({"a": 0.0, "b": 0}, r"^weights: all weights are zero"),
        ({"": 1.0}, r"^weights: reward names must be non-empty"),
    ],
)
def test_weight_validation(weights, match) -> None:
    with pytest.raises(ValueError, match=match):
        WeightedSum(weights, {"a": Const([1.0]), "b": Const([1.0])} if weights else None)


def test_reward_without_weight_and_unknown_names() -> None:
    with pytest.raises(ValueError, match=r"^rewards: \['b'\] have no weight"):
        WeightedSum({"a": 1.0}, {"a": Const([1.0]), "b": Const([1.0])})
    with pytest.raises(ValueError, match=r"name_or_path: expected one of"):
        WeightedSum({"no-such-reward": 1.0})


@pytest.mark.parametrize(
    "bad,exc,match",
    [
        (
            Const([[1.0, 2.0]]),
            ValueError,
            r"^reward 'bad': returned shape \(1, 2\), expected \(2,\)",
        ),
        (lambda i, p: torch.zeros(3), ValueError, r"^reward 'bad': returned shape \(3,\)"),
        (lambda i, p: [1.0, 2.0], TypeError, r"^reward 'bad': returned list, expected a tensor"),
    ],
)
def test_wrong_component_output_names_the_component(bad, exc, match) -> None:
    ws = WeightedSum({"ok": 1.0, "bad": 1.0}, {"ok": Const([1.0, 2.0]), "bad": bad})
    with pytest.raises(exc, match=match):
        ws(torch.zeros(2, 3, 4, 4), ["p", "q"])


def test_weighted_sum_checks_inputs() -> None:
    ws = WeightedSum({"a": 1.0}, {"a": Const([1.0, 2.0])})
    with pytest.raises(ValueError, match="2 prompts"):
        ws(torch.zeros(2, 3, 4, 4), ["p"])


# ------------------------------------------------------------------------------------------
# parse_reward_spec
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec,expected",
    [
        ("tiny:1,tiny-color:0.5", {"tiny": 1.0, "tiny-color": 0.5}),
        ("tiny", {"tiny": 1.0}),
        (" tiny : 2 , tiny-color ", {"tiny": 2.0, "tiny-color": 1.0}),
        ("a:-1e-2,b:0", {"a": -0.01, "b": 0.0}),
        ("org/model:v1:0.5", {"org/model:v1": 0.5}),
    ],
)
def test_parse_reward_spec(spec, expected) -> None:
    assert parse_reward_spec(spec) == expected


@pytest.mark.parametrize(
    "spec,match",
    [
        ("", r"^spec: expected 'NAME\[:WEIGHT\],\.\.\.'"),
        ("tiny,tiny:2", r"^spec: duplicate reward name 'tiny'"),
        ("tiny,", r"^spec: empty reward name in part ''"),
        (":1", r"^spec: empty reward name in part ':1'"),
        ("tiny:x", r"^spec: bad weight 'x' in part 'tiny:x'"),
        ("tiny:", r"^spec: bad weight '' in part 'tiny:'"),
        ("tiny:nan", r"^spec: weight must be finite, got 'nan'"),
        ("tiny:inf", r"^spec: weight must be finite, got 'inf'"),
    ],
)
def test_parse_reward_spec_errors(spec, match) -> None:
    with pytest.raises(ValueError, match=match):
        parse_reward_spec(spec)


# ------------------------------------------------------------------------------------------
# AsyncReward
# ------------------------------------------------------------------------------------------


class Gated:
    """Blocks in __call__ until ``gate`` is set; records the order of events."""

    def __init__(self, inner, log: list[str]) -> None:
        self.inner, self.log = inner, log
        self.started, self.gate = threading.Event(), threading.Event()

    def __call__(self, images, prompts):
        self.started.set()
        assert self.gate.wait(WAIT), "test gate never opened"
        self.log.append("reward")
        return self.inner(images, prompts)


def test_async_equals_sync(tiny) -> None:
    images, prompts = _batch(seed=2)
    with AsyncReward(tiny) as ar:
        fut = ar.submit(images, prompts)
        assert isinstance(fut, RewardFuture)
        torch.testing.assert_close(fut.result(WAIT), tiny(images, prompts), atol=0, rtol=0)
        assert fut.done()
        torch.testing.assert_close(ar(images, prompts), tiny(images, prompts), atol=0, rtol=0)


def test_async_overlaps_the_callers_work_and_keeps_order(color) -> None:
    """submit returns while the reward is still blocked; the caller's work happens before the
    reward finishes; queued submissions run in order."""
    log: list[str] = []
    gated = Gated(color, log)
    images, prompts = _batch(seed=3)
    with AsyncReward(gated) as ar:
        first = ar.submit(images, prompts)
        second = ar.submit(images[:4], prompts[:4])
        assert gated.started.wait(WAIT)
        assert not first.done() and not second.done()
        log.append("caller")  # the caller goes on while the reward runs
        gated.gate.set()
        a, b = first.result(WAIT), second.result(WAIT)
    assert log == ["caller", "reward", "reward"]
    torch.testing.assert_close(a, color(images, prompts), atol=0, rtol=0)
    torch.testing.assert_close(b, color(images[:4], prompts[:4]), atol=0, rtol=0)


@pytest.mark.parametrize("copy_inputs", [True, False])
def test_copy_inputs_protects_buffers_the_caller_overwrites(color, copy_inputs) -> None:
    gated = Gated(color, [])
    images, prompts = _batch(seed=4)
    original = color(images, prompts)
    buf, pbuf = images.clone(), list(prompts)
    with AsyncReward(gated, copy_inputs=copy_inputs) as ar:
        fut = ar.submit(buf, pbuf)
        assert gated.started.wait(WAIT)
        buf.copy_(_batch(seed=5)[0])  # the caller reuses its buffers for the next batch
        pbuf.reverse()
        gated.gate.set()
        out = fut.result(WAIT)
    if copy_inputs:
        torch.testing.assert_close(out, original, atol=0, rtol=0)
    else:  # without copies the reward reads what is in the buffers when it runs
        torch.testing.assert_close(out, color(buf, pbuf), atol=0, rtol=0)


class Boom(RuntimeError):
    pass


def test_async_reraises_worker_errors_with_their_type(color) -> None:
    def failing(images, prompts):
        raise Boom("reward failed")

    with AsyncReward(failing) as ar:
        fut = ar.submit(torch.zeros(2, 3, 4, 4), ["p", "q"])
        with pytest.raises(Boom, match="reward failed"):
            fut.result(WAIT)
        assert fut.done()
        with pytest.raises(Boom):
            ar(torch.zeros(2, 3, 4, 4), ["p", "q"])
    with AsyncReward(color) as ar:  # the reward's own input checks surface on result()
        fut = ar.submit(torch.full((2, 3, 4, 4), 2.0), ["p", "q"])
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            fut.result(WAIT)
        with pytest.raises(TypeError, match="float tensor"):
            ar.submit([1, 2], ["p", "q"]).result(WAIT)
        # the worker survives errors
        images, prompts = _batch(seed=6)
        torch.testing.assert_close(ar(images, prompts), color(images, prompts), atol=0, rtol=0)


def test_close_waits_and_refuses_new_work(color) -> None:
    gated = Gated(color, [])
    images, prompts = _batch(seed=7)
    ar = AsyncReward(gated)
    fut = ar.submit(images, prompts)
    gated.gate.set()
    ar.close()
    assert fut.done()
    ar.close()  # idempotent
    with pytest.raises(RuntimeError, match="after close"):
        ar.submit(images, prompts)
    with pytest.raises(TypeError, match="callable"):
        AsyncReward(object())


def test_async_weighted_sum(tiny, color) -> None:
    ws = WeightedSum({"tiny": 1.0, "tiny-color": 2.0}, {"tiny": tiny, "tiny-color": color})
    images, prompts = _batch(seed=8)
    with AsyncReward(ws) as ar:
        torch.testing.assert_close(ar(images, prompts), ws(images, prompts), atol=0, rtol=0)


# ------------------------------------------------------------------------------------------
# CUDA: the side stream
# ------------------------------------------------------------------------------------------


@pytest.mark.cuda
def test_cuda_async_runs_on_a_side_stream_after_the_producer(color) -> None:
    streams: list[torch.cuda.Stream] = []

    def on_stream(images, prompts):
        streams.append(torch.cuda.current_stream())
        return color(images, prompts)

    images, prompts = _batch(64, seed=9)
    expected = color(images, prompts).cuda()
    dev = torch.empty_like(images, device="cuda")
    with AsyncReward(on_stream) as ar:
        # producer: a long queue of work on the current stream, then the images
        big = torch.randn(2048, 2048, device="cuda")
        for _ in range(20):
            big = (big @ big).tanh_()
        dev.copy_(images.cuda() + 0 * big.sum())
        fut = ar.submit(dev, prompts)
        dev.fill_(0.5)  # overwritten right after submit: copy_inputs=True protects it
        out = fut.result(WAIT)
        assert out.device.type == "cuda" and out.dtype == torch.float32
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
        assert streams and streams[0] != torch.cuda.default_stream()
        # CPU images on a CUDA reward device: moved there, results come back on the CPU
        ar_cpu = AsyncReward(on_stream, device="cuda")
        with ar_cpu:
            back = ar_cpu(images, prompts)
        assert back.device.type == "cpu"
        torch.testing.assert_close(back, expected.cpu(), atol=1e-5, rtol=0)
