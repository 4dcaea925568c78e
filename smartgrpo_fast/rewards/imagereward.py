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
which neither file stores, is ``width // 64`` (16 for ViT-L, 12 for ViT-B). The checkpoint's
conversion, its strict loading (no partial load) and the cache lookup are
:mod:`smartgrpo_fast.rewards.imagereward_checkpoint` (its public names are importable from
here too); this module preprocesses, tokenises and scores.

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

import functools
import itertools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from smartgrpo_fast.rewards.base import PreparedPrompts, check_images, check_prepared
from smartgrpo_fast.rewards.imagereward_checkpoint import *  # noqa: F403 (re-exported)
from smartgrpo_fast.rewards.imagereward_checkpoint import (
    CHECKPOINT_FILE,
    MED_CONFIG_FILE,
    build_imagereward_modules,
    read_med_config,
    resolve_file,
)
from smartgrpo_fast.rewards.imagereward_checkpoint import __all__ as _checkpoint_all

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    *_checkpoint_all,
    "ImageRewardModel",
    "load_imagereward",
    "load_tokenizer",
    "preprocess_images",
    "preprocess_pil",
    "random_imagereward",
]

DEFAULT_TOKENIZER = "bert-base-uncased"
_TOKENIZER_FILES = ("vocab.txt", "tokenizer.json")
SCORE_MEAN = 0.16717362830052426
SCORE_STD = 1.0333394966054072
MAX_PROMPT_TOKENS = 35
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


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


@functools.cache
def _mask_skip_arg() -> bool:
    """Whether transformers' ``create_bidirectional_mask`` takes ``allow_is_bidirectional_skip``
    (without it the 2-D mask is passed on, as before)."""
    import inspect

    try:
        from transformers.masking_utils import create_bidirectional_mask
    except ImportError:  # transformers without masking_utils: the 2-D mask is passed
        return False
    return "allow_is_bidirectional_skip" in inspect.signature(create_bidirectional_mask).parameters


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
        vision, text, head = build_imagereward_modules(sd, med, torch.device(device), dtype)
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
            input_ids=ids,
            attention_mask=self._text_attention_mask(mask),
            encoder_hidden_states=image_tokens,
        ).last_hidden_state
        raw = self.head(hidden[:, 0].float()).squeeze(-1)
        return ((raw - SCORE_MEAN) / SCORE_STD).float()

    def _text_attention_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """The text model's 4-D attention mask of the (N, L) padding mask, always materialised.

        Given the 2-D mask, transformers' BLIP text model asks ``mask.all()`` whether it can
        skip the mask: a read of a device value, which a CUDA graph capture refuses ("Cannot
        copy between CPU and CUDA tensors during CUDA graph capture"), so a search round that
        scores with ImageReward could not be captured. Built here without that check (the
        same mask, by transformers' own function), a 4-D mask is used as it is."""
        if not _mask_skip_arg():
            return mask
        from transformers.masking_utils import create_bidirectional_mask

        embeds = torch.empty((*mask.shape, 1), dtype=self.dtype, device=mask.device)
        return create_bidirectional_mask(
            config=self.text.config,
            inputs_embeds=embeds,
            attention_mask=mask,
            allow_is_bidirectional_skip=False,
        )

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


def load_imagereward(
    checkpoint: str | Path | None = None,
    med_config: str | Path | None = None,
    *,
    tokenizer: Any = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    quantize: bool = False,
    random: bool = False,
) -> ImageRewardModel:
    """ImageReward from ``ImageReward.pt`` + ``med_config.json`` (paths, or each missing one
    from the Hugging Face cache of ``THUDM/ImageReward``, offline) and a BERT tokenizer
    (``tokenizer``: vocabulary folder, cached hub id or object; default cached
    ``bert-base-uncased``). ``quantize``: round images to uint8 levels as the package's PIL
    path does (see :func:`preprocess_images`). Raises FileNotFoundError naming a missing file.
    ``random=True``: no files, :func:`random_imagereward` (the architecture at full size with
    random weights, for timing; ``checkpoint``, ``med_config`` and ``tokenizer`` must be unset).
    """
    if random:
        given = [n for n, v in (("checkpoint", checkpoint), ("med_config", med_config),
                                ("tokenizer", tokenizer)) if v is not None]  # fmt: skip
        if given:
            raise ValueError(f"random=True builds random weights; do not also give {given[0]}")
        return random_imagereward(device=device, dtype=dtype, quantize=quantize)
    ckpt_path = resolve_file(checkpoint, CHECKPOINT_FILE, "checkpoint")
    med_path = resolve_file(med_config, MED_CONFIG_FILE, "med_config")
    tok = load_tokenizer(tokenizer)
    sd = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    if not isinstance(sd, Mapping):
        raise TypeError(f"{ckpt_path}: expected a state dict, got {type(sd).__name__}")
    return ImageRewardModel.from_state_dict(
        sd, read_med_config(med_path), tokenizer=tok, device=device, dtype=dtype, quantize=quantize
    )


#: ImageReward-v1.0's sizes: BLIP's ViT-L/16 at 224 px and BERT-base with cross-attention
#: (``med_config.json``; vocabulary 30524 = BERT's 30522 + [DEC] + [ENC]).
FULL_MED_CONFIG: dict[str, Any] = {
    "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
    "num_attention_heads": 12, "vocab_size": 30524, "max_position_embeddings": 512,
    "layer_norm_eps": 1e-12, "hidden_act": "gelu", "add_cross_attention": True,
    "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1, "pad_token_id": 0,
}  # fmt: skip
_FULL_VISION = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                "image_size": 224, "patch_size": 16}  # fmt: skip
_HEAD_SIZES = (768, 1024, 128, 64, 16, 1)


def _random_tokenizer() -> Any:
    """A BERT WordPiece tokenizer over letters, digits and punctuation (ids below 100, inside
    the model's 30524-row table): prompts tokenise to as many tokens as characters, which
    the 35-token cut bounds like the real vocabulary's."""
    import string
    import tempfile

    from transformers import BertTokenizer

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *string.ascii_lowercase,
             *string.digits, *".,!?'-:;()"]  # fmt: skip
    words += ["##" + c for c in string.ascii_lowercase + string.digits]
    with tempfile.TemporaryDirectory() as tmp:
        vocab = Path(tmp) / "vocab.txt"
        vocab.write_text("\n".join(words) + "\n")
        tok = BertTokenizer(str(vocab), do_lower_case=True)
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tok


def random_imagereward(
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    quantize: bool = False,
) -> ImageRewardModel:
    """ImageReward's architecture at full size (ViT-L/16 at 224 px, 24 layers; BERT-base, 12
    layers cross-attending to the image tokens; the five-layer head: about 450 M parameters)
    with random weights, built on ``device``, and a character-level tokenizer
    (:func:`_random_tokenizer`): it costs what ImageReward costs per image and scores
    meaninglessly (for timing a full-size step without the checkpoint)."""
    from transformers import BlipTextModel, BlipVisionConfig, BlipVisionModel

    from smartgrpo_fast.rewards.imagereward_checkpoint import text_config_from_med_config

    torch.manual_seed(seed)
    width = _FULL_VISION["hidden_size"]
    vcfg = BlipVisionConfig(**_FULL_VISION, num_attention_heads=width // 64, hidden_act="gelu",
                            layer_norm_eps=1e-6, attention_dropout=0.0)  # fmt: skip
    tcfg = text_config_from_med_config(FULL_MED_CONFIG, width)
    dev = torch.device(device)
    with dev:
        vision = BlipVisionModel(vcfg).to(dtype)
        text = BlipTextModel(tcfg, add_pooling_layer=False).to(dtype)
        head = nn.Sequential(*(nn.Linear(a, b) for a, b in itertools.pairwise(_HEAD_SIZES)))
    return ImageRewardModel(vision, text, head, _random_tokenizer(), vcfg.image_size,
                            quantize=quantize)  # fmt: skip
