"""Full-size SD3.5 VAE decoder against a full-size AutoencoderTiny (TAESD3 layout), random
weights: the seconds of one decode of B latents (16, 64, 64) = B images at 512 px, and their
ratio. One timed run per decoder after one untimed run (allocation, oneDNN set-up), float32.

    OMP_NUM_THREADS=1 python3 benchmarks/decoder_ratio.py --batch 2

Prints one line per decoder and the ratio; ``--json FILE`` also writes them.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from smartgrpo_fast.models.sd3_configs import SD3_VAE, random_taesd3


def decode_seconds(decoder: torch.nn.Module, z: torch.Tensor) -> tuple[float, tuple[int, ...]]:
    """Seconds of one ``decoder.decode(z)`` after one untimed call; the images' shape."""
    with torch.no_grad():
        decoder.decode(z[:1])
        start = time.perf_counter()
        images = decoder.decode(z).sample
        return time.perf_counter() - start, tuple(images.shape)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=2, help="images per decode (default: 2)")
    p.add_argument("--latent", type=int, default=64, help="latent side: 64 = 512 px")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = p.parse_args(argv)
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    z = torch.randn(args.batch, 16, args.latent, args.latent)
    vae = AutoencoderKL(**SD3_VAE).eval()
    taesd = random_taesd3()
    out = {"batch": args.batch, "threads": torch.get_num_threads(), "torch": torch.__version__}
    for name, dec in (("sd3_vae", vae), ("taesd3", taesd)):
        n_params = sum(q.numel() for q in dec.decoder.parameters())
        sec, shape = decode_seconds(dec, z)
        out[name] = {"seconds": sec, "decoder_parameters": n_params, "images": shape}
        print(f"{name:<8} decoder {n_params / 1e6:6.2f} M parameters: {sec:8.3f} s for "
              f"{shape[0]} images of {shape[2]}x{shape[3]}")  # fmt: skip
    out["ratio"] = out["sd3_vae"]["seconds"] / out["taesd3"]["seconds"]
    print(f"ratio VAE / TAESD3: {out['ratio']:.1f}x ({out['threads']} thread(s))")
    if args.json is not None:
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    return out


if __name__ == "__main__":
    main()
