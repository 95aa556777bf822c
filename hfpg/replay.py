"""Experience replay: a bounded FIFO of past (scored) rollouts with their behaviour-policy logprobs.

Replayed sequences join each update next to the fresh ones. Their ratio/advantages use the *current* policy's
logprobs (recomputed before the update), and each token's loss is weighted by the truncated importance weight
``w = min(π_current / μ, ρ̄)`` (μ: the policy that generated it) — the identity for data with zero staleness.
Groups of ``num_samples_per_prompt`` sequences are kept and sampled whole, so group baselines still apply.
"""

from __future__ import annotations

from collections import deque

import torch

from .forward import rollout_forward
from .rollout import Rollout, concat_rollouts
from .stats import global_moments, global_sum

_KEEP = ("prompt_ids", "prompt_mask", "response_ids", "response_mask", "has_stop", "ref_logprobs", "behaviour_logprobs")


class ReplayBuffer:
    """Holds at most ``capacity`` sequences (in whole groups of ``group_size``) on the CPU; oldest leave first."""

    def __init__(self, capacity: int, group_size: int = 1):
        self.capacity, self.group_size = capacity, group_size
        self.groups: deque[dict] = deque()

    def __len__(self) -> int:
        return len(self.groups) * self.group_size

    def add(self, rollout: Rollout, shaped_scores: torch.Tensor, step: int) -> None:
        """Store a fresh rollout (its ``logprobs`` become μ) with the scores that entered its update."""
        k = self.group_size
        for start in range(0, rollout.batch_size, k):
            sl = slice(start, start + k)
            group = {name: getattr(rollout, name)[sl].detach().cpu() for name in _KEEP if name != "behaviour_logprobs"}
            group["behaviour_logprobs"] = rollout.logprobs[sl].detach().cpu()
            group["scores"] = shaped_scores[sl].detach().cpu()
            group["scorable"] = None if rollout.scorable is None else rollout.scorable[sl].cpu()
            group["step"] = step
            self.groups.append(group)
        while len(self) > self.capacity:
            self.groups.popleft()

    def sample(self, n_sequences: int, step: int, pad_token_id: int, device) -> Rollout:
        """``n_sequences`` (whole groups, drawn uniformly without replacement) as one Rollout on ``device``.

        ``scores`` holds the stored shaped scores and ``staleness`` the number of steps since generation.
        """
        n_groups = n_sequences // self.group_size
        if n_groups > len(self.groups):
            raise ValueError(f"the replay buffer holds {len(self)} sequences, {n_sequences} were asked for")
        picks = torch.randperm(len(self.groups))[:n_groups].tolist()
        parts = []
        for i in picks:
            g = self.groups[i]
            scorable = g.get("scorable")
            r = Rollout(
                **{name: g[name].to(device) for name in _KEEP},
                scores=g["scores"].to(device),
                scorable=None if scorable is None else scorable.to(device),
            )
            r.staleness = torch.full((self.group_size,), step - g["step"], device=device)
            parts.append(r)
        return concat_rollouts(parts, pad_token_id)

    def state_dict(self) -> dict:
        return {"capacity": self.capacity, "group_size": self.group_size, "groups": list(self.groups)}

    def load_state_dict(self, state: dict) -> None:
        need = {*_KEEP, "scores", "step"}
        for i, group in enumerate(state["groups"]):
            missing = need - set(group)
            if missing:
                raise ValueError(f"replay buffer group {i} lacks {sorted(missing)}")
        self.capacity, self.group_size = int(state["capacity"]), int(state["group_size"])
        self.groups = deque(state["groups"])


@torch.no_grad()
def mix_in_replay(
    buffer: ReplayBuffer,
    rollout: Rollout,
    scores: torch.Tensor,
    policy,
    config,
    accelerator,
    pad_token_id: int,
    step: int,
) -> tuple[Rollout, torch.Tensor, dict[str, float]]:
    """Append ``replay_batch_size / processes`` replayed sequences to the fresh rollout.

    Their ``logprobs``/``values`` are recomputed under the current policy (the "old" policy of this update) and each
    token gets ``w = min(π_current / μ, replay_is_clip)``. Returns (batch, scores, replay/* metrics); the batch is the
    fresh rollout alone until every process's buffer holds enough sequences (all processes decide together).
    """
    n_local = config.replay_batch_size // accelerator.num_processes
    ready = global_sum(accelerator, torch.tensor(float(len(buffer) >= n_local), device=accelerator.device))
    if ready < accelerator.num_processes:
        return rollout, scores, {"replay/ratio": 0.0}
    old = buffer.sample(n_local, step, pad_token_id, accelerator.device)
    policy.eval()
    with accelerator.autocast():
        out = rollout_forward(
            policy,
            old,
            config.temperature,
            with_values=True,
            with_entropy=True,
            chunk_size=config.forward_batch_size,
            logits_chunk_size=config.logits_chunk_size,
        )
    old.logprobs, old.values, old.entropy = out["logprobs"], out["values"], out["entropy"]
    mask = old.response_mask
    raw = torch.exp(old.logprobs - old.behaviour_logprobs)
    old.is_weights = torch.where(mask, raw.clamp(max=config.replay_is_clip), 0.0)
    batch = concat_rollouts([rollout, old], pad_token_id)
    m = global_moments(
        accelerator,
        {
            "staleness": old.staleness.float(),
            "is_weight": (old.is_weights, mask),
            "truncated": ((raw > config.replay_is_clip).float(), mask),
        },
    )
    replayed = m["staleness"].count
    return (
        batch,
        torch.cat([scores, old.scores]),
        {
            "replay/ratio": replayed / (replayed + config.rollout_batch_size),
            "replay/staleness": m["staleness"].mean,
            "replay/is_weight": m["is_weight"].mean,
            "replay/truncated_fraction": m["truncated"].mean,
        },
    )
