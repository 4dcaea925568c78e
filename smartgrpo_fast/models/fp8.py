"""A float8 copy of a transformer for the search's no-grad forwards (torchao, extra ``fp8``).

The search scores K*N candidates per searched step with forwards whose only use is a reward on
a one-step preview: precision there buys little, speed a lot. :func:`float8_transformer` copies
the transformer and quantizes the copy's linear layers with torchao's dynamic float8
activations and weights (``Float8DynamicActivationFloat8WeightConfig``, per-tensor scales;
Hopper / Ada tensor cores through ``torch._scaled_mm``). The original is untouched: the
rollout's steps, its log-probabilities and training keep running on it.

Float8 matmuls need a CUDA GPU of compute capability >= 8.9; :func:`check_float8` says why not
anywhere else, before any copy is made. torchao's binary releases follow torch's: 0.17 and
0.18 are built for torch 2.11 (the GPU machines' release; 0.16 is 2.10's), and
:data:`TORCHAO_REQUIREMENT` is the range this module was written and tested against. A torchao
that fails to import or lacks the names used here is an error naming both versions.
(diffusers 0.42 logs "Unable to import `torchao` Tensor objects" with any torchao >= 0.17: its
list of classes to unpickle names modules torchao moved. It concerns loading checkpoints saved
by torchao, not this copy.)
"""

from __future__ import annotations

import copy
from importlib import metadata
from typing import Any

import torch

__all__ = [
    "FP8_EXTRA",
    "MIN_CAPABILITY",
    "TORCHAO_REQUIREMENT",
    "adapter_key",
    "check_float8",
    "float8_transformer",
    "versions",
]

#: The pip extra that installs torchao.
FP8_EXTRA = "smartgrpo-fast[fp8]"
#: The torchao releases of the ``fp8`` extra (pyproject.toml says the same).
TORCHAO_REQUIREMENT = "torchao>=0.17,<0.19"
#: The lowest CUDA compute capability with float8 tensor cores (Ada Lovelace; Hopper is 9.0).
MIN_CAPABILITY = (8, 9)
#: What :func:`float8_transformer` takes from ``torchao.quantization``.
_NAMES = ("quantize_", "Float8DynamicActivationFloat8WeightConfig", "Float8Tensor")


def _torchao_version() -> str | None:
    try:
        return metadata.version("torchao")
    except metadata.PackageNotFoundError:
        return None


def versions() -> str:
    """``torch X, torchao Y`` (or ``torchao not installed``), for logs and errors."""
    ao = _torchao_version()
    return f"torch {torch.__version__}, " + (
        "torchao not installed" if ao is None else f"torchao {ao}"
    )


def _torchao_quantization() -> Any:
    """``torchao.quantization``, checked to hold what this module uses; RuntimeError naming
    the versions where torchao is missing, fails to import, or is too old or too new."""
    wants = (
        f"pip install '{FP8_EXTRA}' ({TORCHAO_REQUIREMENT}; 0.17 and 0.18 are built for torch 2.11)"
    )
    try:
        import torchao.quantization as quantization
    except Exception as exc:  # ImportError, or a torchao built for another torch failing
        raise RuntimeError(
            f"search dtype float8: torchao cannot be imported ({type(exc).__name__}: {exc}; "
            f"{versions()}); install it with {wants}"
        ) from None
    missing = [name for name in _NAMES if not hasattr(quantization, name)]
    if missing:
        raise RuntimeError(
            f"search dtype float8: torchao.quantization has no {', '.join(missing)} "
            f"({versions()}); {wants}"
        )
    return quantization


def check_float8(device: torch.device | str) -> None:
    """RuntimeError saying why float8 search forwards cannot run on ``device``: not a CUDA
    device, a GPU below compute capability 8.9, or torchao missing or of the wrong release."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        raise RuntimeError(
            f"search dtype float8: needs a CUDA GPU of compute capability >= "
            f"{MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} (Ada, Hopper or newer); the model is on "
            f"{device}"
        )
    cap = torch.cuda.get_device_capability(device)
    if cap < MIN_CAPABILITY:
        raise RuntimeError(
            f"search dtype float8: {torch.cuda.get_device_name(device)} has compute capability "
            f"{cap[0]}.{cap[1]}; float8 matmuls need >= {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]}"
        )
    _torchao_quantization()


def _float8_linear(module: torch.nn.Module, _fqn: str) -> bool:
    """Linear layers whose sizes float8 matmuls take (multiples of 16)."""
    return (
        isinstance(module, torch.nn.Linear)
        and module.in_features % 16 == 0
        and module.out_features % 16 == 0
    )


def _adapter_parts(transformer: torch.nn.Module) -> tuple[set[str], list[torch.nn.Parameter]]:
    """The qualified names of a peft adapter's modules inside ``transformer`` (each LoRA
    layer's ``lora_A``, ``lora_B``, ... containers: ``adapter_layer_names``) and their
    parameters; nothing for a transformer without an adapter."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # peft is a dependency; a transformer without it has no adapter
        return set(), []
    names: set[str] = set()
    params: list[torch.nn.Parameter] = []
    for fqn, module in transformer.named_modules():
        if not isinstance(module, BaseTunerLayer):
            continue
        for attr in module.adapter_layer_names:
            part = getattr(module, attr, None)
            if isinstance(part, torch.nn.Module):
                names.add(f"{fqn}.{attr}" if fqn else attr)
                params.extend(part.parameters())
    return names, params


def adapter_key(transformer: torch.nn.Module) -> tuple[int, ...]:
    """Identifies the adapter tensors of ``transformer`` (empty without one): a float8 copy
    made for one key shares exactly those tensors."""
    return tuple(id(p) for p in _adapter_parts(transformer)[1])


def _inside(fqn: str, names: set[str]) -> bool:
    return any(fqn == n or fqn.startswith(n + ".") for n in names)


def float8_transformer(transformer: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``transformer`` (no-grad, eval) whose linear layers compute in float8
    (torchao's dynamic activation and weight quantization); checked by :func:`check_float8`
    first. The copy holds the weights in float8 (about half the bfloat16 memory).

    A peft adapter (LoRA) is **shared, not copied**: the copy's ``lora_A`` / ``lora_B``
    parameters are the very tensors of ``transformer`` (kept in their dtype, their
    ``requires_grad`` untouched), so an optimizer step or a loaded checkpoint, both in place,
    reach the copy's forwards with no new copy; only the frozen base layers are quantized. A
    change of the base weights themselves (full fine-tuning) does not reach it."""
    device = next(transformer.parameters()).device
    check_float8(device)
    quantization = _torchao_quantization()
    config = quantization.Float8DynamicActivationFloat8WeightConfig()
    adapter, shared = _adapter_parts(transformer)
    quantized = copy.deepcopy(transformer, memo={id(p): p for p in shared}).eval()
    keep = {id(p) for p in shared}
    for p in quantized.parameters():
        if id(p) not in keep:
            p.requires_grad_(False)

    def wanted(module: torch.nn.Module, fqn: str) -> bool:
        return _float8_linear(module, fqn) and not _inside(fqn, adapter)

    quantization.quantize_(quantized, config, filter_fn=wanted)
    return quantized
