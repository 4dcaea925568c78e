"""SD3-family configurations written in code, and random-weight builders (no download).

* :func:`build_tiny_sd3_pipeline`: a complete, tiny, randomly initialised
  ``StableDiffusion3Pipeline`` (two transformer layers, a small VAE, tiny CLIP-L/CLIP-G/T5
  with in-memory tokenizers). :func:`save_tiny_sd3_pipeline` writes it with
  ``save_pretrained``, so tests load it through the same ``from_pretrained`` path as a real
  checkpoint.
* :func:`random_sd35_medium`: the SD3.5-medium transformer and the SD3 VAE at full size with
  random weights, for timing the real architecture without weights.
* :func:`build_tiny_preview_decoder` / :func:`save_tiny_preview_decoder`: a tiny random
  ``AutoencoderTiny`` in the TAESD3 layout (16 latent channels) at the tiny pipeline's 2x
  factor; :func:`random_taesd3`: the same class at TAESD3's full size (8x), random weights.
* :func:`random_sd3_model`: a whole :class:`~smartgrpo_fast.models.sd3.SD3FlowModel` with
  random weights (``models.load("random:sd35-medium")``, ``random:sd3-tiny``), built in memory
  on the device, whose prompt embeddings are random too (:class:`RandomTextSD3FlowModel`):
  what a full-size training step costs, without any weights on disk.
"""

from __future__ import annotations

import hashlib
import string
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch

from smartgrpo_fast.models.sd3 import SD3FlowModel

__all__ = [
    "PREVIEW_RANDOM",
    "RANDOM_MODELS",
    "SD3_VAE",
    "SD35_MEDIUM_TRANSFORMER",
    "TAESD3",
    "TINY_TAESD3",
    "TINY_TRANSFORMER",
    "TINY_VAE",
    "RandomTextSD3FlowModel",
    "build_tiny_preview_decoder",
    "build_tiny_sd3_pipeline",
    "preview_decoder_for",
    "random_sd3_model",
    "random_sd35_medium",
    "random_taesd3",
    "save_tiny_preview_decoder",
    "save_tiny_sd3_pipeline",
]

#: stabilityai/stable-diffusion-3.5-medium transformer (MMDiT-X): 24 layers, width 1536,
#: dual attention in the first 13 layers, RMS q/k norm, a 384x384 positional table.
SD35_MEDIUM_TRANSFORMER: MappingProxyType[str, Any] = MappingProxyType(
    {
        "sample_size": 128,
        "patch_size": 2,
        "in_channels": 16,
        "num_layers": 24,
        "attention_head_dim": 64,
        "num_attention_heads": 24,
        "joint_attention_dim": 4096,
        "caption_projection_dim": 1536,
        "pooled_projection_dim": 2048,
        "out_channels": 16,
        "pos_embed_max_size": 384,
        "dual_attention_layers": tuple(range(13)),
        "qk_norm": "rms_norm",
    }
)

#: The SD3 / SD3.5 VAE: 16 latent channels, 8x down-sampling, no quant convs.
SD3_VAE: MappingProxyType[str, Any] = MappingProxyType(
    {
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": 16,
        "block_out_channels": (128, 256, 512, 512),
        "down_block_types": ("DownEncoderBlock2D",) * 4,
        "up_block_types": ("UpDecoderBlock2D",) * 4,
        "layers_per_block": 2,
        "norm_num_groups": 32,
        "act_fn": "silu",
        "sample_size": 1024,
        "scaling_factor": 1.5305,
        "shift_factor": 0.0609,
        "use_quant_conv": False,
        "use_post_quant_conv": False,
    }
)

#: Two MMDiT layers, width 32: about 0.1 M parameters.
TINY_TRANSFORMER: MappingProxyType[str, Any] = MappingProxyType(
    {
        "sample_size": 32,
        "patch_size": 2,
        "in_channels": 16,
        "num_layers": 2,
        "attention_head_dim": 8,
        "num_attention_heads": 4,
        "joint_attention_dim": 32,
        "caption_projection_dim": 32,
        "pooled_projection_dim": 64,
        "out_channels": 16,
        "pos_embed_max_size": 32,
    }
)

#: A VAE with the SD3 latent layout (16 channels, scaling and shift) and 2x down-sampling.
TINY_VAE: MappingProxyType[str, Any] = MappingProxyType(
    {
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": 16,
        "block_out_channels": (8, 16),
        "down_block_types": ("DownEncoderBlock2D",) * 2,
        "up_block_types": ("UpDecoderBlock2D",) * 2,
        "layers_per_block": 1,
        "norm_num_groups": 4,
        "sample_size": 64,
        "scaling_factor": 1.5305,
        "shift_factor": 0.0609,
        "use_quant_conv": False,
        "use_post_quant_conv": False,
    }
)

#: diffusers' ``AutoencoderTiny`` in the TAESD3 layout: 16 latent channels, four decoder stages
#: of 64 channels (8x up-sampling), ``scaling_factor`` 1 and ``shift_factor`` 0: TAESD3 reads
#: the diffusion-space latent itself (the transformer's), not the VAE's un-scaled one.
TAESD3: MappingProxyType[str, Any] = MappingProxyType(
    {
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": 16,
        "encoder_block_out_channels": (64, 64, 64, 64),
        "decoder_block_out_channels": (64, 64, 64, 64),
        "num_encoder_blocks": (1, 3, 3, 3),
        "num_decoder_blocks": (3, 3, 3, 1),
        "upsampling_scaling_factor": 2,
        "act_fn": "relu",
        "scaling_factor": 1.0,
        "shift_factor": 0.0,
    }
)

#: The TAESD3 layout at the tiny pipeline's size: 16 latent channels, 2x up-sampling.
TINY_TAESD3: MappingProxyType[str, Any] = MappingProxyType(
    {
        **TAESD3,
        "encoder_block_out_channels": (8, 8),
        "decoder_block_out_channels": (8, 8),
        "num_encoder_blocks": (1, 1),
        "num_decoder_blocks": (1, 1),
    }
)

_WORDS = (
    "a an the of on in with and photo picture painting red green blue yellow black white "
    "orange purple cat dog circle square triangle background small large"
).split()


def _clip_tokenizer() -> Any:
    """A CLIP BPE tokenizer over characters plus whole-word merges of a small word list."""
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in string.ascii_lowercase + string.digits + ".,!?'-":
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    merges: list[tuple[str, str]] = []
    for word in _WORDS:
        parts = [*word[:-1], word[-1] + "</w>"]
        while len(parts) > 1:
            pair = (parts[0], parts[1])
            if pair not in merges:
                merges.append(pair)
            vocab.setdefault(pair[0] + pair[1], len(vocab))
            parts = [pair[0] + pair[1], *parts[2:]]
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def _t5_tokenizer() -> Any:
    """A T5 (unigram) tokenizer over the word list and single characters, built in memory."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("▁" + w, -1.0) for w in _WORDS]
    pieces += [("▁", -2.0)]
    pieces += [(c, -3.0) for c in string.ascii_lowercase + string.digits + ".,!?'-"]
    return T5Tokenizer(vocab=pieces, extra_ids=0)


def build_tiny_sd3_pipeline(seed: int = 0) -> Any:
    """A tiny random ``StableDiffusion3Pipeline`` (CPU, float32), deterministic from ``seed``.

    Latents are (16, 32, 32) at 64x64 px. Needs the ``sd3`` extra.
    """
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import (
        CLIPTextConfig,
        CLIPTextModelWithProjection,
        T5Config,
        T5EncoderModel,
    )

    torch.manual_seed(seed)
    tok = _clip_tokenizer()
    t5_tok = _t5_tokenizer()

    def clip() -> Any:
        cfg = CLIPTextConfig(
            vocab_size=len(tok),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
            projection_dim=32,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
        return CLIPTextModelWithProjection(cfg).eval()

    t5_cfg = T5Config(
        vocab_size=len(t5_tok),
        d_model=32,
        d_ff=64,
        d_kv=8,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel(**TINY_TRANSFORMER).eval(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=AutoencoderKL(**TINY_VAE).eval(),
        text_encoder=clip(),
        tokenizer=tok,
        text_encoder_2=clip(),
        tokenizer_2=_clip_tokenizer(),
        text_encoder_3=T5EncoderModel(t5_cfg).eval(),
        tokenizer_3=t5_tok,
    )


def save_tiny_sd3_pipeline(path: str | Path, seed: int = 0) -> Path:
    """Build :func:`build_tiny_sd3_pipeline` and ``save_pretrained`` it to ``path``."""
    path = Path(path)
    build_tiny_sd3_pipeline(seed).save_pretrained(path)
    return path


def random_sd35_medium(
    *, dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu", seed: int = 0
) -> tuple[Any, Any]:
    """(transformer, vae): SD3.5-medium's transformer and the SD3 VAE with random weights.

    About 2.5 B transformer parameters: build on the GPU (``device="cuda"``) in bfloat16.
    """
    from diffusers import AutoencoderKL, SD3Transformer2DModel

    torch.manual_seed(seed)
    with torch.device(device):
        transformer = SD3Transformer2DModel(**SD35_MEDIUM_TRANSFORMER).to(dtype).eval()
        vae = AutoencoderKL(**SD3_VAE).to(dtype).eval()
    return transformer, vae


def build_tiny_preview_decoder(seed: int = 0) -> Any:
    """A tiny random ``AutoencoderTiny`` (:data:`TINY_TAESD3`; CPU, float32) that decodes the
    tiny pipeline's (16, 32, 32) latents to 64x64 images, deterministic from ``seed``."""
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed)
    return AutoencoderTiny(**TINY_TAESD3).eval()


def save_tiny_preview_decoder(path: str | Path, seed: int = 0) -> Path:
    """Build :func:`build_tiny_preview_decoder` and ``save_pretrained`` it to ``path``."""
    path = Path(path)
    build_tiny_preview_decoder(seed).save_pretrained(path)
    return path


def random_taesd3(
    *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", seed: int = 0
) -> Any:
    """``AutoencoderTiny`` at TAESD3's full size (:data:`TAESD3`, about 2.4 M parameters) with
    random weights, for timing the preview decoder without its weights."""
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed)
    with torch.device(device):
        decoder = AutoencoderTiny(**TAESD3).eval()
    # nn.Module.to: diffusers' ModelMixin.to logs a notice about casting that does not apply
    return torch.nn.Module.to(decoder, dtype)


#: A ``preview_decoder`` value that builds TAESD3's layout with random weights (timing only).
PREVIEW_RANDOM = "random"


def preview_decoder_for(spec: str | Path, model: Any) -> Any:
    """The preview decoder ``spec`` for ``model`` (an SD3FlowModel), in the transformer's
    dtype on the model's device: a local ``AutoencoderTiny`` folder
    (:func:`~smartgrpo_fast.models.sd3.load_preview_decoder`, checked first), or
    :data:`PREVIEW_RANDOM`: TAESD3's layout with random weights whose up-sampling is the VAE's
    (8x: :func:`random_taesd3`, as for ``random:sd35-medium`` and real SD3 folders; 2x: the
    tiny pipeline's, :func:`build_tiny_preview_decoder`). The trainer's
    ``model.preview_decoder`` and ``bench search|preview``'s ``--preview-decoder`` use it."""
    from smartgrpo_fast.models.sd3 import load_preview_decoder

    if str(spec) != PREVIEW_RANDOM:
        return load_preview_decoder(spec, latent_channels=model.latent_shape[0],
                                    dtype=model.dtype, device=model.device)  # fmt: skip
    if getattr(model, "vae_scale_factor", 8) == 2:
        dec = build_tiny_preview_decoder(seed=0).to(model.device)
        return torch.nn.Module.to(dec, model.dtype)
    return random_taesd3(dtype=model.dtype, device=model.device)


#: ``models.load("random:NAME")``: (transformer config, VAE config) of each random model.
RANDOM_MODELS: MappingProxyType[str, tuple[Any, Any]] = MappingProxyType(
    {
        "sd35-medium": (SD35_MEDIUM_TRANSFORMER, SD3_VAE),
        "sd3-tiny": (TINY_TRANSFORMER, TINY_VAE),
    }
)


class _RandomPipe:
    """The components :class:`~smartgrpo_fast.models.sd3.SD3FlowModel` reads, without text
    encoders (their embeddings are drawn instead)."""

    text_encoder = text_encoder_2 = text_encoder_3 = None

    def __init__(self, transformer: Any, vae: Any) -> None:
        from diffusers import FlowMatchEulerDiscreteScheduler

        self.transformer = transformer
        self.vae = vae
        self.scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)


class RandomTextSD3FlowModel(SD3FlowModel):
    """An SD3FlowModel whose prompt embeddings are random: for each prompt, (77 +
    ``max_sequence_length``, ``joint_attention_dim``) token embeddings and a
    (``pooled_projection_dim``,) pooled vector drawn from N(0, 1) with a seed taken from the
    prompt's SHA-256, so a prompt always gets the same conditioning. They have the shapes, and
    so the cost in the transformer, of CLIP-L + CLIP-G + T5-XXL's embeddings, not their
    meaning: a training step is timed without the 5.6 B text-encoder parameters (a real run
    encodes each prompt once, outside the step, with ``model.embedding_cache``)."""

    def _encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        c = self.transformer.config
        tokens = 77 + self.config.max_sequence_length
        guided = self.config.guidance_scale > 1.0
        out: dict[str, list[torch.Tensor]] = {}
        for prompt in prompts:
            for neg in (False, True) if guided else (False,):
                text = ("negative:" if neg else "prompt:") + prompt
                seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1
                gen = torch.Generator().manual_seed(seed)
                emb = torch.randn(1, tokens, c.joint_attention_dim, generator=gen)
                pooled = torch.randn(1, c.pooled_projection_dim, generator=gen)
                pre = "negative_" if neg else ""
                out.setdefault(f"{pre}prompt_embeds", []).append(emb)
                out.setdefault(f"{pre}pooled", []).append(pooled)
        return {k: torch.cat(v).to(self.device, self.dtype) for k, v in out.items()}


def random_sd3_model(
    name: str = "sd35-medium",
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    config: Any = None,
    seed: int = 0,
    lora: str | Path | None = None,
) -> Any:
    """An SD3FlowModel of :data:`RANDOM_MODELS` ``name`` with random weights, built on
    ``device`` (the transformer in ``dtype``, the VAE in float32 as ``from_pretrained`` loads
    it; random prompt embeddings: :class:`RandomTextSD3FlowModel`). ``sd35-medium`` has 2.5 B
    transformer parameters: build it on the GPU, where it takes seconds (minutes on a CPU)."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel

    from smartgrpo_fast.models.sd3 import SD3Config

    if name not in RANDOM_MODELS:
        raise ValueError(
            f"random:{name}: expected random:{' or random:'.join(RANDOM_MODELS)} "
            "(a random-weight model built in memory)"
        )
    tcfg, vcfg = RANDOM_MODELS[name]
    torch.manual_seed(seed)
    with torch.device(device):
        transformer = SD3Transformer2DModel(**tcfg).eval()
        vae = AutoencoderKL(**vcfg).eval()
    torch.nn.Module.to(transformer, dtype)  # diffusers' own .to warns about fp32 modules (none)
    pipe = _RandomPipe(transformer, vae)
    model = RandomTextSD3FlowModel(pipe, config or SD3Config(), name=f"random:{name}")
    if lora is not None:
        from smartgrpo_fast.models.lora import load_adapter

        load_adapter(model, lora)
    return model
