"""LoRA adapters on the transformer of a :class:`~smartgrpo_fast.models.base.DiTFlowModel`.

The trainer (Flow-GRPO style) trains a LoRA on diffusers' ``SD3Transformer2DModel``: rank 32,
alpha 64 on the attention projections (:data:`FLOW_GRPO_TARGETS`). The adapter is injected in
place with diffusers' ``add_adapter`` (peft's ``inject_adapter_in_model``): the transformer
keeps its class and ``model.velocity`` keeps working, now with the adapter.

* :func:`attach_lora` injects a fresh adapter (B = 0: the output starts as the base model's)
  and returns its trainable parameters.
* :func:`adapter_disabled` runs the base model (the KL reference) inside a ``with`` block.
* :func:`save_adapter` / :func:`load_adapter` / :func:`read_adapter_spec`: peft's folder format
  (``adapter_config.json`` + ``adapter_model.safetensors``, what ``PeftModel.save_pretrained``
  writes; ``peft.PeftModel.from_pretrained(transformer, folder)`` reads it).
* :func:`save_diffusers_lora`: diffusers' SD3 format (``pytorch_lora_weights.safetensors``,
  for ``StableDiffusion3Pipeline.load_lora_weights``), with the LoRA config in the file's
  metadata so that alpha != rank survives the round trip.

peft is imported only when an adapter is built, saved or loaded (the ``sd3`` extra).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from smartgrpo_fast.models.base import DiTFlowModel

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "DIFFUSERS_WEIGHTS",
    "FLOW_GRPO_TARGETS",
    "LoraSpec",
    "adapter_disabled",
    "attach_lora",
    "attached_spec",
    "load_adapter",
    "lora_parameters",
    "read_adapter_spec",
    "save_adapter",
    "save_diffusers_lora",
]

#: Flow-GRPO's LoRA targets on SD3 / SD3.5: every projection of the joint attention, image
#: stream (``to_*``) and text stream (``add_*`` / ``to_add_out``). A name matches a module whose
#: qualified name equals it or ends with ``"." + name`` (peft's rule for a list of names).
FLOW_GRPO_TARGETS: tuple[str, ...] = (
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
DIFFUSERS_WEIGHTS = "pytorch_lora_weights.safetensors"
_ADAPTER = "default"  # peft's adapter name: the only one we use
_PEFT_PREFIX = "base_model.model."  # key prefix of PeftModel.save_pretrained's weights
_SPEC_ATTR = "_smartgrpo_lora_spec"  # the attached LoraSpec, kept on the transformer
#: Fields of a peft LoraConfig that LoraSpec cannot express, with the value it implies.
_PLAIN_LORA = {
    "use_rslora": False,
    "use_dora": False,
    "rank_pattern": {},
    "alpha_pattern": {},
    "bias": "none",
    "lora_bias": False,
    "fan_in_fan_out": False,
    "layers_to_transform": None,
    "modules_to_save": None,
    "exclude_modules": None,
    "target_parameters": None,
}
_BASE_FORWARDS: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class LoraSpec:
    """Shape of a LoRA adapter: ``W x + (alpha / rank) B A x`` on each target Linear.

    Attributes:
        rank: r, the inner width of A (r, in) and B (out, r); an int >= 1.
        alpha: the scale numerator; the update is scaled by ``alpha / rank`` (Flow-GRPO: 64/32).
        targets: module-name suffixes to adapt (see :data:`FLOW_GRPO_TARGETS`); a list is
            stored as a tuple.
        dropout: dropout on the adapter's input, in [0, 1); active only while the transformer
            is in train mode (it is in eval mode as built).
    """

    rank: int = 32
    alpha: float = 64.0
    targets: tuple[str, ...] = FLOW_GRPO_TARGETS
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"rank: expected an int >= 1, got {self.rank!r}")
        a = self.alpha
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not math.isfinite(a) or a <= 0:
            raise ValueError(f"alpha: expected a finite number > 0, got {a!r}")
        object.__setattr__(self, "alpha", float(a))
        if isinstance(self.targets, str) or not isinstance(self.targets, (tuple, list)):
            raise TypeError(
                f"targets: expected a tuple of module-name suffixes, got "
                f"{type(self.targets).__name__} {self.targets!r}"
            )
        targets = tuple(self.targets)
        bad = [t for t in targets if not isinstance(t, str) or not t or t != t.strip(".")]
        if not targets or bad:
            raise ValueError(
                f"targets: expected non-empty module-name suffixes like 'attn.to_q', "
                f"got {targets!r}" + (f" (bad: {bad!r})" if bad else "")
            )
        if len(set(targets)) != len(targets):
            raise ValueError(f"targets: expected distinct names, got {targets!r}")
        object.__setattr__(self, "targets", targets)
        d = self.dropout
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0.0 <= d < 1.0:
            raise ValueError(f"dropout: expected a probability in [0, 1), got {d!r}")
        object.__setattr__(self, "dropout", float(d))

    @property
    def scaling(self) -> float:
        """alpha / rank, the factor on ``B A x``."""
        return self.alpha / self.rank

    def same_adapter(self, other: LoraSpec) -> bool:
        """True when ``other`` builds the same adapter: equal rank, alpha and dropout and the
        same set of targets, in any order (peft keeps targets as a set; ``==`` compares the
        order too)."""
        return (self.rank, self.alpha, self.dropout, frozenset(self.targets)) == (
            other.rank,
            other.alpha,
            other.dropout,
            frozenset(other.targets),
        )

    def as_peft_config(self) -> Any:
        """This spec as a fresh ``peft.LoraConfig`` (plain LoRA, no bias; A Kaiming-uniform and
        B = 0, so an adapter built from it starts as the identity)."""
        from peft import LoraConfig

        return LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha,
            target_modules=list(self.targets),
            lora_dropout=self.dropout,
            bias="none",
            init_lora_weights=True,
        )

    @classmethod
    def from_peft_dict(cls, cfg: dict[str, Any], *, where: str = "config") -> LoraSpec:
        """The spec of a peft ``LoraConfig`` given as a dict (``adapter_config.json``, or the
        metadata diffusers stores). Plain LoRA only: rank/alpha patterns, rsLoRA, DoRA, bias,
        regex targets and the like are a ValueError naming the field."""
        peft_type = str(cfg.get("peft_type", "LORA"))
        if peft_type.rsplit(".", 1)[-1] != "LORA":
            raise ValueError(f"{where}: peft_type is {peft_type!r}; expected 'LORA'")
        for key, plain in _PLAIN_LORA.items():
            value = cfg.get(key, plain)
            if value != plain and not (plain == {} and value is None):
                raise ValueError(
                    f"{where}: {key} = {cfg[key]!r}; LoraSpec describes plain LoRA "
                    f"({key} = {plain!r})"
                )
        targets = cfg.get("target_modules")
        if not isinstance(targets, (list, tuple)):
            raise ValueError(
                f"{where}: target_modules = {targets!r}; expected a list of module names "
                f"(a regex string is not supported)"
            )
        for key in ("r", "lora_alpha"):
            if key not in cfg:
                raise ValueError(f"{where}: {key} missing; expected a peft LoraConfig")
        return cls(
            rank=cfg["r"],
            alpha=cfg["lora_alpha"],
            targets=tuple(targets),
            dropout=cfg.get("lora_dropout", 0.0),
        )


# ------------------------------------------------------------------------------- helpers


def _transformer(model: DiTFlowModel) -> torch.nn.Module:
    t = getattr(model, "transformer", None)
    if not isinstance(t, torch.nn.Module):
        raise TypeError(
            f"model: expected a DiTFlowModel with a .transformer module, got "
            f"{type(model).__name__} (transformer: {type(t).__name__})"
        )
    return t


def _matches(name: str, target: str) -> bool:
    """peft's rule for a list of target names: equal, or a suffix after a dot."""
    return name == target or name.endswith("." + target)


def _target_modules(transformer: torch.nn.Module, spec: LoraSpec) -> dict[str, torch.nn.Linear]:
    """{qualified name: Linear} that ``spec.targets`` select; every target must match."""
    found: dict[str, torch.nn.Linear] = {}
    unmatched = []
    for target in spec.targets:
        hits = {n: m for n, m in transformer.named_modules() if n and _matches(n, target)}
        # a layer that already carries an adapter (peft's wrapper) counts as its base layer
        hits = {n: m.get_base_layer() if hasattr(m, "get_base_layer") else m
                for n, m in hits.items()}  # fmt: skip
        if not hits:
            unmatched.append(target)
        for n, m in hits.items():
            if not isinstance(m, torch.nn.Linear):
                raise ValueError(
                    f"targets: {target!r} matches {n!r}, a {type(m).__name__}; LoraSpec adapts "
                    f"Linear layers only"
                )
        found |= hits
    if unmatched:
        raise ValueError(
            f"targets: {unmatched!r} match no module of the {type(transformer).__name__} "
            f"(a target matches a module named like it or ending in '.' + it, e.g. "
            f"'transformer_blocks.0.attn.to_q' for 'attn.to_q')"
        )
    return dict(sorted(found.items()))


def _expected_shapes(transformer: torch.nn.Module, spec: LoraSpec) -> dict[str, tuple[int, ...]]:
    """{peft state-dict key: shape} of the adapter ``spec`` would put on ``transformer``."""
    shapes: dict[str, tuple[int, ...]] = {}
    for n, m in _target_modules(transformer, spec).items():
        shapes[f"{n}.lora_A.weight"] = (spec.rank, m.in_features)
        shapes[f"{n}.lora_B.weight"] = (m.out_features, spec.rank)
    return shapes


def _lora_layers(transformer: torch.nn.Module) -> list[Any]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in transformer.modules() if isinstance(m, BaseTunerLayer)]


def _need_adapter(model: DiTFlowModel) -> tuple[torch.nn.Module, LoraSpec]:
    transformer = _transformer(model)
    spec = getattr(transformer, _SPEC_ATTR, None)
    if spec is None:
        raise ValueError(
            f"model: its {type(transformer).__name__} has no LoRA adapter; call attach_lora or "
            f"load_adapter first"
        )
    return transformer, spec


def _check_spec(spec: LoraSpec | None, attached: LoraSpec) -> LoraSpec:
    if spec is None:
        return attached
    if not isinstance(spec, LoraSpec):
        raise TypeError(f"spec: expected a LoraSpec or None, got {type(spec).__name__}")
    if not spec.same_adapter(attached):
        raise ValueError(f"spec: {spec} differs from the model's adapter {attached}")
    return spec


def _atomic_write(path: Path, write: Any) -> None:
    """``write(tmp_path)`` then rename onto ``path`` (a reader never sees half a file)."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _need_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; expected {what}")
    return path


# ----------------------------------------------------------------------------- public API


def attached_spec(model: DiTFlowModel) -> LoraSpec | None:
    """The LoraSpec of the adapter on ``model.transformer``, or None when it has none."""
    return getattr(_transformer(model), _SPEC_ATTR, None)


def lora_parameters(model: DiTFlowModel) -> list[torch.nn.Parameter]:
    """The adapter's parameters (every ``lora_A`` and ``lora_B`` weight, in module order)."""
    transformer, _ = _need_adapter(model)
    return [p for n, p in transformer.named_parameters() if ".lora_A." in n or ".lora_B." in n]


def attach_lora(
    model: DiTFlowModel, spec: LoraSpec | None = None, *, dtype: torch.dtype | None = torch.float32
) -> list[torch.nn.Parameter]:
    """Inject a fresh LoRA adapter into ``model.transformer`` in place; return its parameters.

    The transformer keeps its class and ``model.velocity`` now includes the adapter. Every
    target Linear gets A: (rank, in) drawn Kaiming-uniform and B: (out, rank) = 0, so the
    output is unchanged until B moves. The returned parameters are the adapter's, in module
    order, with ``requires_grad`` True; every other parameter of the transformer is frozen.

    Determinism: A is drawn from torch's default CPU generator (peft builds the layers on
    the CPU, then moves them to the transformer's device), so it depends only on the RNG state
    at call time (``torch.manual_seed`` before the call fixes it), not on the device; the call
    advances that generator.

    Args:
        model: a DiTFlowModel (TinyFlowModel, SD3FlowModel) without an adapter.
        spec: the adapter's shape; default ``LoraSpec()`` (Flow-GRPO's r 32 / alpha 64).
        dtype: dtype of the adapter weights; float32 by default (trainable weights in full
            precision beside a bf16/fp16 transformer, as Flow-GRPO's ``cast_training_params``);
            None keeps the transformer's dtype.

    Raises:
        ValueError: the model already has an adapter, or a target matches no module.

    Captured CUDA graphs / compiled code of ``model._forward`` are dropped (they ran without
    the adapter); later updates of the returned parameters in place need no recapture.
    """
    if spec is None:
        spec = LoraSpec()
    if not isinstance(spec, LoraSpec):
        raise TypeError(f"spec: expected a LoraSpec, got {type(spec).__name__}")
    transformer = _transformer(model)
    if getattr(transformer, _SPEC_ATTR, None) is not None or getattr(
        transformer, "_hf_peft_config_loaded", False
    ):
        raise ValueError(
            f"model: its {type(transformer).__name__} already has a LoRA adapter "
            f"({getattr(transformer, _SPEC_ATTR, None)}); load a fresh model to attach another"
        )
    _target_modules(transformer, spec)  # every target must match, checked before injecting
    training = transformer.training
    transformer.add_adapter(spec.as_peft_config(), adapter_name=_ADAPTER)
    transformer.train(training)  # the new layers follow the transformer's mode
    setattr(transformer, _SPEC_ATTR, spec)
    params = lora_parameters(model)
    transformer.requires_grad_(False)
    for p in params:
        if dtype is not None:
            p.data = p.data.to(dtype)
        p.requires_grad_(True)
    reset = getattr(model._forward, "reset", None)
    if callable(reset):
        reset()
    _BASE_FORWARDS.pop(model, None)
    return params


@contextlib.contextmanager
def adapter_disabled(model: DiTFlowModel) -> Iterator[DiTFlowModel]:
    """Inside the block ``model.velocity`` is the base model's (the adapter is bypassed, its
    weights untouched); on exit, normal or by an exception, each adapter layer's previous
    state is restored. Yields ``model``.

    With a CUDA-graph or compiled ``model._forward`` the block runs a second callable of the
    same config, captured with the adapter off (the base weights are frozen, so its graphs
    stay valid while the adapter trains). Not thread-safe; do not nest across threads.
    """
    transformer, _ = _need_adapter(model)
    layers = _lora_layers(transformer)
    before = [layer.disable_adapters for layer in layers]
    params = lora_parameters(model)
    grads = [p.requires_grad for p in params]  # peft's enable_adapters(False) clears them
    forward = model._forward
    base_forward = forward
    config = getattr(forward, "config", None)
    if config is not None and getattr(config, "backend", "eager") != "eager":
        from smartgrpo_fast.graphs import GraphedCallable

        base_forward = _BASE_FORWARDS.get(model)
        if base_forward is None:
            base_forward = GraphedCallable(model._transformer_forward, config)
            _BASE_FORWARDS[model] = base_forward
    try:
        for layer in layers:
            layer.enable_adapters(False)
        model._forward = base_forward
        yield model
    finally:
        model._forward = forward
        for layer, was_disabled in zip(layers, before, strict=True):
            layer.enable_adapters(not was_disabled)
        for p, g in zip(params, grads, strict=True):
            p.requires_grad_(g)


def save_adapter(model: DiTFlowModel, folder: str | Path, spec: LoraSpec | None = None) -> Path:
    """Write the adapter in peft's format: ``folder/adapter_config.json`` and
    ``folder/adapter_model.safetensors`` (keys ``base_model.model.<module>.lora_{A,B}.weight``,
    the adapter's dtype), as ``PeftModel.save_pretrained`` writes them; each file is written
    to a temporary name and renamed. ``spec`` (optional) must equal the attached adapter's.
    Returns ``folder``."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    transformer, attached = _need_adapter(model)
    spec = _check_spec(spec, attached)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = get_peft_model_state_dict(transformer, adapter_name=_ADAPTER)
    state = {_PEFT_PREFIX + k: v.detach().cpu().contiguous() for k, v in state.items()}
    cfg = transformer.peft_config[_ADAPTER].to_dict()
    cfg = {k: sorted(v) if isinstance(v, set) else v for k, v in cfg.items()}
    cfg |= {
        "target_modules": list(spec.targets),  # in the spec's order (peft keeps a set)
        "inference_mode": True,
        "base_model_name_or_path": None,
        "auto_mapping": {
            "base_model_class": type(transformer).__name__,
            "parent_library": type(transformer).__module__,
        },
    }
    text = json.dumps(cfg, indent=2, sort_keys=True)
    _atomic_write(
        folder / ADAPTER_WEIGHTS, lambda p: save_file(state, p, metadata={"format": "pt"})
    )
    _atomic_write(folder / ADAPTER_CONFIG, lambda p: p.write_text(text))
    return folder


def read_adapter_spec(folder: str | Path) -> LoraSpec:
    """The LoraSpec of a peft adapter folder (its ``adapter_config.json``).

    Raises FileNotFoundError naming the missing file, ValueError for a config that is not
    plain LoRA over a list of target names."""
    path = _need_file(Path(folder) / ADAPTER_CONFIG, "a peft adapter folder (save_adapter)")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(cfg).__name__}")
    return LoraSpec.from_peft_dict(cfg, where=str(path))


def load_adapter(
    model: DiTFlowModel, folder: str | Path, *, dtype: torch.dtype | None = torch.float32
) -> LoraSpec:
    """Apply a peft adapter folder (:func:`save_adapter`'s) to ``model.transformer``.

    A model without an adapter gets one (:func:`attach_lora` with the folder's spec and
    ``dtype``; torch's RNG state is left as it was); a model whose adapter has the same spec
    gets the weights copied in place (its parameters, and an optimizer's references to them,
    stay). Strict: the file's keys must be exactly the adapter's, with the adapter's shapes.
    Returns the spec read.

    Raises:
        FileNotFoundError: ``adapter_config.json`` or ``adapter_model.safetensors`` missing.
        ValueError: another spec is attached, a target matches no module, or keys/shapes differ.
    """
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    folder = Path(folder)
    spec = read_adapter_spec(folder)
    weights = _need_file(folder / ADAPTER_WEIGHTS, "the adapter weights (save_adapter)")
    transformer = _transformer(model)
    attached = getattr(transformer, _SPEC_ATTR, None)
    if attached is not None and not attached.same_adapter(spec):
        raise ValueError(f"{folder}: the adapter there is {spec}; the model has {attached}")
    state = {k.removeprefix(_PEFT_PREFIX): v for k, v in load_file(weights).items()}
    expected = _expected_shapes(transformer, spec)
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    if missing or unexpected:
        raise ValueError(
            f"{weights}: keys differ from the adapter {spec} on this "
            f"{type(transformer).__name__}: {len(missing)} missing (first {missing[:3]}), "
            f"{len(unexpected)} unexpected (first {unexpected[:3]})"
        )
    wrong = [f"{k}: {tuple(state[k].shape)} != {s}" for k, s in expected.items()
             if tuple(state[k].shape) != s]  # fmt: skip
    if wrong:
        raise ValueError(f"{weights}: {len(wrong)} tensors have the wrong shape, e.g. {wrong[0]}")
    if attached is None:
        with torch.random.fork_rng(devices=[]):
            attach_lora(model, spec, dtype=dtype)
    result = set_peft_model_state_dict(transformer, state, adapter_name=_ADAPTER)
    if getattr(result, "unexpected_keys", None):
        raise ValueError(f"{weights}: unexpected keys {result.unexpected_keys[:3]}")
    return spec


def save_diffusers_lora(
    model: DiTFlowModel, folder: str | Path, spec: LoraSpec | None = None
) -> Path:
    """Write the adapter in diffusers' SD3 LoRA format: ``folder/pytorch_lora_weights.safetensors``
    (keys ``transformer.<module>.lora_{A,B}.weight``) via
    ``StableDiffusion3Pipeline.save_lora_weights``, with the LoraConfig in the file's metadata
    so that ``pipe.load_lora_weights(folder)`` restores alpha (without it diffusers assumes
    alpha = rank). For an SD3FlowModel (the tiny model's transformer is the same class, but no
    diffusers pipeline loads it). Returns the file's path."""
    from diffusers import StableDiffusion3Pipeline
    from peft.utils import get_peft_model_state_dict

    transformer, attached = _need_adapter(model)
    _check_spec(spec, attached)
    state = get_peft_model_state_dict(transformer, adapter_name=_ADAPTER)
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    metadata = transformer.peft_config[_ADAPTER].to_dict()
    Path(folder).mkdir(parents=True, exist_ok=True)
    StableDiffusion3Pipeline.save_lora_weights(
        str(folder),
        transformer_lora_layers=state,
        transformer_lora_adapter_metadata=metadata,
        weight_name=DIFFUSERS_WEIGHTS,
    )
    return Path(folder) / DIFFUSERS_WEIGHTS
