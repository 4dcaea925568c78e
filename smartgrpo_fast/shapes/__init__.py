"""The embedded default: a tiny SD3-architecture text-to-image flow model that ships inside the
package, with its procedural world (:mod:`.data`) and training script (:mod:`.train`).

``smartgrpo_fast.models.load("tiny")`` returns the :class:`TinyFlowModel`;
``smartgrpo_fast.rewards.load("tiny")`` the prompt-matching reward; :func:`sample_prompts`
gives valid prompts.
"""

from smartgrpo_fast.shapes.data import (
    COLORS,
    SHAPES,
    attributes_from_prompt,
    prompt_of,
    render,
    sample_batch,
    sample_prompts,
)
from smartgrpo_fast.shapes.model import WEIGHTS_DIR, TinyArch, TinyFlowModel, tokenize

__all__ = [
    "COLORS",
    "SHAPES",
    "WEIGHTS_DIR",
    "TinyArch",
    "TinyFlowModel",
    "attributes_from_prompt",
    "prompt_of",
    "render",
    "sample_batch",
    "sample_prompts",
    "tokenize",
]
