"""Reward combinators: a weighted sum of rewards, its CLI spec, and an asynchronous wrapper.

* :class:`WeightedSum`: ``sum_i w_i * r_i(images, prompts)``; each component is scored once per
  call on the whole batch, and :meth:`WeightedSum.components` gives the unweighted scores for
  logging.
* :func:`parse_reward_spec`: ``"tiny:1,tiny-color:0.5"`` -> ``{"tiny": 1.0, "tiny-color": 0.5}``.
* :class:`AsyncReward`: scores a batch while the caller goes on (on CUDA, on a side stream).
"""

from __future__ import annotations

import math
import numbers
import threading
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from smartgrpo_fast.rewards.base import (
    PreparedPrompts,
    Reward,
    check_images,
    check_prepared,
    prepare_prompts,
    score_prepared,
)

__all__ = ["AsyncReward", "RewardFuture", "WeightedSum", "parse_reward_spec"]


# --------------------------------------------------------------------------------------------
# Weighted sum
# --------------------------------------------------------------------------------------------


def _weight(name: str, value: object, argument: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{argument}: weight of {name!r} must be a number, got {value!r}")
    w = float(value)
    if not math.isfinite(w):
        raise ValueError(f"{argument}: weight of {name!r} must be finite, got {value!r}")
    return w


class WeightedSum:
    """``sum_i w_i * r_i(images, prompts)``, float32 (N,) on the images' device.

    ``weights`` maps a name to its weight; a name missing from ``rewards`` is loaded with
    ``smartgrpo_fast.rewards.load(name, **load_kwargs)`` (the same keyword arguments for every
    loaded name: build a reward yourself and pass it in ``rewards`` to configure it alone).

    A component with weight 0 is still scored (see :meth:`components`) but left out of the sum.
    NaN or inf from a component with a non-zero weight propagates into the sum on purpose: the
    search ranks non-finite rewards last and counts them, rather than have them hidden here.
    """

    def __init__(
        self,
        weights: Mapping[str, float],
        rewards: Mapping[str, Reward] | None = None,
        **load_kwargs: Any,
    ) -> None:
        if not isinstance(weights, Mapping) or not weights:
            raise ValueError(
                f"weights: expected a non-empty mapping name -> weight, got {weights!r}"
            )
        for name in weights:
            if not isinstance(name, str) or not name.strip():
                raise ValueError(f"weights: reward names must be non-empty strings, got {name!r}")
        self.weights = {name: _weight(name, w, "weights") for name, w in weights.items()}
        if all(w == 0.0 for w in self.weights.values()):
            raise ValueError(f"weights: all weights are zero ({self.weights})")
        given = dict(rewards or {})
        if extra := [k for k in given if k not in self.weights]:
            raise ValueError(f"rewards: {extra} have no weight in weights ({list(self.weights)})")
        from smartgrpo_fast.rewards import load

        self.rewards: dict[str, Reward] = {}
        for name in self.weights:
            reward = given[name] if name in given else load(name, **load_kwargs)
            if not callable(reward):
                raise TypeError(f"rewards: {name!r} is not callable ({type(reward).__name__})")
            self.rewards[name] = reward

    @classmethod
    def from_spec(cls, spec: str, **load_kwargs: Any) -> WeightedSum:
        """From the CLI form ``NAME[:WEIGHT],...`` (see :func:`parse_reward_spec`)."""
        return cls(parse_reward_spec(spec), **load_kwargs)

    def prepare(
        self, prompts: list[str], device: torch.device | str | None = None
    ) -> PreparedPrompts:
        """Every component's prepared tensors, named ``"<component>/<name>"``; ``complete``
        only when every component has a ``prepare`` (the others get the prompt strings)."""
        if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)):
            raise TypeError(f"prompts: expected a list of strings, got {type(prompts).__name__}")
        tensors: dict[str, torch.Tensor] = {}
        complete = True
        for name, reward in self.rewards.items():
            part = prepare_prompts(reward, list(prompts), device)
            complete &= part.complete
            tensors.update({f"{name}/{k}": v for k, v in part.tensors.items()})
        return PreparedPrompts(tuple(prompts), tensors, complete)

    def components(self, images: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Each component's unweighted (N,) float32 scores on the images' device, in the order
        of ``weights``; every component is called once, on the whole batch."""
        check_images(images, prompts)
        return self.prepared_components(images, self.prepare(prompts, images.device))

    def prepared_components(
        self, images: torch.Tensor, prepared: PreparedPrompts
    ) -> dict[str, torch.Tensor]:
        """:meth:`components` from :meth:`prepare`'s tensors (graph-safe when ``complete``)."""
        check_prepared(images, prepared)
        n = images.shape[0]
        out: dict[str, torch.Tensor] = {}
        for name, reward in self.rewards.items():
            r = score_prepared(reward, images, prepared.part(f"{name}/"))
            if not isinstance(r, torch.Tensor):
                raise TypeError(f"reward {name!r}: returned {type(r).__name__}, expected a tensor")
            if tuple(r.shape) != (n,):
                raise ValueError(
                    f"reward {name!r}: returned shape {tuple(r.shape)}, expected ({n},) "
                    "(one score per image)"
                )
            out[name] = r.to(images.device, torch.float32)
        return out

    def combine(self, components: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The weighted sum of scores returned by :meth:`components`."""
        first = next(iter(components.values()))
        total = torch.zeros_like(first, dtype=torch.float32)
        for name, w in self.weights.items():
            if w != 0.0:
                total = total + w * components[name]
        return total

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return self.combine(self.components(images, prompts))

    def score(self, images: torch.Tensor, prepared: PreparedPrompts) -> torch.Tensor:
        """The weighted sum from prepared prompts (see :meth:`prepare`)."""
        return self.combine(self.prepared_components(images, prepared))

    def __repr__(self) -> str:
        terms = " + ".join(f"{w:g}*{name}" for name, w in self.weights.items())
        return f"WeightedSum({terms})"


def parse_reward_spec(spec: str) -> dict[str, float]:
    """Parse ``NAME[:WEIGHT],NAME[:WEIGHT],...`` (weight default 1.0, spaces ignored).

    The weight is what follows the *last* ``:`` of a part, so names may contain ``:`` only if
    a weight is given. Empty names, bad or non-finite numbers and duplicate names raise
    ``ValueError`` naming the bad part.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"spec: expected 'NAME[:WEIGHT],...', got {spec!r}")
    out: dict[str, float] = {}
    for raw in spec.split(","):
        part = raw.strip()
        name, sep, weight = part.rpartition(":")
        if not sep:
            name, weight = part, "1"
        name, weight = name.strip(), weight.strip()
        if not name:
            raise ValueError(f"spec: empty reward name in part {raw!r} of {spec!r}")
        try:
            w = float(weight)
        except ValueError:
            raise ValueError(f"spec: bad weight {weight!r} in part {raw!r} of {spec!r}") from None
        if not math.isfinite(w):
            raise ValueError(f"spec: weight must be finite, got {weight!r} in part {raw!r}")
        if name in out:
            raise ValueError(f"spec: duplicate reward name {name!r} in {spec!r}")
        out[name] = w
    return out


# --------------------------------------------------------------------------------------------
# Asynchronous scoring
# --------------------------------------------------------------------------------------------


class RewardFuture:
    """The pending result of :meth:`AsyncReward.submit`."""

    def __init__(self, future: Future, device: torch.device) -> None:
        self._future = future
        self._device = device  # the submitted images' device: where result() puts the scores

    def done(self) -> bool:
        """True once the scores are ready (on CUDA: the side stream's work too)."""
        if not self._future.done():
            return False
        if self._future.exception() is not None:
            return True
        _, event = self._future.result()
        return event is None or event.query()

    def result(self, timeout: float | None = None) -> torch.Tensor:
        """The (N,) scores on the submitted images' device; an error raised by the reward is
        raised here, with its original type. On CUDA the caller's current stream is made to
        wait for the side stream (no host sync)."""
        out, event = self._future.result(timeout)
        if not isinstance(out, torch.Tensor):
            return out
        if event is not None and out.is_cuda:
            consumer = torch.cuda.current_stream(out.device)
            consumer.wait_event(event)
            out.record_stream(consumer)  # allocated on the side stream, used on this one
        return out.to(self._device)


class AsyncReward:
    """Score batches while the caller goes on with its next work.

    ``submit(images, prompts)`` returns at once with a :class:`RewardFuture`; ``__call__`` is
    ``submit(...).result()``. Calls run one at a time, in submission order, on a single worker
    thread, so the wrapped reward needs no thread safety.

    * CUDA (``device``, or else the images' device, is a CUDA device): the worker runs the reward
      on a dedicated side ``torch.cuda.Stream``. ``submit`` records an event on the caller's
      current (producer) stream and the side stream waits on it, so the reward sees the images
      as they were at submit time; the inputs are ``record_stream``-ed to the side stream, and
      :meth:`RewardFuture.result` makes the caller's stream wait on an event recorded after the
      reward. The thread is there too because rewards sync the host (input checks, ``.item()``),
      which would otherwise block the caller.
    * CPU (or no CUDA): the worker thread alone.

    ``copy_inputs=True`` (default) clones the images (and copies the prompt list) at submit
    time, so the caller may overwrite its buffers right after ``submit``; with ``False`` it must
    leave them alone until the result is ready. Images on another device than ``device`` are
    moved there; results come back on the submitted images' device.

    ``close()`` (or leaving a ``with`` block) waits for pending work and stops the thread.
    """

    def __init__(
        self,
        reward: Reward,
        *,
        device: torch.device | str | None = None,
        copy_inputs: bool = True,
    ) -> None:
        if not callable(reward):
            raise TypeError(f"reward: expected a callable reward, got {type(reward).__name__}")
        self.reward = reward
        self.device = torch.device(device) if device is not None else None
        self.copy_inputs = copy_inputs
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="smartgrpo-reward")
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self._lock = threading.Lock()
        self._closed = False

    def _side_stream(self, device: torch.device) -> torch.cuda.Stream:
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device=device)
        return self._streams[device]

    def submit(self, images: torch.Tensor, prompts: list[str]) -> RewardFuture:
        """Start scoring; returns at once. Input errors surface on ``result()``."""
        with self._lock:
            if self._closed:
                raise RuntimeError("AsyncReward: submit after close()")
            if not isinstance(images, torch.Tensor):  # let the reward raise its own error
                fut = self._executor.submit(self._run, images, prompts)
                return RewardFuture(fut, torch.device("cpu"))
            origin = images.device
            target = self.device if self.device is not None else origin
            if target.type == "cuda" and target.index is None:
                target = torch.device("cuda", torch.cuda.current_device())
            if self.copy_inputs:
                images = images.clone()
                prompts = list(prompts) if isinstance(prompts, (list, tuple)) else prompts
            if target.type != "cuda":
                fut = self._executor.submit(self._run, images, prompts, target)
                return RewardFuture(fut, origin)
            # Producer side: move, fence and hand over on the caller's current stream.
            images = images.to(target, non_blocking=True)
            side = self._side_stream(target)
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(target))
            images.record_stream(side)
            fut = self._executor.submit(self._run_cuda, images, prompts, side, ready)
            return RewardFuture(fut, origin)

    def _run(self, images: Any, prompts: Any, target: torch.device | None = None):
        if target is not None and isinstance(images, torch.Tensor):
            images = images.to(target)
        return self.reward(images, prompts), None

    def _run_cuda(self, images, prompts, side: torch.cuda.Stream, ready: torch.cuda.Event):
        with torch.cuda.device(side.device), torch.cuda.stream(side):
            side.wait_event(ready)
            out = self.reward(images, prompts)
            done = torch.cuda.Event()
            done.record(side)
        return out, done

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return self.submit(images, prompts).result()

    def close(self) -> None:
        """Wait for pending work and stop the worker thread (idempotent)."""
        with self._lock:
            self._closed = True
        self._executor.shutdown(wait=True)

    def __enter__(self) -> AsyncReward:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
