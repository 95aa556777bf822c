"""From the reward functions' raw numbers to the advantages the update uses: every normalisation stage, in order.

====  ==================================================  =====================  =====================================
#     stage                                               where                  config keys
====  ==================================================  =====================  =====================================
1     z-score each reward part (global batch or running)  ``CombinedReward``     ``reward_normalize``
2     weighted sum of the parts, then clip the total      ``CombinedReward``     ``rewards[].weight``, ``reward_clip``
3     subtract a penalty when no stop token was sampled   :class:`ScoreShaper`   ``missing_eos_penalty``
4     scale: ÷ running std (mean kept), or whiten         :class:`ScoreShaper`   ``score_scaling``
5     clip the score                                      :class:`ScoreShaper`   ``score_clip``
6     per-token rewards: −β·KL(t), score at the last one  ``compute_advantages`` ``kl_coef``, ``kl_estimator``
7     whiten the per-token rewards (mean kept)            ``compute_advantages`` ``whiten_rewards``
8     GAE, or returns − baseline (group_norm ÷ its std)   ``compute_advantages`` ``advantage_estimator``, ``baseline``
9     whiten the advantages (mean removed)                ``compute_advantages`` ``whiten_advantages``
====  ==================================================  =====================  =====================================

(``CombinedReward``: :mod:`hfpg.rewards.combined`; ``compute_advantages``: :mod:`hfpg.algorithms.advantages`; with
``kl_penalty: loss`` stage 6 adds the score only and the update adds β·KL to the loss.)
Stages 1–2 run inside the reward (so the logged ``reward/<part>/mean`` are raw scores and ``objective/scores`` the
combined total), 3–5 here (``objective/scores_shaped``), 6–9 in the advantages. Every statistic is over the global
batch (all processes) and follows :mod:`hfpg.stats`' convention (Bessel-corrected variance); whitening counts real
tokens only. By default only stage 9 is on. A sample no reward applied to (every part returned None: unscorable) is
left out of every statistic from stage 3 on and gets advantage 0.
"""

from __future__ import annotations

import torch

from .stats import RunningMoments, global_moments


class ScoreShaper:
    """Stages 3–5: the missing-EOS penalty, score scaling and clipping, (B,) scores -> (B,) shaped scores.

    Checkpointable: ``score_scaling: running_std`` keeps running moments of every score seen.
    """

    def __init__(self, config):
        self.config = config
        self.moments = RunningMoments()

    @torch.no_grad()
    def __call__(
        self, scores: torch.Tensor, has_stop: torch.Tensor, accelerator=None, scorable: torch.Tensor | None = None
    ) -> torch.Tensor:
        """scores: (B,) from the reward function, has_stop: (B,) bool -> (B,) shaped scores (a new tensor).
        scorable: (B,) bool; the others are left out of the statistics and shaped to 0."""
        cfg = self.config
        scores = scores.clone()
        if cfg.missing_eos_penalty is not None:
            scores = torch.where(has_stop, scores, scores - cfg.missing_eos_penalty)
        if cfg.score_scaling != "none":
            pick = scores if scorable is None else (scores, scorable)
            batch = global_moments(accelerator, {"scores": pick}, device=scores.device)["scores"]
            if cfg.score_scaling == "running_std":
                self.moments.update(batch)
                std = self.moments.std
                scores = scores / (std if std > 1e-8 else 1.0)
            else:  # whiten
                scores = (scores - batch.mean) / (batch.std + 1e-8)
        if cfg.score_clip is not None:
            scores = scores.clamp(-cfg.score_clip, cfg.score_clip)
        return scores if scorable is None else torch.where(scorable, scores, 0.0)

    def state_dict(self) -> dict:
        return self.moments.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.moments.load_state_dict(state)
