"""Prompts for training and evaluation, and the keys of every random draw of a run.

Every draw of a run is a pure function of integers: :func:`derive_seed` mixes the run's seed
with a purpose tag, the optimizer step and any further index (the SDE step, an epoch) into a
63-bit Philox key, and the rows of a draw are global rollout indices ``prompt * G + member``
(``row_offset`` of the fused ops). So the noise of a step's rollouts does not depend on batch
sizes or on the number of processes (bit for bit); the rollouts agree up to float32 reduction
order, which the model's kernels choose by batch size and CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

__all__ = [
    "EVAL_PROMPT_SEED",
    "PromptSource",
    "derive_seed",
    "eval_prompts",
    "jsonl_objects",
    "read_prompt_file",
]

#: ``sample_prompts`` seed of the embedded world's held-out prompts (``smartgrpo-fast eval``
#: uses the same by default). Training prompts use derived seeds >= 2**40, never this one.
EVAL_PROMPT_SEED = 1000

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def derive_seed(seed: int, *keys: int | str) -> int:
    """A 63-bit seed mixed from ``seed`` and ``keys`` (ints or short strings) by SplitMix64:
    distinct keys give unrelated seeds; the same keys always the same seed."""
    h = _splitmix64(int(seed) & _MASK64)
    for key in keys:
        if isinstance(key, str):
            key = int.from_bytes(key.encode()[:8].ljust(8, b"\0"), "little")
        h = _splitmix64(h ^ (int(key) & _MASK64))
    return h >> 1


def jsonl_objects(path: str | Path) -> list[tuple[int, dict]]:
    """(line number, object) of each non-empty line of a JSONL file; ValueError naming the file
    and line for a line that is not a JSON object (the caller checks that the file exists)."""
    path = Path(path)
    rows = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
        rows.append((lineno, row))
    return rows


def read_prompt_file(path: str | Path) -> list[str]:
    """Prompts of a text file (one per non-empty line) or a JSONL file (``.jsonl``: one object
    per line with a ``prompt`` string, what Flow-GRPO's prompt sets look like)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: prompt file not found")
    prompts: list[str] = []
    if path.suffix == ".jsonl":
        for no, obj in jsonl_objects(path):
            if not isinstance(obj.get("prompt"), str):
                raise ValueError(f"{path}:{no}: expected an object with a 'prompt' string")
            prompts.append(obj["prompt"])
    else:
        lines = path.read_text(encoding="utf-8").splitlines()
        prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts


class PromptSource:
    """The prompts of each optimizer step: ``batch(step, n)`` -> n prompts (global order).

    ``"tiny"``: ``n`` fresh prompts of the embedded world per step (``sample_prompts`` keyed by
    the run's seed and the step); a file: its prompts in a fresh seeded permutation per pass.
    """

    def __init__(self, spec: str, seed: int) -> None:
        self.spec = spec
        self.seed = seed
        self.prompts = None if spec == "tiny" else read_prompt_file(spec)

    def batch(self, step: int, n: int) -> list[str]:
        """The ``n`` prompts of optimizer step ``step`` (1-based)."""
        if self.prompts is None:
            from smartgrpo_fast.shapes import sample_prompts

            return sample_prompts(n, derive_seed(self.seed, "prompts", step) | (1 << 40))
        total = len(self.prompts)
        perms: dict[int, list[int]] = {}
        out = []
        for q in range((step - 1) * n, step * n):
            epoch, pos = divmod(q, total)
            if epoch not in perms:
                gen = torch.Generator().manual_seed(derive_seed(self.seed, "epoch", epoch))
                perms[epoch] = torch.randperm(total, generator=gen).tolist()
            out.append(self.prompts[perms[epoch][pos]])
        return out


def eval_prompts(spec: str, num: int) -> list[str]:
    """The held-out prompts: ``tiny`` -> ``sample_prompts(num, EVAL_PROMPT_SEED)``; a file ->
    its first ``num`` prompts."""
    if spec == "tiny":
        from smartgrpo_fast.shapes import sample_prompts

        return sample_prompts(num, EVAL_PROMPT_SEED)
    return read_prompt_file(spec)[:num]
