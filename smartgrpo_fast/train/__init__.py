"""The thin GRPO trainer: SDE rollouts with log-probabilities, the loss, the loop, and its
evaluation and plots."""
