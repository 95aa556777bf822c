"""bench_learning.py's TRL worker: one RLOOTrainer / GRPOTrainer run (TRL 1.16, ``.venv-peers``) in this process.

    bench_learning_trl.py SPEC.json RUN.json

Same model folder, LoRA, prompts (the chat-templated strings hfpg trains on, so both tokenize the same text),
reward components (hfpg's own reward callables, built from the same specs: the peers venv has hfpg installed
editable), sampling, KL coefficient, learning rate, optimizer and sample budget as the hfpg runs; the same held-out
callback. One generation batch of ``samples_per_step`` completions (``samples_per_step / k`` prompts x k) is one
optimizer step.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("ACCELERATE_USE_CPU", "true")


def config_kwargs(spec: dict, run: dict, output_dir: str) -> dict:
    """RLOOConfig / GRPOConfig keys: the shared settings, then the method's own overrides."""
    s = spec["settings"]
    kw = dict(
        output_dir=output_dir,
        seed=run["seed"],
        use_cpu=True,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,  # as hfpg (TRL's default is True; transformers 5 renamed it)
        activation_checkpointing=False,
        max_steps=run["max_steps"],
        per_device_train_batch_size=s["samples_per_step"],
        gradient_accumulation_steps=1,
        steps_per_generation=1,
        num_iterations=1,
        num_generations=4,
        max_completion_length=s["max_new_tokens"],
        temperature=s["temperature"],
        top_p=1.0,
        top_k=0,
        min_p=None,
        repetition_penalty=1.0,
        beta=s["beta"],
        learning_rate=s["learning_rate"],
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim="adamw_torch",  # torch.optim.AdamW, as hfpg
        disable_dropout=True,
        reward_weights=[float(r.get("weight", 1.0)) for r in spec["rewards"]],
        logging_strategy="no",
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        log_completions=False,
        dataloader_num_workers=0,
    )
    kw.update(run["config"])
    return kw


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    spec_path, run_path = argv
    t0 = time.perf_counter()
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    import datasets
    import peft
    import transformers
    import trl
    from bench_learning_eval import WorkerRun

    w = WorkerRun(spec_path, run_path, "trl", {"trl": trl.__version__}, t0=t0)
    spec, run = w.spec, w.run

    def as_trl_reward(name, fn, count):
        def reward(prompts, completions, **kwargs):
            if count:  # TRL scores every generated completion once per reward function: count on the first
                w.counter.add(len(completions))
            return [float(x) for x in fn(list(prompts), list(completions))]

        reward.__name__ = name
        return reward

    reward_funcs = [as_trl_reward(name, fn, i == 0) for i, (name, _, fn) in enumerate(w.parts)]
    tmp = tempfile.TemporaryDirectory(prefix=f"bench-learning-{run['name']}-")
    kwargs = config_kwargs(spec, run, tmp.name)
    if run["trainer"] == "rloo":
        config_cls, trainer_cls = trl.RLOOConfig, trl.RLOOTrainer
    else:
        config_cls, trainer_cls = trl.GRPOConfig, trl.GRPOTrainer
    config = config_cls(**kwargs)
    config.model_init_kwargs = {"dtype": torch.float32}
    lora = peft.LoraConfig(task_type="CAUSAL_LM", **spec["peft"])
    callback = w.callback(
        config={k: v for k, v in kwargs.items() if k != "output_dir"}, loss_type=getattr(config, "loss_type", None)
    )
    transformers.set_seed(run["seed"])  # the LoRA init, as hfpg seeds it before building the adapter
    trainer = trainer_cls(
        model=spec["model_dir"],
        reward_funcs=reward_funcs,
        args=config,
        train_dataset=datasets.Dataset.from_dict({"prompt": spec["train_prompts"]}),
        processing_class=w.tokenizer,
        callbacks=[callback],
        peft_config=lora,
    )
    callback.write(setup_seconds=w.seconds())
    trainer.train()
    callback.write(process_seconds=w.seconds(), completed=True)
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
