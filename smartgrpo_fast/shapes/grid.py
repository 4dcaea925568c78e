"""An image grid of the embedded model: prompts (rows) x seeds (columns), ODE sampling.

python -m smartgrpo_fast.shapes.grid --prompts 6 --seeds 6 --steps 40 --out grid.png
"""

from __future__ import annotations

from pathlib import Path

import torch

from smartgrpo_fast.sde import sample_ode

__all__ = ["generate", "main", "save_grid"]


@torch.no_grad()
def generate(model, prompts: list[str], seeds: list[int], *, steps: int = 40) -> torch.Tensor:
    """Images (P, S, 3, H, W) in [0, 1]: prompt p from the initial noise of seed s."""
    noise = torch.stack(
        [torch.randn(model.latent_shape, generator=torch.Generator().manual_seed(s)) for s in seeds]
    )
    z = noise.repeat(len(prompts), 1, 1, 1).to(model.device)  # prompt-major, seeds inner
    cond = model.encode_prompts(prompts)
    x0 = sample_ode(model, cond, z, steps=steps, k=len(seeds))
    images = model.decode(x0)
    return images.view(len(prompts), len(seeds), *images.shape[1:]).cpu()


def save_grid(
    images: torch.Tensor, prompts: list[str], path: str | Path, *, scale: int = 4
) -> Path:
    """Write (P, S, 3, H, W) images as a PNG grid, each row labelled with its prompt."""
    from PIL import Image, ImageDraw

    p, s, _, h, w = images.shape
    label_w, pad = 270, 4
    cell_h, cell_w = h * scale, w * scale
    canvas = Image.new("RGB", (label_w + s * (cell_w + pad), p * (cell_h + pad)), "white")
    draw = ImageDraw.Draw(canvas)
    pixels = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 1, 3, 4, 2).numpy()
    for i in range(p):
        y = i * (cell_h + pad)
        draw.text((4, y + cell_h // 2 - 6), prompts[i], fill="black")
        for j in range(s):
            tile = Image.fromarray(pixels[i, j]).resize((cell_w, cell_h), Image.NEAREST)
            canvas.paste(tile, (label_w + j * (cell_w + pad), y))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def main(argv: list[str] | None = None) -> int:
    """``python -m smartgrpo_fast.shapes.grid ARGS`` = ``smartgrpo-fast grid ARGS``."""
    import sys

    from smartgrpo_fast.cli import main as cli_main

    return cli_main(["grid", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
