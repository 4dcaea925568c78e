"""ImageReward (Xu et al., 2023) scored on transformers' own BLIP classes.

The ``image-reward`` package (1.5) does not import with transformers 5; this module loads its
checkpoint (``ImageReward.pt``, a plain state dict, and ``med_config.json``) into
:class:`~transformers.BlipVisionModel` (ViT-L/16 at 224: width 1024, 24 layers) and
:class:`~transformers.BlipTextModel` (BERT-base whose layers cross-attend to the 1024-wide image
tokens; embeddings = word + absolute position, no token types), plus the package's reward head:
five linear layers without activations (768 -> 1024 -> 128 -> 64 -> 16 -> 1; its dropouts are
the identity at eval). For N images and N prompts, in one batched forward::

    tokens = BERT([CLS] prompt [SEP] [PAD]..., 35 tokens)       # the package keeps [CLS]
    image  = ViT(preprocess(images))                            # (N, 1 + 196, 1024)
    score  = (head(text(tokens, cross-attending to image)[:, 0]) - 0.16717...) / 1.03333...

Sizes come from the checkpoint (vision) and ``med_config.json`` (text); the ViT's head count,
which neither file stores, is ``width // 64`` (16 for ViT-L, 12 for ViT-B). Every checkpoint key
is either mapped or listed in :data:`IGNORED_KEYS`; anything else, a missing key or a shape
that the configs do not predict is an error (no partial load).

Preprocessing follows the package: resize the short side to 224 (bicubic), centre-crop 224,
normalise with CLIP's mean/std. The package resizes uint8 PIL images; on tensors this module runs
PIL's two separable passes with ``torch`` bicubic and ``antialias=True`` (PIL's a=-0.5 kernel),
clipping after each, which is close to PIL but not bit-identical (no uint8 rounding, unless
``quantize=True``; see :func:`preprocess_images`). :meth:`ImageRewardModel.score_pil` runs the
package's exact PIL path.

The model is a :class:`~smartgrpo_fast.rewards.base.PreparedReward`: ``prepare(prompts)``
tokenises on the host (ids and mask padded to 35 tokens, on the model's device) and
``score(images, prepared)`` reads only tensors, so a search round calling it can be captured
as a CUDA graph once and replayed for other prompts.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from smartgrpo_fast.rewards.base import PreparedPrompts, check_images, check_prepared

if TYPE_CHECKING:
    from transformers import (
        BlipTextConfig,
        BlipTextModel,
        BlipVisionConfig,
        BlipVisionModel,
        PreTrainedTokenizerBase,
    )

__all__ = [
    "CHECKPOINT_FILE",
    "HF_REPO",
    "IGNORED_KEYS",
    "MED_CONFIG_FILE",
    "ConvertedCheckpoint",
    "ImageRewardModel",
    "checkpoint_key",
    "convert_imagereward_state_dict",
    "load_imagereward",
    "load_tokenizer",
    "preprocess_images",
    "preprocess_pil",
    "text_config_from_med_config",
    "vision_config_from_state_dict",
]

HF_REPO = "THUDM/ImageReward"
CHECKPOINT_FILE = "ImageReward.pt"
MED_CONFIG_FILE = "med_config.json"
DEFAULT_TOKENIZER = "bert-base-uncased"
_TOKENIZER_FILES = ("vocab.txt", "tokenizer.json")
SCORE_MEAN = 0.16717362830052426
SCORE_STD = 1.0333394966054072
MAX_PROMPT_TOKENS = 35
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
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


# ---------------------------------------------------------------------------- preprocessing


def _resized_size(height: int, width: int, size: int) -> tuple[int, int]:
    """torchvision ``Resize(size)``: the short side becomes ``size``, the long side
    ``int(size * long / short)``."""
    short, long = min(height, width), max(height, width)
    new_long = int(size * long / short)
    return (size, new_long) if height <= width else (new_long, size)


def _crop_offsets(height: int, width: int, size: int) -> tuple[int, int]:
    """torchvision ``CenterCrop(size)``'s (top, left)."""
    return round((height - size) / 2.0), round((width - size) / 2.0)


_NORM_CONSTS: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}


def _normalize(pixels: torch.Tensor) -> torch.Tensor:
    # the constants are made once per device and dtype: a host-to-device copy per call would
    # break the capture of a search round as a CUDA graph
    key = (pixels.device, pixels.dtype)
    consts = _NORM_CONSTS.get(key)
    if consts is None:
        consts = _NORM_CONSTS[key] = (
            torch.tensor(CLIP_MEAN, device=pixels.device, dtype=pixels.dtype).view(1, 3, 1, 1),
            torch.tensor(CLIP_STD, device=pixels.device, dtype=pixels.dtype).view(1, 3, 1, 1),
        )
    return (pixels - consts[0]) / consts[1]


def _bicubic(x: torch.Tensor, size: tuple[int, int], quantize: bool) -> torch.Tensor:
    """One PIL-like resampling pass: bicubic (a=-0.5, antialiased), clipped to [0, 1]."""
    y = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True)
    y = y.clamp_(0.0, 1.0)
    return _uint8_levels(y) if quantize else y


def _uint8_levels(x: torch.Tensor) -> torch.Tensor:
    return x.mul(255.0).round_().div_(255.0)


def preprocess_images(
    images: torch.Tensor, size: int = 224, *, quantize: bool = False
) -> torch.Tensor:
    """Images (N, 3, H, W) float in [0, 1] -> (N, 3, size, size) float32, CLIP-normalised.

    As the package's PIL transform: short side to ``size`` (long side ``int(size * long /
    short)``), bicubic; centre crop. PIL resamples separably, the horizontal pass first, and
    stores each pass clipped to uint8; this runs the same two passes with torch's antialiased
    bicubic (PIL's a=-0.5 kernel), clipping to [0, 1] after each. ``quantize=False``: no uint8
    rounding, so parity with PIL is approximate (within ~1/255 per pixel after resizing);
    ``quantize=True`` rounds the input and each pass to uint8 levels, which matches PIL on
    uint8 images up to its fixed-point rounding (a rare 1/255).
    """
    x = images.float()
    if quantize:
        x = _uint8_levels(x)
    h, w = x.shape[-2:]
    new_h, new_w = _resized_size(h, w, size)
    if new_w != w:
        x = _bicubic(x, (h, new_w), quantize)
    if new_h != h:
        x = _bicubic(x, (new_h, new_w), quantize)
    top, left = _crop_offsets(new_h, new_w, size)
    return _normalize(x[:, :, top : top + size, left : left + size])


def preprocess_pil(images: Sequence[Any], size: int = 224) -> torch.Tensor:
    """PIL images -> (N, 3, size, size) float32: exactly the package's torchvision transform
    (PIL bicubic resize of the short side, centre crop, RGB, /255, CLIP normalisation)."""
    import numpy as np
    from PIL import Image

    out = []
    for img in images:
        new_h, new_w = _resized_size(img.height, img.width, size)
        if (new_h, new_w) != (img.height, img.width):
            img = img.resize((new_w, new_h), Image.BICUBIC)
        top, left = _crop_offsets(new_h, new_w, size)
        img = img.crop((left, top, left + size, top + size)).convert("RGB")
        out.append(torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1))
    return _normalize(torch.stack(out).float().div(255))


def _tokenizer_folder(source: str) -> Path:
    """A folder holding ``vocab.txt`` or ``tokenizer.json``: ``source`` itself, or the cached
    snapshot of hub id ``source`` (transformers 5 would otherwise build an empty vocabulary
    from nothing, without an error)."""
    folder = Path(source).expanduser()
    if folder.is_dir():
        if any((folder / name).is_file() for name in _TOKENIZER_FILES):
            return folder
        raise FileNotFoundError(f"tokenizer={source!r}: holds neither vocab.txt nor tokenizer.json")
    from huggingface_hub import hf_hub_download

    for name in _TOKENIZER_FILES:
        try:
            return Path(hf_hub_download(source, name, local_files_only=True)).parent
        except Exception:  # not cached, not a valid repo id, offline, ...
            continue
    raise FileNotFoundError(
        f"tokenizer={source!r}: not a vocabulary folder nor in the Hugging Face cache; pass "
        "tokenizer=FOLDER holding bert-base-uncased's vocab.txt (and tokenizer_config.json)"
    )


def load_tokenizer(tokenizer: Any = None) -> PreTrainedTokenizerBase:
    """ImageReward's tokenizer: BERT (uncased) from a local folder, a hub id already in the
    Hugging Face cache (default ``bert-base-uncased``) or a tokenizer object, plus the special
    tokens the package adds (to a given object too): ``[DEC]`` (bos) and ``[ENC]``."""
    from transformers import BertTokenizer, PreTrainedTokenizerBase

    if isinstance(tokenizer, PreTrainedTokenizerBase):
        tok = tokenizer
    else:
        source = DEFAULT_TOKENIZER if tokenizer is None else str(tokenizer)
        tok = BertTokenizer.from_pretrained(str(_tokenizer_folder(source)), local_files_only=True)
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tok


# ---------------------------------------------------------------------------- the reward


class ImageRewardModel(nn.Module):
    """ImageReward as a :class:`~smartgrpo_fast.rewards.base.Reward`.

    ``model(images, prompts)``: images (N, 3, H, W) float in [0, 1] on any device and N
    prompts -> (N,) float32 scores on the images' device, higher is better. One batched
    forward, ``torch.no_grad``. The encoders run in ``dtype`` on ``device``; the head runs in
    float32 on the [CLS] feature, as the package does. ``quantize``: see
    :func:`preprocess_images`.
    """

    def __init__(
        self,
        vision: nn.Module,
        text: nn.Module,
        head: nn.Sequential,
        tokenizer: Any,
        image_size: int,
        *,
        quantize: bool = False,
    ) -> None:
        super().__init__()
        self.quantize = quantize
        self.vision = vision.eval().requires_grad_(False)
        self.text = text.eval().requires_grad_(False)
        self.head = head.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.image_size = image_size

    @classmethod
    def from_state_dict(
        cls,
        sd: Mapping[str, torch.Tensor],
        med_config: Mapping[str, Any] | str | Path,
        *,
        tokenizer: Any = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        quantize: bool = False,
    ) -> ImageRewardModel:
        """Build from an ImageReward state dict (tensors are reused where device/dtype match)
        and a med_config (dict or path); ``tokenizer`` as in :func:`load_tokenizer`."""
        med = med_config if isinstance(med_config, Mapping) else read_med_config(med_config)
        parts = convert_imagereward_state_dict(sd)
        dev = torch.device(device)
        vision = _vision_model(parts.vision, dev, dtype)
        text = _text_model(parts.text, med, vision.config.hidden_size, dev, dtype)
        head = _head_from_state_dict(parts.head)
        _load_strict(head, parts.head, "head", dev, torch.float32)
        if head[0].in_features != text.config.hidden_size or head[-1].out_features != 1:
            raise ValueError(
                f"checkpoint: head maps {head[0].in_features} -> {head[-1].out_features}, "
                f"expected {text.config.hidden_size} -> 1"
            )
        tok = load_tokenizer(tokenizer)
        return cls(vision, text, head, tok, vision.config.image_size, quantize=quantize)

    @classmethod
    def from_package(
        cls,
        name: str = "ImageReward-v1.0",
        *,
        download_root: str | None = None,
        med_config: str | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> ImageRewardModel:
        """Load through the ``image-reward`` package (when it imports: transformers < 5; its
        ``load`` arguments), then rebuild on transformers' BLIP classes with the package's
        weights and tokenizer."""
        import ImageReward as image_reward  # type: ignore[import-not-found]

        pkg = image_reward.load(
            name, device="cpu", download_root=download_root, med_config=med_config
        )
        med = pkg.blip.text_encoder.config.to_dict()
        return cls.from_state_dict(
            pkg.state_dict(), med, tokenizer=pkg.blip.tokenizer, device=device, dtype=dtype
        )

    @property
    def device(self) -> torch.device:
        return self.head[0].weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.vision.embeddings.patch_embedding.weight.dtype

    def tokenize(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask), each (N, 35) int64: ``[CLS] ... [SEP] [PAD]...``,
        truncated to 35 tokens (the package does not swap [CLS] for [ENC])."""
        enc = self.tokenizer(
            list(prompts),
            padding="max_length",
            truncation=True,
            max_length=MAX_PROMPT_TOKENS,
            return_tensors="pt",
        )
        return enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)

    @torch.no_grad()
    def score_pixels(self, pixels: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Preprocessed pixels (N, 3, S, S) (CLIP-normalised) and N prompts -> (N,) float32
        scores on the model's device, in one batched forward."""
        if len(prompts) != pixels.shape[0]:
            raise ValueError(
                f"prompts: expected {pixels.shape[0]} prompts (one per image), got {len(prompts)}"
            )
        ids, mask = self.tokenize(prompts)
        return self._score_tokens(pixels, ids, mask)

    def _score_tokens(
        self, pixels: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        image_tokens = self.vision(
            pixel_values=pixels.to(self.device, self.dtype)
        ).last_hidden_state
        hidden = self.text(
            input_ids=ids, attention_mask=mask, encoder_hidden_states=image_tokens
        ).last_hidden_state
        raw = self.head(hidden[:, 0].float()).squeeze(-1)
        return ((raw - SCORE_MEAN) / SCORE_STD).float()

    def prepare(
        self, prompts: list[str], device: torch.device | str | None = None
    ) -> PreparedPrompts:
        """``input_ids`` and ``attention_mask``, (N, 35) int64 on the model's device (where
        scoring runs, whatever ``device``): the host-side tokenisation, done before scoring."""
        if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)):
            raise TypeError(f"prompts: expected a list of strings, got {type(prompts).__name__}")
        ids, mask = self.tokenize(prompts)
        return PreparedPrompts(tuple(prompts), {"input_ids": ids, "attention_mask": mask})

    @torch.no_grad()
    def score(self, images: torch.Tensor, prepared: PreparedPrompts) -> torch.Tensor:
        """:meth:`forward` from :meth:`prepare`'s tensors; reads no strings (graph-safe)."""
        check_prepared(images, prepared)
        pixels = preprocess_images(images.to(self.device), self.image_size, quantize=self.quantize)
        t = prepared.tensors
        return self._score_tokens(pixels, t["input_ids"], t["attention_mask"]).to(images.device)

    @torch.no_grad()
    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Images (N, 3, H, W) float in [0, 1], N prompts -> (N,) float32 on images.device."""
        check_images(images, prompts)
        return self.score(images, self.prepare(prompts))

    def score_pil(self, images: Sequence[Any], prompts: Sequence[str]) -> torch.Tensor:
        """PIL images (any size/mode) and N prompts -> (N,) float32 on the model's device,
        preprocessed exactly as the package does (see :func:`preprocess_pil`)."""
        if isinstance(prompts, str) or len(prompts) != len(images):
            raise ValueError(f"prompts: expected a list of {len(images)} strings")
        return self.score_pixels(preprocess_pil(images, self.image_size), prompts)


# ---------------------------------------------------------------------------- loading


def _resolve(path: str | Path | None, filename: str, argument: str) -> Path:
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


def load_imagereward(
    checkpoint: str | Path | None = None,
    med_config: str | Path | None = None,
    *,
    tokenizer: Any = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    quantize: bool = False,
) -> ImageRewardModel:
    """ImageReward from ``ImageReward.pt`` + ``med_config.json`` (paths, or each missing one
    from the Hugging Face cache of ``THUDM/ImageReward``, offline) and a BERT tokenizer
    (``tokenizer``: vocabulary folder, cached hub id or object; default cached
    ``bert-base-uncased``). ``quantize``: round images to uint8 levels as the package's PIL
    path does (see :func:`preprocess_images`). Raises FileNotFoundError naming a missing file."""
    ckpt_path = _resolve(checkpoint, CHECKPOINT_FILE, "checkpoint")
    med_path = _resolve(med_config, MED_CONFIG_FILE, "med_config")
    tok = load_tokenizer(tokenizer)
    sd = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    if not isinstance(sd, Mapping):
        raise TypeError(f"{ckpt_path}: expected a state dict, got {type(sd).__name__}")
    return ImageRewardModel.from_state_dict(
        sd, read_med_config(med_path), tokenizer=tok, device=device, dtype=dtype, quantize=quantize
    )
