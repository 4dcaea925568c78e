"""The thin GRPO trainer: SDE rollouts with log-probabilities, the loss, the loop, and its
evaluation and plots.

* :class:`GRPOTrainer` (:mod:`.trainer`) — one optimizer step per ``train_step``; ``train()``
  runs, evaluates and checkpoints; ``smartgrpo-fast train`` is its command line (:mod:`.cli`);
* :class:`RunConfig` and :func:`load_config` (:mod:`.config`) — frozen dataclasses, shipped YAML
  configs (``tiny``, ``sd35-medium``) and dotted overrides;
* :func:`sample_rollouts` (:mod:`.rollout`), :func:`group_advantages` and :func:`policy_terms`
  (:mod:`.loss`), atomic checkpoints (:mod:`.checkpoint`), prompts and draw keys (:mod:`.data`);
* :func:`evaluate` (:mod:`.evaluate`) and :func:`plot_runs` (:mod:`.plot`).
"""

from smartgrpo_fast.train.config import RunConfig, load_config
from smartgrpo_fast.train.evaluate import EvalConfig, EvalResult, evaluate
from smartgrpo_fast.train.loss import group_advantages, policy_terms
from smartgrpo_fast.train.plot import plot_runs
from smartgrpo_fast.train.rollout import Rollouts, sample_rollouts
from smartgrpo_fast.train.trainer import METRIC_KEYS, GRPOTrainer

__all__ = [
    "METRIC_KEYS",
    "EvalConfig",
    "EvalResult",
    "GRPOTrainer",
    "Rollouts",
    "RunConfig",
    "evaluate",
    "group_advantages",
    "load_config",
    "plot_runs",
    "policy_terms",
    "sample_rollouts",
]
