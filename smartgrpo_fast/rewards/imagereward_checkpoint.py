"""ImageReward's checkpoint on transformers' BLIP classes: key conversion, configs, loading.

``ImageReward.pt`` is a plain state dict of the ``image-reward`` package's model: BLIP's ViT
(``blip.visual_encoder.*``), its BERT text encoder with cross-attention
(``blip.text_encoder.*``) and a five-layer head (``mlp.layers.*``). This module renames every
key to :class:`~transformers.BlipVisionModel`'s and :class:`~transformers.BlipTextModel`'s
(:func:`convert_imagereward_state_dict`), derives their configs from the tensors' shapes and
``med_config.json`` (:func:`vision_config_from_state_dict`, :func:`text_config_from_med_config`)
and builds the three modules with a strict, shape-checked load
(:func:`build_imagereward_modules`). Every checkpoint key is either mapped or listed in
:data:`IGNORED_KEYS`; anything else, a missing key or a shape that the configs do not predict
is an error (no partial load).
:func:`resolve_file` finds the two files in the Hugging Face cache, offline.

The scoring model built on these modules is :mod:`smartgrpo_fast.rewards.imagereward`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import nn

if TYPE_CHECKING:
    from transformers import BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

__all__ = [
    "CHECKPOINT_FILE",
    "HF_REPO",
    "IGNORED_KEYS",
    "MED_CONFIG_FILE",
    "ConvertedCheckpoint",
    "build_imagereward_modules",
    "checkpoint_key",
    "convert_imagereward_state_dict",
    "read_med_config",
    "resolve_file",
    "text_config_from_med_config",
    "vision_config_from_state_dict",
]

HF_REPO = "THUDM/ImageReward"
CHECKPOINT_FILE = "ImageReward.pt"
MED_CONFIG_FILE = "med_config.json"
VISION_HEAD_DIM = 64
VISION_LAYER_NORM_EPS = 1e-6  # BLIP's ViT: partial(nn.LayerNorm, eps=1e-6)

VISION_PREFIX = "blip.visual_encoder."
TEXT_PREFIX = "blip.text_encoder."
HEAD_PREFIX = "mlp.layers."
#: nn.Sequential indices of the head's Linear layers (1, 3 and 5 are dropouts).
HEAD_LAYER_INDICES = (0, 2, 4, 6, 7)
#: Checkpoint keys that scoring does not use: BLIP's contrastive projections and BERT's
#: ``position_ids`` buffer (checked to be ``arange``; transformers rebuilds it).
IGNORED_KEYS = (
    "blip.vision_proj.weight",
    "blip.vision_proj.bias",
    "blip.text_proj.weight",
    "blip.text_proj.bias",
    "blip.text_encoder.embeddings.position_ids",
)

# (checkpoint template, transformers template); placeholders are matched by _FIELDS.
_VISION_RENAMES = (
    ("cls_token", "embeddings.class_embedding"),
    ("pos_embed", "embeddings.position_embedding"),
    ("patch_embed.proj.{p}", "embeddings.patch_embedding.{p}"),
    ("norm.{p}", "post_layernorm.{p}"),
    ("blocks.{i}.norm1.{p}", "encoder.layers.{i}.layer_norm1.{p}"),
    ("blocks.{i}.attn.qkv.{p}", "encoder.layers.{i}.self_attn.qkv.{p}"),
    ("blocks.{i}.attn.proj.{p}", "encoder.layers.{i}.self_attn.projection.{p}"),
    ("blocks.{i}.norm2.{p}", "encoder.layers.{i}.layer_norm2.{p}"),
    ("blocks.{i}.mlp.{fc}.{p}", "encoder.layers.{i}.mlp.{fc}.{p}"),
)
_TEXT_KEYS = (
    "embeddings.word_embeddings.weight",
    "embeddings.position_embeddings.weight",
    "embeddings.LayerNorm.{p}",
    "encoder.layer.{i}.{att}.self.{qkv}.{p}",
    "encoder.layer.{i}.{att}.output.dense.{p}",
    "encoder.layer.{i}.{att}.output.LayerNorm.{p}",
    "encoder.layer.{i}.intermediate.dense.{p}",
    "encoder.layer.{i}.output.dense.{p}",
    "encoder.layer.{i}.output.LayerNorm.{p}",
)
_TEXT_RENAMES = tuple((k, k) for k in _TEXT_KEYS)
_FIELDS = {
    "p": r"weight|bias",
    "i": r"\d+",
    "fc": r"fc1|fc2",
    "att": r"attention|crossattention",
    "qkv": r"query|key|value",
}
# BertConfig's defaults, used for keys a med_config.json leaves out (as BertConfig does).
_BERT_DEFAULTS: dict[str, Any] = {
    "vocab_size": 30522,
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "attention_probs_dropout_prob": 0.1,
    "max_position_embeddings": 512,
    "layer_norm_eps": 1e-12,
    "pad_token_id": 0,
    "position_embedding_type": "absolute",
    "add_cross_attention": False,
}


# ---------------------------------------------------------------------------- key conversion


def _template_regex(template: str) -> re.Pattern[str]:
    parts = re.split(r"\{(\w+)\}", template)
    pattern = "".join(
        re.escape(s) if i % 2 == 0 else f"(?P<{s}>{_FIELDS[s]})" for i, s in enumerate(parts)
    )
    return re.compile(pattern)


def _rename(key: str, table: Sequence[tuple[str, str]], reverse: bool = False) -> str | None:
    """Map ``key`` through the first matching (source, target) template pair, or None."""
    for src, dst in table:
        if reverse:
            src, dst = dst, src
        m = _template_regex(src).fullmatch(key)
        if m is not None:
            return dst.format(**m.groupdict())
    return None


class ConvertedCheckpoint(NamedTuple):
    """An ImageReward state dict split into transformers' key names.

    ``vision``: for :class:`~transformers.BlipVisionModel`; ``text``: for
    :class:`~transformers.BlipTextModel` (``add_pooling_layer=False``); ``head``: for the
    ``nn.Sequential`` of five ``nn.Linear`` (keys ``"0.weight"`` ... ``"4.bias"``).
    """

    vision: dict[str, torch.Tensor]
    text: dict[str, torch.Tensor]
    head: dict[str, torch.Tensor]


def convert_imagereward_state_dict(sd: Mapping[str, torch.Tensor]) -> ConvertedCheckpoint:
    """Split and rename an ``ImageReward.pt`` state dict; tensors are not copied.

    Every key must map to one of the three parts or be in :data:`IGNORED_KEYS`; unknown keys
    raise ``ValueError`` naming them. Shapes are checked later, against the configs.
    """
    out = ConvertedCheckpoint({}, {}, {})
    unknown = []
    for key, value in sd.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"checkpoint[{key!r}]: expected a tensor, got {type(value).__name__}")
        if key in IGNORED_KEYS:
            if key.endswith("position_ids"):
                _check_position_ids(key, value)
            continue
        new = None
        if key.startswith(VISION_PREFIX):
            new = _rename(key.removeprefix(VISION_PREFIX), _VISION_RENAMES)
            part = out.vision
        elif key.startswith(TEXT_PREFIX):
            new = _rename(key.removeprefix(TEXT_PREFIX), _TEXT_RENAMES)
            part = out.text
        elif key.startswith(HEAD_PREFIX):
            new = _head_key(key.removeprefix(HEAD_PREFIX))
            part = out.head
        if new is None:
            unknown.append(key)
        else:
            part[new] = value
    if unknown:
        shown = ", ".join(unknown[:8]) + (
            f" (+{len(unknown) - 8} more)" if len(unknown) > 8 else ""
        )
        raise ValueError(f"checkpoint: {len(unknown)} unexpected keys: {shown}")
    return out


def checkpoint_key(part: str, key: str) -> str:
    """The checkpoint key of a converted ``key`` of ``part`` ('vision', 'text' or 'head')."""
    if part == "vision":
        return VISION_PREFIX + (_rename(key, _VISION_RENAMES, reverse=True) or key)
    if part == "text":
        return TEXT_PREFIX + key
    if part == "head":
        index, _, param = key.partition(".")
        return f"{HEAD_PREFIX}{HEAD_LAYER_INDICES[int(index)]}.{param}"
    raise ValueError(f"part: expected 'vision', 'text' or 'head', got {part!r}")


def _head_key(key: str) -> str | None:
    m = re.fullmatch(r"(\d+)\.(weight|bias)", key)
    if m is None or int(m[1]) not in HEAD_LAYER_INDICES:
        return None
    return f"{HEAD_LAYER_INDICES.index(int(m[1]))}.{m[2]}"


def _check_position_ids(key: str, value: torch.Tensor) -> None:
    expected = torch.arange(value.shape[-1]).expand(value.shape)
    if value.dtype.is_floating_point or not torch.equal(value.cpu().long(), expected):
        raise ValueError(f"checkpoint[{key!r}]: expected arange({value.shape[-1]}) position ids")


# ---------------------------------------------------------------------------- configs


def vision_config_from_state_dict(vision: Mapping[str, torch.Tensor]) -> BlipVisionConfig:
    """BlipVisionConfig of a converted vision state dict: width, depth, MLP size, patch and
    image size come from the tensors' shapes; heads = width // 64; LayerNorm eps 1e-6."""
    from transformers import BlipVisionConfig

    def get(key: str) -> torch.Tensor:
        if key not in vision:
            raise ValueError(f"checkpoint: missing key {checkpoint_key('vision', key)!r}")
        return vision[key]

    width = get("embeddings.class_embedding").shape[-1]
    patch = get("embeddings.patch_embedding.weight").shape[-1]
    positions = get("embeddings.position_embedding").shape[1]
    grid = math.isqrt(positions - 1)
    if grid * grid != positions - 1:
        raise ValueError(
            f"checkpoint[{checkpoint_key('vision', 'embeddings.position_embedding')!r}]: "
            f"{positions} positions is not 1 + a square grid"
        )
    layers = sum(
        bool(re.fullmatch(r"encoder\.layers\.\d+\.self_attn\.qkv\.weight", k)) for k in vision
    )
    if width % VISION_HEAD_DIM:
        raise ValueError(f"checkpoint: vision width {width} is not a multiple of 64 (head size)")
    return BlipVisionConfig(
        hidden_size=int(width),
        intermediate_size=int(get("encoder.layers.0.mlp.fc1.weight").shape[0]),
        num_hidden_layers=int(layers),
        num_attention_heads=int(width // VISION_HEAD_DIM),
        image_size=int(grid * patch),
        patch_size=int(patch),
        hidden_act="gelu",
        layer_norm_eps=VISION_LAYER_NORM_EPS,
        attention_dropout=0.0,
    )


def read_med_config(path: str | Path) -> dict[str, Any]:
    """The JSON of a ``med_config.json`` file."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: med_config.json not found")
    return json.loads(p.read_text())


def text_config_from_med_config(med: Mapping[str, Any], encoder_hidden_size: int) -> BlipTextConfig:
    """BlipTextConfig of a BLIP ``med_config`` (BERT keys; BertConfig defaults fill gaps).

    ``encoder_hidden_size`` is the vision width: ImageReward overrides the file's
    ``encoder_width`` with it. ``is_decoder=True`` only makes transformers build the
    cross-attention layers; the model runs bidirectionally (``is_decoder=False`` in forward).
    """
    from transformers import BlipTextConfig

    cfg = {**_BERT_DEFAULTS, **med}
    if not cfg["add_cross_attention"]:
        raise ValueError("med_config: ImageReward needs add_cross_attention=true")
    if cfg["position_embedding_type"] != "absolute":
        raise ValueError(
            f"med_config: position_embedding_type {cfg['position_embedding_type']!r} "
            "is not supported (absolute only)"
        )
    return BlipTextConfig(
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=int(cfg["hidden_size"]),
        encoder_hidden_size=int(encoder_hidden_size),
        intermediate_size=int(cfg["intermediate_size"]),
        num_hidden_layers=int(cfg["num_hidden_layers"]),
        num_attention_heads=int(cfg["num_attention_heads"]),
        max_position_embeddings=int(cfg["max_position_embeddings"]),
        hidden_act=str(cfg["hidden_act"]),
        layer_norm_eps=float(cfg["layer_norm_eps"]),
        hidden_dropout_prob=float(cfg["hidden_dropout_prob"]),
        attention_probs_dropout_prob=float(cfg["attention_probs_dropout_prob"]),
        pad_token_id=int(cfg["pad_token_id"]),
        bos_token_id=None,
        eos_token_id=None,
        sep_token_id=None,
        is_decoder=True,
        use_cache=False,
    )


# ---------------------------------------------------------------------------- modules


def _head_from_state_dict(head: Mapping[str, torch.Tensor]) -> nn.Sequential:
    """Five bias-carrying Linear layers, sizes from the weights, on the meta device."""
    missing = [
        f"{i}.{p}"
        for i in range(len(HEAD_LAYER_INDICES))
        for p in ("weight", "bias")
        if f"{i}.{p}" not in head
    ]
    if missing:
        raise ValueError(
            "checkpoint: missing keys " + ", ".join(checkpoint_key("head", k) for k in missing)
        )
    with torch.device("meta"):
        layers = [
            nn.Linear(*head[f"{i}.weight"].shape[::-1]) for i in range(len(HEAD_LAYER_INDICES))
        ]
    return nn.Sequential(*layers)


def _load_strict(
    module: nn.Module,
    sd: dict[str, torch.Tensor],
    part: str,
    device: torch.device,
    dtype: torch.dtype,
) -> None:
    """Assign ``sd`` to a meta-device ``module`` after checking keys and shapes exactly."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    if missing or unexpected:
        names = [f"missing {checkpoint_key(part, k)}" for k in missing]
        names += [f"unexpected {checkpoint_key(part, k)}" for k in unexpected]
        shown = "; ".join(names[:8]) + (f" (+{len(names) - 8} more)" if len(names) > 8 else "")
        raise ValueError(f"checkpoint ({part}): {shown}")
    for k, v in expected.items():
        if sd[k].shape != v.shape:
            raise ValueError(
                f"checkpoint[{checkpoint_key(part, k)!r}]: shape {tuple(sd[k].shape)}, but the "
                f"configuration (med_config / vision sizes) expects {tuple(v.shape)}"
            )
    module.load_state_dict(
        {k: v.to(device=device, dtype=dtype) for k, v in sd.items()}, strict=True, assign=True
    )


def _vision_model(
    vision: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype
) -> BlipVisionModel:
    from transformers import BlipVisionModel

    with torch.device("meta"):
        model = BlipVisionModel(vision_config_from_state_dict(vision))
    _load_strict(model, vision, "vision", device, dtype)
    return model


def _text_model(
    text: dict[str, torch.Tensor],
    med: Mapping[str, Any],
    encoder_hidden_size: int,
    device: torch.device,
    dtype: torch.dtype,
) -> BlipTextModel:
    from transformers import BlipTextModel

    config = text_config_from_med_config(med, encoder_hidden_size)
    with torch.device("meta"):
        model = BlipTextModel(config, add_pooling_layer=False)
    _load_strict(model, text, "text", device, dtype)
    # The non-persistent position_ids buffer is not in any state dict: rebuild it off meta.
    n = config.max_position_embeddings
    model.embeddings.position_ids = torch.arange(n, device=device).expand(1, -1)
    return model


def build_imagereward_modules(
    sd: Mapping[str, torch.Tensor],
    med: Mapping[str, Any],
    device: torch.device,
    dtype: torch.dtype,
) -> tuple[BlipVisionModel, BlipTextModel, nn.Sequential]:
    """(vision, text, head) of an ImageReward state dict and its med_config, loaded strictly
    (tensors are reused where device/dtype match); the encoders in ``dtype``, the head in
    float32 on ``device``."""
    parts = convert_imagereward_state_dict(sd)
    vision = _vision_model(parts.vision, device, dtype)
    text = _text_model(parts.text, med, vision.config.hidden_size, device, dtype)
    head = _head_from_state_dict(parts.head)
    _load_strict(head, parts.head, "head", device, torch.float32)
    if head[0].in_features != text.config.hidden_size or head[-1].out_features != 1:
        raise ValueError(
            f"checkpoint: head maps {head[0].in_features} -> {head[-1].out_features}, "
            f"expected {text.config.hidden_size} -> 1"
        )
    return vision, text, head


# ---------------------------------------------------------------------------- files


def resolve_file(path: str | Path | None, filename: str, argument: str) -> Path:
    """A given path (must exist) or ``filename`` from the HF cache of THUDM/ImageReward."""
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"{argument}={str(p)!r}: {filename} not found")
        return p
    from huggingface_hub import constants, hf_hub_download

    try:
        return Path(hf_hub_download(HF_REPO, filename, local_files_only=True))
    except Exception as err:  # LocalEntryNotFoundError, offline mode, a broken cache, ...
        raise FileNotFoundError(
            f"{filename}: not in the Hugging Face cache ({constants.HF_HUB_CACHE}, repo "
            f"{HF_REPO}); pass {argument}=PATH to {filename}, or download it first "
            f"(`hf download {HF_REPO} {filename}`)"
        ) from err
