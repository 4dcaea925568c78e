"""Train the embedded world's attribute classifier (the ``tiny`` rewards), reproducibly from
a seed, on freshly rendered images made robust to generated ones (blur, noise).

    python -m smartgrpo_fast.shapes.train_reward --steps 1500 --seed 0 \
        --out smartgrpo_fast/shapes/weights/classifier.safetensors
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from smartgrpo_fast.shapes.data import sample_batch
from smartgrpo_fast.shapes.reward import CLASSIFIER_FILE, TinyClassifier

__all__ = ["main", "train_classifier"]


def _augment(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Robustness to generated images: random blur and Gaussian noise."""
    n = images.shape[0]
    blur = F.avg_pool2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    w = torch.rand(n, 1, 1, 1, generator=gen) * 0.7
    noisy = (1 - w) * images + w * blur
    sigma = torch.rand(n, 1, 1, 1, generator=gen) * 0.12
    return (noisy + sigma * torch.randn(noisy.shape, generator=gen)).clamp(0, 1)


def train_classifier(
    *, steps: int = 1500, batch: int = 64, lr: float = 2e-3, seed: int = 0, log=print
) -> TinyClassifier:
    """Train the attribute classifier on freshly generated images (deterministic from seed)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    net = TinyClassifier()
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    for step in range(steps):
        images, attrs = sample_batch(batch, gen)
        logits = net(_augment(images, gen))
        loss = sum(
            F.cross_entropy(lg, t)
            for lg, t in zip(logits, (attrs.shape, attrs.color, attrs.background), strict=True)
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 250 == 0 or step == steps - 1:
            log(f"classifier step {step:5d}  loss {float(loss.detach()):.4f}")
    return net.eval()


def main(argv: list[str] | None = None) -> int:
    """``python -m smartgrpo_fast.shapes.train_reward``: train the classifier and save it."""
    from safetensors.torch import save_file

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=CLASSIFIER_FILE)
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    start = time.perf_counter()
    net = train_classifier(steps=args.steps, seed=args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.to(torch.float16).contiguous() for k, v in net.state_dict().items()}
    save_file(state, args.out, metadata={"seed": str(args.seed), "steps": str(args.steps)})
    print(f"saved {args.out} after {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
