"""A reward's ``score`` on prepared prompts must be capturable in a CUDA graph (a search round):
no read of a device value (``.item()``, ``bool(t)``: a sync) and no host-to-device copy.

Checked without a GPU on the ``meta`` device: a dispatch mode records every ``.item()``
(``aten._local_scalar_dense``, which meta tensors refuse) and every op that turns a CPU tensor
of one or more dimensions into a meta one (what a host-to-device copy is there), in the call
after a warm-up one (the search warms a round up before it captures it). Found by the H200
lease of 2026-12-04: transformers' BLIP text model asked ``attention_mask.all()``, so the GRPO
trainer's search with ImageReward ran stage by stage.
"""

from __future__ import annotations

import pytest
import test_rewards_clip
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import smartgrpo_fast.rewards.base as reward_base
from smartgrpo_fast.rewards.base import PreparedPrompts, prepare_prompts, score_prepared

pytest.importorskip("transformers")


class _HostReads(TorchDispatchMode):
    """Records the ops that read a device value or copy a host tensor to the device."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._local_scalar_dense.default:
            self.found.append("item()")
            raise RuntimeError("a device value was read")
        out = func(*args, **kwargs)
        ins = [a for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        outs = [o for o in tree_leaves(out) if isinstance(o, torch.Tensor)]
        host = [tuple(a.shape) for a in ins if a.device.type == "cpu" and a.dim() > 0]
        if host and any(o.device.type == "meta" for o in outs):
            self.found.append(f"{func} from host tensors {host}")
        return out


def test_the_spy_sees_a_read_and_a_copy() -> None:
    spy = _HostReads()
    x = torch.ones(3, device="meta")
    with spy:
        x + torch.tensor([1.0, 2.0, 3.0]).to("meta")
        with pytest.raises(RuntimeError, match="device value"):
            bool(x.sum() > 0)
    assert len(spy.found) == 2, spy.found


def _capture_safe_score(reward, prepared: PreparedPrompts, size: int) -> torch.Tensor:
    """Score meta images as a search round does, from prompts prepared before the round: one
    warm-up call (the search warms the round up before capturing it: per-device constants are
    made there), then the call a capture would record, under the spy."""
    images = torch.empty(len(prepared.prompts), 3, size, size, device="meta")
    score_prepared(reward, images, prepared)
    spy = _HostReads()
    with spy:
        out = score_prepared(reward, images, prepared)
    assert spy.found == []
    assert out.shape == (len(prepared.prompts),) and out.dtype == torch.float32
    return out


@pytest.fixture
def no_value_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    """The value checks are skipped while a graph is captured (base._check_values); meta
    tensors have no values to check."""
    monkeypatch.setattr(reward_base, "_check_values", lambda *a, **k: None)


def test_imagereward_score_reads_no_device_value(no_value_checks) -> None:
    from smartgrpo_fast.rewards.imagereward import random_imagereward

    reward = random_imagereward(device="meta", dtype=torch.bfloat16)
    # padded to 35 tokens: a real attention mask
    prompts = ["a cat", "a red circle on a blue background"]
    _capture_safe_score(reward, prepare_prompts(reward, prompts, torch.device("meta")), 512)


tiny_dir = test_rewards_clip.tiny_dir  # the fixture: a tiny random CLIP saved to a folder


@pytest.mark.parametrize("name", ["aesthetic", "pickscore", "clipscore"])
def test_clip_rewards_score_reads_no_device_value(no_value_checks, tiny_dir, name) -> None:
    from smartgrpo_fast.rewards import clip as C

    d = tiny_dir / "model"
    reward = {
        "aesthetic": lambda: C.load_aesthetic(d, tiny_dir / "head.pth"),
        "pickscore": lambda: C.load_pickscore(d, d),
        "clipscore": lambda: C.load_clipscore(d),
    }[name]()
    # the prompts are encoded before the round (on the CPU here), then everything goes to meta
    cpu = prepare_prompts(reward, ["a red square", "the cross"], torch.device("cpu"))
    prepared = PreparedPrompts(cpu.prompts, {k: v.to("meta") for k, v in cpu.tensors.items()})
    reward.model.to("meta")
    if name == "aesthetic":
        reward.head.to("meta")
    _capture_safe_score(reward, prepared, 48)
