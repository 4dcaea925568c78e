"""CLIP-based rewards: the LAION aesthetic predictor, PickScore and CLIPScore.

All three run one batched forward for the N images (and one for the distinct prompts among
the N), under ``torch.no_grad``, and return (N,) float32 on the images' device:

* :class:`AestheticReward`: the LAION "improved aesthetic predictor" v2: the L2-normalised
  CLIP ViT-L/14 image embedding through a 5-layer MLP head (``sac+logos+ava1-l14-linearMSE.pth``);
  scores are roughly 1 to 10. The prompt is ignored.
* :class:`PickScoreReward`: PickScore (Kirstain et al. 2023): ``logit_scale.exp() * cos(image,
  prompt)`` for each image and *its own* prompt (not a softmax over the batch); about 15 to 25.
* :class:`CLIPScoreReward`: CLIPScore (Hessel et al. 2021): ``w * max(cos(image, prompt), 0)``
  with ``w = 2.5``, in [0, 2.5].

Preprocessing is done on tensors, batched, and follows the model's CLIP processor config
(read from its ``preprocessor_config.json`` / ``processor_config.json``, nothing hard-coded):
the short side is resized to ``size["shortest_edge"]`` (bicubic, antialiased), the centre is
cropped to ``crop_size`` and the result normalised with ``image_mean`` / ``image_std``. The
processor's own path does the same on uint8 PIL images, so values differ from it by resampling
and rounding only (about 1e-2 after normalisation).

Prompts are tokenised with the CLIP tokenizer, padded, and **truncated to the text model's
maximum length: 77 tokens for every released CLIP**, as every CLIP reward does. Truncation is
not silent: the first time it happens a warning names how many prompts were cut, and each
reward counts them in ``truncated_prompts``.

Each is a :class:`~smartgrpo_fast.rewards.base.PreparedReward`: ``prepare(prompts)``
tokenises and runs the text model once per distinct prompt (the prompt-only half of the
score, outside any CUDA graph), ``score(images, prepared)`` runs the image half on tensors
only, so a search round that calls it can be captured once and replayed for other prompts.

Weights load from a local folder or from the Hugging Face cache (``local_files_only=True``:
nothing is downloaded); a missing one is a ``FileNotFoundError`` that says what to pass.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from smartgrpo_fast.rewards.base import PreparedPrompts, check_images, check_prepared

__all__ = [
    "AESTHETIC_FILE",
    "AESTHETIC_REPO",
    "CLIPSCORE_MODEL",
    "CLIPSCORE_W",
    "CLIP_L14",
    "PICKSCORE_MODEL",
    "PICKSCORE_PROCESSOR",
    "AestheticHead",
    "AestheticReward",
    "CLIPScoreReward",
    "ClipImageTransform",
    "ClipTextEncoder",
    "PickScoreReward",
    "load_aesthetic",
    "load_clipscore",
    "load_pickscore",
]

logger = logging.getLogger(__name__)

CLIP_L14 = "openai/clip-vit-large-patch14"
AESTHETIC_REPO = "camenduru/improved-aesthetic-predictor"
AESTHETIC_FILE = "sac+logos+ava1-l14-linearMSE.pth"
PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
CLIPSCORE_MODEL = CLIP_L14
CLIPSCORE_W = 2.5  # Hessel et al. 2021, eq. 1: rescales cosines (rarely above 0.4) towards [0, 1]

PathLike = str | os.PathLike


# --------------------------------------------------------------------------------------------
# Preprocessing
# --------------------------------------------------------------------------------------------


def _field(obj: Any, key: str) -> Any:
    """``obj[key]`` for dicts, ``obj.key`` for transformers' SizeDict; None when absent."""
    if obj is None or isinstance(obj, int):
        return None
    if isinstance(obj, dict):
        return obj.get(key)
    return getattr(obj, key, None)


@dataclass(frozen=True)
class ClipImageTransform:
    """A CLIP image processor's resize, centre crop and normalisation, on float tensors.

    ``shortest_edge`` resizes the short side (the long one keeps the aspect ratio, rounded
    down as transformers does); otherwise ``size`` (h, w) resizes exactly; None skips. The
    crop pads with black where the image is smaller, like transformers' ``center_crop``.
    """

    image_mean: tuple[float, ...]
    image_std: tuple[float, ...]
    shortest_edge: int | None = 224
    size: tuple[int, int] | None = None
    crop_size: tuple[int, int] | None = (224, 224)
    normalize: bool = True
    # (mean, std) per device, made on first use: no host-to-device copy in later calls (a
    # captured CUDA graph cannot hold one)
    _consts: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @classmethod
    def from_image_processor(cls, ip: Any) -> ClipImageTransform:
        """From a transformers ``CLIPImageProcessor`` (either backend): its size, crop size,
        mean, std and do_* flags."""
        size, crop = getattr(ip, "size", None), getattr(ip, "crop_size", None)
        if isinstance(size, int):  # legacy configs: "size": 224 means the shortest edge
            size = {"shortest_edge": size}
        if isinstance(crop, int):
            crop = {"height": crop, "width": crop}
        shortest = _field(size, "shortest_edge")
        hw = (_field(size, "height"), _field(size, "width"))
        crop_hw = (_field(crop, "height"), _field(crop, "width"))
        do_resize = getattr(ip, "do_resize", True) is not False
        do_crop = getattr(ip, "do_center_crop", True) is not False
        if do_resize and shortest is None and None in hw:
            raise ValueError(
                f"image processor: unsupported size {size!r} (expected shortest_edge "
                "or height and width)"
            )
        if do_crop and None in crop_hw:
            raise ValueError(f"image processor: unsupported crop_size {crop!r}")
        mean, std = getattr(ip, "image_mean", None), getattr(ip, "image_std", None)
        normalize = getattr(ip, "do_normalize", True) is not False
        if normalize and (mean is None or std is None):
            raise ValueError("image processor: do_normalize is set but image_mean/std are missing")
        return cls(
            image_mean=tuple(float(m) for m in (mean or (0.0, 0.0, 0.0))),
            image_std=tuple(float(s) for s in (std or (1.0, 1.0, 1.0))),
            shortest_edge=int(shortest) if do_resize and shortest is not None else None,
            size=(int(hw[0]), int(hw[1])) if do_resize and shortest is None else None,
            crop_size=(int(crop_hw[0]), int(crop_hw[1])) if do_crop else None,
            normalize=normalize,
        )

    def resized_shape(self, height: int, width: int) -> tuple[int, int]:
        if self.shortest_edge is not None:
            s = self.shortest_edge
            if width <= height:
                return int(s * height / width), s
            return s, int(s * width / height)
        return self.size if self.size is not None else (height, width)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [0, 1] -> (N, 3, crop_h, crop_w) float32, normalised."""
        x = images.float()
        h, w = x.shape[-2:]
        out_hw = self.resized_shape(h, w)
        if out_hw != (h, w):
            x = F.interpolate(x, size=out_hw, mode="bicubic", antialias=True, align_corners=False)
            x = x.clamp(0.0, 1.0)  # bicubic overshoots; PIL clamps to uint8 the same way
        if self.crop_size is not None:
            ch, cw = self.crop_size
            h, w = x.shape[-2:]
            if h < ch or w < cw:
                ph, pw = max(ch - h, 0), max(cw - w, 0)
                x = F.pad(x, ((pw + 1) // 2, pw // 2, (ph + 1) // 2, ph // 2))
                h, w = x.shape[-2:]
            top, left = (h - ch) // 2, (w - cw) // 2
            x = x[:, :, top : top + ch, left : left + cw]
        if self.normalize:
            consts = self._consts.get(x.device)
            if consts is None:
                consts = self._consts[x.device] = (
                    torch.tensor(self.image_mean, device=x.device).view(1, -1, 1, 1),
                    torch.tensor(self.image_std, device=x.device).view(1, -1, 1, 1),
                )
            x = (x - consts[0]) / consts[1]
        return x.contiguous()


class ClipTextEncoder:
    """Tokenises prompts for a CLIP text model: padding to the longest, truncation to
    ``max_length`` (77 for every released CLIP) with a one-time warning and a counter."""

    def __init__(self, tokenizer: Any, max_length: int) -> None:
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        self.truncated_prompts = 0
        self._warned = False

    def __call__(self, prompts: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        full = self.tokenizer(prompts, truncation=False, padding=False, verbose=False)
        cut = sum(len(ids) > self.max_length for ids in full["input_ids"])
        if cut:
            self.truncated_prompts += cut
            if not self._warned:
                self._warned = True
                logger.warning(
                    "%d of %d distinct prompts are longer than %d tokens and were truncated to "
                    "%d (CLIP sees no more); logged once, later ones are counted in "
                    "truncated_prompts",
                    cut,
                    len(prompts),
                    self.max_length,
                    self.max_length,
                )
        enc = self.tokenizer(
            prompts,
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        return {k: enc[k].to(device) for k in ("input_ids", "attention_mask") if k in enc}


# --------------------------------------------------------------------------------------------
# Shared CLIP plumbing
# --------------------------------------------------------------------------------------------


def _pooled(out: Any) -> torch.Tensor:
    """transformers >= 5 returns a ModelOutput from get_*_features, older ones a tensor."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(model.parameters())
    return p.device, p.dtype


def _max_text_length(model: Any, tokenizer: Any) -> int:
    n = int(model.config.text_config.max_position_embeddings)
    tok_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(tok_max, int) and 0 < tok_max < n:
        n = tok_max
    return n


class _ClipReward:
    """A CLIP model with its image transform (and, for text rewards, its tokenizer)."""

    def __init__(self, model: Any, transform: ClipImageTransform, tokenizer: Any = None) -> None:
        self.model = model.eval().requires_grad_(False)
        self.transform = transform
        self.text = None
        if tokenizer is not None:
            self.text = ClipTextEncoder(tokenizer, _max_text_length(model, tokenizer))

    @property
    def device(self) -> torch.device:
        return _model_device_dtype(self.model)[0]

    @property
    def truncated_prompts(self) -> int:
        """How many (distinct-per-batch) prompts were cut to the CLIP text length so far."""
        return self.text.truncated_prompts if self.text is not None else 0

    @torch.no_grad()
    def image_embeds(self, images: torch.Tensor) -> torch.Tensor:
        """(N, D) float32 L2-normalised image embeddings, one forward for the batch."""
        device, dtype = _model_device_dtype(self.model)
        pixels = self.transform(images.to(device)).to(dtype)
        emb = _pooled(self.model.get_image_features(pixel_values=pixels)).float()
        return F.normalize(emb, dim=-1)

    @torch.no_grad()
    def text_embeds(self, prompts: list[str]) -> torch.Tensor:
        """(N, D) float32 L2-normalised embeddings of the prompts; each distinct prompt is
        encoded once (the search scores K candidates per prompt)."""
        assert self.text is not None
        device = self.device
        distinct = list(dict.fromkeys(prompts))
        where = {p: i for i, p in enumerate(distinct)}
        tokens = self.text(distinct, device)
        emb = _pooled(self.model.get_text_features(**tokens)).float()
        emb = F.normalize(emb, dim=-1)
        return emb[torch.tensor([where[p] for p in prompts], device=device)]

    @torch.no_grad()
    def cosine(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """(N,) cosine between each image and its own prompt, float32 on the model's device."""
        return (self.image_embeds(images) * self.text_embeds(list(prompts))).sum(-1)

    def _text_prompts(self, prompts: list[str]) -> list[str]:
        """The strings the text model sees (CLIPScore adds its prefix)."""
        return list(prompts)

    def prepare(
        self, prompts: list[str], device: torch.device | str | None = None
    ) -> PreparedPrompts:
        """``text``: (N, D) float32 L2-normalised prompt embeddings on the model's device
        (where scoring runs, whatever ``device``); none for a reward that ignores prompts."""
        if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)):
            raise TypeError(f"prompts: expected a list of strings, got {type(prompts).__name__}")
        if self.text is None:
            return PreparedPrompts(tuple(prompts), {})
        text = self.text_embeds(self._text_prompts(list(prompts)))
        return PreparedPrompts(tuple(prompts), {"text": text})

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        check_images(images, prompts)
        return self.score(images, self.prepare(prompts))

    def score(self, images: torch.Tensor, prepared: PreparedPrompts) -> torch.Tensor:
        """(N,) float32 on the images' device, from :meth:`prepare`'s tensors (graph-safe)."""
        raise NotImplementedError

    def _cosine(self, images: torch.Tensor, prepared: PreparedPrompts) -> torch.Tensor:
        return (self.image_embeds(images) * prepared.tensors["text"]).sum(-1)


# --------------------------------------------------------------------------------------------
# The three rewards
# --------------------------------------------------------------------------------------------


class AestheticHead(nn.Module):
    """The LAION improved-aesthetic-predictor MLP (dropouts are inactive in eval mode).

    Keys ``layers.{0,2,4,6,7}.{weight,bias}`` as in ``sac+logos+ava1-l14-linearMSE.pth``.
    """

    def __init__(self, input_dim: int = 768) -> None:
        super().__init__()
        self.input_dim = input_dim
        self.layers = nn.Sequential(
            nn.Linear(input_dim, 1024), nn.Dropout(0.2),
            nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)

    @classmethod
    def from_state_dict(
        cls, state: dict[str, torch.Tensor], input_dim: int, *, source: str = "head"
    ) -> AestheticHead:
        """Check keys and shapes (clear errors naming ``source``), then load as float32."""
        head = cls(input_dim)
        want = {k: tuple(v.shape) for k, v in head.state_dict().items()}
        if not isinstance(state, dict):
            raise TypeError(f"{source}: expected a state dict, got {type(state).__name__}")
        missing = [k for k in want if k not in state]
        extra = [k for k in state if k not in want]
        if missing or extra:
            raise ValueError(
                f"{source}: not a LAION aesthetic head (expected keys layers.{{0,2,4,6,7}}."
                f"{{weight,bias}}); missing {missing or 'none'}, unexpected {extra[:8] or 'none'}"
            )
        for k, shape in want.items():
            got = tuple(state[k].shape)
            if got != shape:
                hint = (
                    f": the head's input dim must equal the CLIP projection dim ({input_dim})"
                    if k == "layers.0.weight" and got[:1] == shape[:1]
                    else ""
                )
                raise ValueError(f"{source}: {k} has shape {got}, expected {shape}{hint}")
        head.load_state_dict({k: v.float() for k, v in state.items()})
        return head.eval().requires_grad_(False)

    @classmethod
    def load(cls, path: PathLike, input_dim: int = 768) -> AestheticHead:
        """From a ``.pth``/``.pt``/``.bin`` (``torch.load(weights_only=True)``) or a
        ``.safetensors`` file."""
        p = Path(path).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"head={str(path)!r}: no such file")
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(p)
        else:
            state = torch.load(p, map_location="cpu", weights_only=True)
        return cls.from_state_dict(state, input_dim, source=str(p))


class AestheticReward(_ClipReward):
    """LAION aesthetic score: MLP head on the L2-normalised CLIP image embedding (the head
    runs in float32 whatever the CLIP dtype, as the original does). Prompts are ignored."""

    def __init__(self, clip: Any, head: AestheticHead, transform: ClipImageTransform) -> None:
        super().__init__(clip, transform)
        dim = int(clip.config.projection_dim)
        if head.input_dim != dim:
            raise ValueError(f"head: input dim {head.input_dim} != CLIP projection dim {dim}")
        self.head = head.to(self.device).eval().requires_grad_(False)

    @torch.no_grad()
    def score(self, images: torch.Tensor, prepared: PreparedPrompts) -> torch.Tensor:
        check_prepared(images, prepared)
        score = self.head(self.image_embeds(images)).squeeze(-1)
        return score.float().to(images.device)


class PickScoreReward(_ClipReward):
    """PickScore: ``logit_scale.exp() * cos(image_i, prompt_i)`` for each pair (the diagonal
    of the official ``text_embs @ image_embs.T``; no softmax across the batch)."""

    def __init__(self, model: Any, transform: ClipImageTransform, tokenizer: Any) -> None:
        super().__init__(model, transform, tokenizer)

    @torch.no_grad()
    def score(self, images: torch.Tensor, prepared: PreparedPrompts) -> torch.Tensor:
        check_prepared(images, prepared)
        scale = self.model.logit_scale.float().exp()
        return (scale * self._cosine(images, prepared)).float().to(images.device)


class CLIPScoreReward(_ClipReward):
    """CLIPScore (Hessel et al. 2021): ``w * max(cos(image_i, prefix + prompt_i), 0)``.

    ``w = 2.5`` is the paper's; the paper uses ViT-B/32 and the prefix ``"A photo depicts "``
    (default here: ViT-L/14 as torchmetrics, no prefix). torchmetrics reports ``100 * cos``.
    """

    def __init__(
        self, model: Any, transform: ClipImageTransform, tokenizer: Any, *,
        w: float = CLIPSCORE_W, prefix: str = "",
    ) -> None:  # fmt: skip
        super().__init__(model, transform, tokenizer)
        self.w = float(w)
        self.prefix = prefix

    def _text_prompts(self, prompts: list[str]) -> list[str]:
        return [self.prefix + p for p in prompts]

    @torch.no_grad()
    def score(self, images: torch.Tensor, prepared: PreparedPrompts) -> torch.Tensor:
        check_prepared(images, prepared)
        cos = self._cosine(images, prepared)
        return (self.w * cos.clamp_min(0.0)).float().to(images.device)


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _hub_cache() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def _resolve(path_or_id: PathLike, *, argument: str, holding: str) -> Path:
    """A local folder, or the snapshot folder of a repo id in the local Hugging Face cache."""
    p = Path(path_or_id).expanduser()
    if p.is_dir():
        return p
    s = str(path_or_id)
    if p.exists() or s.startswith((".", "/", "~")) or s.count("/") != 1:
        raise FileNotFoundError(
            f"{argument}={s!r}: no such folder (pass {argument}=PATH to a "
            f"folder holding {holding}, or a Hugging Face repo id)"
        )
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(s, local_files_only=True))
    except Exception as exc:  # huggingface_hub raises several types here
        raise FileNotFoundError(
            f"{argument}={s!r}: not a local folder and not in the local Hugging Face cache "
            f"({_hub_cache()}; {type(exc).__name__}). Nothing is downloaded here: fetch it where "
            f"the Hub is reachable (`hf download {s}`) into that cache, or pass "
            f"{argument}=PATH to a local folder holding {holding}"
        ) from None


def _require(folder: Path, argument: str, *alternatives: tuple[str, ...]) -> None:
    """Each alternative is a tuple of files that together suffice; one must be present."""
    if any(all((folder / f).is_file() for f in alt) for alt in alternatives):
        return
    want = " or ".join(" + ".join(alt) for alt in alternatives)
    raise FileNotFoundError(f"{folder}: missing {want} (given as {argument}=)")


def _load_clip_model(path_or_id: PathLike, argument: str, device: Any, dtype: torch.dtype):
    from transformers import CLIPModel

    folder = _resolve(path_or_id, argument=argument, holding="a CLIPModel (config.json + weights)")
    _require(folder, argument, ("config.json",))
    if not [*folder.glob("*.safetensors"), *folder.glob("*.bin")]:
        raise FileNotFoundError(
            f"{folder}: no weights (*.safetensors or *.bin) (given as {argument}=)"
        )
    model = CLIPModel.from_pretrained(folder, dtype=dtype, local_files_only=True)
    return model.to(device).eval().requires_grad_(False)


def _load_processor(path_or_id: PathLike, argument: str, *, text: bool) -> tuple[Any, Any]:
    """(ClipImageTransform, tokenizer or None) from a CLIP processor folder."""
    try:  # transformers >= 5: the PIL backend needs no torchvision (we only read its config)
        from transformers.models.clip.image_processing_pil_clip import (
            CLIPImageProcessorPil as ImageProcessor,
        )
    except ImportError:  # pragma: no cover - older transformers
        from transformers import CLIPImageProcessor as ImageProcessor

    folder = _resolve(path_or_id, argument=argument, holding="a CLIP processor")
    _require(folder, argument, ("preprocessor_config.json",), ("processor_config.json",))
    transform = ClipImageTransform.from_image_processor(
        ImageProcessor.from_pretrained(folder, local_files_only=True)
    )
    if not text:
        return transform, None
    from transformers import CLIPTokenizer

    _require(folder, argument, ("tokenizer.json",), ("vocab.json", "merges.txt"))
    return transform, CLIPTokenizer.from_pretrained(folder, local_files_only=True)


def _aesthetic_head_file() -> Path:
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(AESTHETIC_REPO, AESTHETIC_FILE, local_files_only=True))
    except Exception as exc:  # huggingface_hub raises several types here
        raise FileNotFoundError(
            f"aesthetic head: {AESTHETIC_FILE} of {AESTHETIC_REPO} is not in the local Hugging "
            f"Face cache ({_hub_cache()}; {type(exc).__name__}); pass head=PATH to the LAION "
            "improved-aesthetic-predictor weights (.pth or .safetensors)"
        ) from None


def load_aesthetic(
    clip: PathLike | None = None, head: PathLike | None = None, *,
    processor: PathLike | None = None, device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> AestheticReward:  # fmt: skip
    """LAION aesthetic reward: ``clip`` a CLIP folder or repo id (default ViT-L/14), ``head``
    the MLP weights file (default: ``sac+logos+ava1-l14-linearMSE.pth`` of
    ``camenduru/improved-aesthetic-predictor`` in the HF cache), ``processor`` defaults to
    ``clip``."""
    clip = CLIP_L14 if clip is None else clip
    head_path = _aesthetic_head_file() if head is None else Path(head).expanduser()
    if not head_path.is_file():
        raise FileNotFoundError(
            f"head={str(head)!r}: no such file (the LAION aesthetic head "
            "weights, .pth or .safetensors)"
        )
    model = _load_clip_model(clip, "clip", device, dtype)
    arg = "clip" if processor is None else "processor"
    transform, _ = _load_processor(clip if processor is None else processor, arg, text=False)
    mlp = AestheticHead.load(head_path, int(model.config.projection_dim))
    return AestheticReward(model, mlp, transform)


def load_pickscore(
    model: PathLike | None = None, processor: PathLike | None = None, *,
    device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
) -> PickScoreReward:  # fmt: skip
    """PickScore reward: ``model`` default ``yuvalkirstain/PickScore_v1``, ``processor``
    default ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` (the model repo ships none)."""
    m = _load_clip_model(PICKSCORE_MODEL if model is None else model, "model", device, dtype)
    transform, tok = _load_processor(
        PICKSCORE_PROCESSOR if processor is None else processor, "processor", text=True
    )
    return PickScoreReward(m, transform, tok)


def load_clipscore(
    model: PathLike | None = None, *, processor: PathLike | None = None,
    w: float = CLIPSCORE_W, prefix: str = "", device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> CLIPScoreReward:  # fmt: skip
    """CLIPScore reward: ``model`` default ``openai/clip-vit-large-patch14``; ``processor``
    defaults to ``model``; ``w`` and ``prefix`` see :class:`CLIPScoreReward`."""
    model = CLIPSCORE_MODEL if model is None else model
    m = _load_clip_model(model, "model", device, dtype)
    arg = "model" if processor is None else "processor"
    transform, tok = _load_processor(model if processor is None else processor, arg, text=True)
    return CLIPScoreReward(m, transform, tok, w=w, prefix=prefix)
