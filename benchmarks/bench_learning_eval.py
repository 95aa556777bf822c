"""bench_learning.py's held-out evaluator, one implementation for both sides (torch, transformers, peft only).

The hfpg worker (project venv) and the TRL worker (``.venv-peers``) both import this file and hand the same
:class:`HeldOutCallback` (a ``transformers.TrainerCallback``: TRL's ``Trainer`` and hfpg's ``PGTrainer`` both call
those) to their trainer. An evaluation samples one completion per held-out prompt with a fixed seed (the same seed
at every evaluation, in every run), scores it with the same reward components, and measures the KL of the policy
to the reference (the same model with its LoRA adapter disabled) on those samples:

    KL = mean over prompts of sum over completion tokens (stop token included) of log pi(y_t) - log pi_ref(y_t)

(k1 on the policy's own samples: an unbiased estimate of the sequence-level KL(pi || pi_ref); the k3 estimate,
sum of r - 1 - log r with r = pi_ref / pi, is recorded beside it).

Samples seen count every completion the trainer generated for training (the training reward is wrapped in a
:class:`SampleCounter`; the evaluator's own samples are not counted). Training stops once the budget is reached.
"""

from __future__ import annotations

import json
import os
import time

import torch
from transformers import GenerationConfig, TrainerCallback


class SampleCounter:
    """Completions generated for training so far (each is scored exactly once by the training reward)."""

    def __init__(self) -> None:
        self.n = 0

    def add(self, k: int) -> None:
        self.n += int(k)


def peft_model_of(model):
    """The ``peft.PeftModel`` inside ``model``: TRL's policy itself, hfpg's ``policy.pretrained_model``."""
    from peft import PeftModel

    m = model
    for _ in range(4):
        if isinstance(m, PeftModel):
            return m
        m = getattr(m, "pretrained_model", None) or getattr(m, "module", None)
        if m is None:
            break
    raise TypeError(f"bench_learning: no PEFT model inside {type(model).__name__} (the benchmark trains LoRA)")


class HeldOutEvaluator:
    """Sample, score and measure KL on fixed held-out prompts (see the module docstring).

    ``prompts``: the held-out prompts as the policy sees them (chat template applied); ``rewards``: (name, weight,
    fn) with ``fn(prompts, completions) -> list[float]``; the reward is the weighted sum of the components.
    """

    def __init__(self, tokenizer, prompts, rewards, max_new_tokens: int, temperature: float = 1.0, seed: int = 1234):
        self.tokenizer, self.prompts, self.rewards = tokenizer, list(prompts), list(rewards)
        self.max_new_tokens, self.temperature, self.seed = int(max_new_tokens), float(temperature), int(seed)
        self.batch_size = 8  # fixed, so that the random stream (and so the samples of a given policy) never changes
        eos = tokenizer.eos_token_id
        self.stop_ids = [eos] if isinstance(eos, int) else list(eos or [])
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.stop_ids[0]

    def generation_config(self) -> GenerationConfig:
        return GenerationConfig(
            do_sample=True,
            temperature=self.temperature,
            top_k=0,
            top_p=1.0,
            min_p=None,
            max_new_tokens=self.max_new_tokens,
            eos_token_id=self.stop_ids,
            pad_token_id=self.pad_id,
            repetition_penalty=1.0,
            num_beams=1,
            use_cache=True,
        )

    @torch.no_grad()
    def _batch(self, peft, prompts: list[str]) -> dict:
        tok = self.tokenizer
        side = tok.padding_side
        tok.padding_side = "left"
        try:  # string prompts, special tokens as both trainers add them (tokenizer(text))
            enc = tok(prompts, padding=True, return_tensors="pt")
        finally:
            tok.padding_side = side
        device = next(peft.parameters()).device
        ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)  # (B, P)
        out = peft.generate(input_ids=ids, attention_mask=mask, generation_config=self.generation_config())
        resp = out[:, ids.shape[1] :]  # (B, T)
        is_stop = torch.zeros_like(resp, dtype=torch.bool)
        for s in self.stop_ids:
            is_stop |= resp == s
        # real tokens: up to and including the first stop token
        after_stop = (torch.cumsum(is_stop.long(), dim=1) - is_stop.long()) > 0
        rmask = ~after_stop  # (B, T)
        resp = resp.masked_fill(~rmask, self.pad_id)
        full = torch.cat([ids, resp], dim=1)
        attn = torch.cat([mask, rmask.long()], dim=1)
        pos = (attn.cumsum(1) - 1).clamp(min=0)

        def logprobs(model) -> torch.Tensor:  # (B, T) log-probs of the sampled tokens, temperature applied
            logits = model(input_ids=full, attention_mask=attn, position_ids=pos).logits[:, ids.shape[1] - 1 : -1]
            logp = torch.log_softmax(logits.float() / self.temperature, dim=-1)
            return logp.gather(-1, resp.unsqueeze(-1)).squeeze(-1)

        lp = logprobs(peft)
        with peft.disable_adapter():
            ref = logprobs(peft)
        m = rmask.float()
        log_ratio = (lp - ref) * m
        k3 = (torch.exp(-log_ratio) - 1 + log_ratio) * m
        texts = [tok.decode(r[k].tolist(), skip_special_tokens=True) for r, k in zip(resp, rmask)]
        return {
            "texts": texts,
            "kl": log_ratio.sum(1).tolist(),
            "kl_k3": k3.sum(1).tolist(),
            "length": m.sum(1).tolist(),
            "stopped": is_stop.any(1).tolist(),
        }

    def __call__(self, model) -> dict:
        peft = peft_model_of(model)
        was_training = peft.training
        peft.eval()
        t0 = time.perf_counter()
        parts: dict[str, list] = {}
        try:
            with torch.random.fork_rng(devices=[]):  # the training run's random stream is left as it was
                torch.manual_seed(self.seed)
                for i in range(0, len(self.prompts), self.batch_size):
                    for k, v in self._batch(peft, self.prompts[i : i + self.batch_size]).items():
                        parts.setdefault(k, []).extend(v)
        finally:
            peft.train(was_training)
        texts = parts["texts"]
        components = {name: [float(x) for x in fn(list(self.prompts), list(texts))] for name, _, fn in self.rewards}
        total = [sum(w * components[name][i] for name, w, _ in self.rewards) for i in range(len(texts))]
        n = len(texts)
        mean = sum(total) / n
        return {
            "reward": mean,
            "reward_std": (sum((x - mean) ** 2 for x in total) / max(n - 1, 1)) ** 0.5,
            "components": {k: sum(v) / n for k, v in components.items()},
            "kl": sum(parts["kl"]) / n,
            "kl_k3": sum(parts["kl_k3"]) / n,
            "length": sum(parts["length"]) / n,
            "stopped_fraction": sum(parts["stopped"]) / n,
            "eval_seconds": time.perf_counter() - t0,
            "examples": texts[:3],
        }


class HeldOutCallback(TrainerCallback):
    """Evaluates at the start, every ``eval_every`` samples and at the end; stops training at ``budget`` samples.

    Works in TRL's ``Trainer`` and in hfpg's ``PGTrainer`` (both pass ``model=`` and a ``TrainerState``). Step times
    (between consecutive ``on_step_end``) exclude the evaluations. Every evaluation is appended to ``out_path`` (JSON)
    as it happens, so a run that dies later keeps what it measured.
    """

    def __init__(
        self, evaluator: HeldOutEvaluator, counter: SampleCounter, budget: int, eval_every: int, out_path, meta
    ):
        self.evaluator, self.counter, self.budget, self.eval_every = evaluator, counter, int(budget), int(eval_every)
        self.out_path, self.meta = out_path, dict(meta)
        self.evaluations: list[dict] = []
        self.step_seconds: list[float] = []
        self.step_samples: list[int] = []
        self.next_eval = self.eval_every
        self.eval_total = 0.0
        self.t_begin = self.t_last = None

    def _evaluate(self, model, state) -> None:
        t = time.perf_counter()
        result = self.evaluator(model)
        result.update(step=int(state.global_step), samples=self.counter.n, train_seconds=self.train_seconds(t))
        self.evaluations.append(result)
        self.eval_total += time.perf_counter() - t
        print(
            f"[{self.meta.get('run', '')}] step {state.global_step:3d} samples {self.counter.n:5d}  held-out reward "
            f"{result['reward']:+.3f}  KL {result['kl']:.2f}  len {result['length']:.1f}  "
            f"({result['eval_seconds']:.1f} s eval)",
            flush=True,
        )
        self.write()

    def train_seconds(self, now: float | None = None) -> float:
        if self.t_begin is None:
            return 0.0
        return (now or time.perf_counter()) - self.t_begin - self.eval_total

    def write(self, **extra) -> None:
        self.meta.update(extra)
        data = {**self.meta, "evaluations": self.evaluations, "step_seconds": self.step_seconds}
        data["step_samples"] = self.step_samples
        tmp = self.out_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, self.out_path)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.t_begin = time.perf_counter()
        self._evaluate(model, state)
        self.t_last = time.perf_counter()

    def on_step_end(self, args, state, control, model=None, **kwargs):
        now = time.perf_counter()
        self.step_seconds.append(now - self.t_last)
        self.step_samples.append(self.counter.n)
        if self.counter.n >= self.budget:
            self._evaluate(model, state)
            control.should_training_stop = True
        elif self.counter.n >= self.next_eval:
            self._evaluate(model, state)
        while self.next_eval <= self.counter.n:
            self.next_eval += self.eval_every
        self.t_last = time.perf_counter()
        return control

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if not self.evaluations or self.evaluations[-1]["samples"] != self.counter.n:
            self._evaluate(model, state)  # max_steps came before the budget
        self.write(train_seconds=self.train_seconds(), eval_seconds=self.eval_total, samples=self.counter.n)


def load_spec(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


class WorkerRun:
    """The set-up both workers share: ``WorkerRun(spec_path, run_path, side, versions)`` reads the spec and the run,
    builds the reward components (hfpg's reward callables: the peers venv has hfpg installed editable), the tokenizer,
    the evaluator, the sample counter and the result's metadata; :meth:`callback` is the held-out callback to hand to
    the trainer. ``versions``: the worker's own library versions (torch, transformers and peft are added); ``t0``: the
    worker's ``time.perf_counter()`` at start (default: now)."""

    def __init__(self, spec_path: str, run_path: str, side: str, versions: dict, t0: float | None = None):
        import peft
        import transformers
        from transformers import AutoTokenizer

        from hfpg.rewards.registry import build_reward_part

        self.t0 = time.perf_counter() if t0 is None else t0  # the worker's start, before its imports
        self.spec, self.run = load_spec(spec_path), load_spec(run_path)
        self.settings = s = self.spec["settings"]
        self.parts = [  # (label, weight, fn(prompts, completions) -> scores)
            (r.get("label") or r["name"], float(r.get("weight", 1.0)), build_reward_part(r))
            for r in self.spec["rewards"]
        ]
        self.counter = SampleCounter()
        self.tokenizer = AutoTokenizer.from_pretrained(self.spec["model_dir"])
        self.evaluator = HeldOutEvaluator(
            self.tokenizer, self.spec["eval_prompts"], self.parts, s["max_new_tokens"], s["temperature"]
        )
        versions = {
            **versions,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
        }
        self.meta = {
            "run": self.run["name"],
            "method": self.run["method"],
            "seed": self.run["seed"],
            "side": side,
            "versions": versions,
            "threads": torch.get_num_threads(),
        }

    def callback(self, **meta) -> HeldOutCallback:
        """The held-out callback, its result's metadata extended by ``meta`` (e.g. the run's config)."""
        s, meta = self.settings, {**self.meta, **meta}
        return HeldOutCallback(
            self.evaluator, self.counter, s["budget"], s["eval_every_samples"], self.run["result"], meta
        )

    def seconds(self) -> float:
        """Seconds since the worker started setting up."""
        return time.perf_counter() - self.t0
