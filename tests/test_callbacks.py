"""transformers.TrainerCallback instances in PGTrainer(callbacks=[...]), next to hfpg's own callbacks."""

from __future__ import annotations

import pytest
from conftest import small_run, tiny_gpt2
from transformers import PrinterCallback, TrainerControl, TrainerState
from transformers import TrainerCallback as HFCallback

from hfpg import PGConfig, PGTrainer, TrainerCallback

PROMPTS = ["the cat", "a good day", "hello world", "policy gradient"]


def length_reward(prompts, completions, **columns):
    return [len(c) / 10 for c in completions]


def make_trainer(tokenizer, tmp_path, callbacks=None, eval_dataset=None, **overrides):
    return PGTrainer(
        tiny_gpt2(tokenizer),
        tokenizer,
        PGConfig(**small_run(tmp_path, **{"learning_rate": 1e-5, **overrides})),
        train_dataset=[{"prompt": p} for p in PROMPTS],
        reward_fn=length_reward,
        eval_dataset=eval_dataset,
        callbacks=callbacks,
    )


def test_transformers_printer_callback_prints_every_log(tokenizer, tmp_path, capsys):
    trainer = make_trainer(tokenizer, tmp_path, callbacks=[PrinterCallback], max_steps=2)  # a class: instantiated
    assert isinstance(trainer.callbacks[0], PrinterCallback)
    assert isinstance(trainer.state, TrainerState) and isinstance(trainer.control, TrainerControl)
    trainer.train()
    printed = [line for line in capsys.readouterr().out.splitlines() if "'objective/scores'" in line]
    assert len(printed) == 2  # logging_steps=1: one line per step
    assert f"'objective/kl': '{trainer.log_history[-1]['objective/kl']:.4g}'" in printed[-1]


class StopAfter(HFCallback):
    def __init__(self, step: int, by_return: bool = False):
        self.step, self.by_return, self.ends = step, by_return, 0

    def on_step_end(self, args, state, control, **kwargs):
        self.ends += 1
        if state.global_step == self.step:
            if self.by_return:  # transformers' rule: a returned control replaces the trainer's
                return TrainerControl(should_training_stop=True)
            control.should_training_stop = True


@pytest.mark.parametrize("by_return", [False, True])
def test_should_training_stop_ends_the_run_after_that_step(tokenizer, tmp_path, by_return):
    stop = StopAfter(2, by_return)
    trainer = make_trainer(tokenizer, tmp_path, callbacks=[stop], max_steps=5)
    trainer.train()
    assert trainer.global_step == 2 and stop.ends == 2
    assert [r["step"] for r in trainer.log_history] == [1, 2]
    assert trainer.control.should_training_stop


def test_transformers_callback_sees_state_args_and_eval_metrics(tokenizer, tmp_path):
    class Recorder(HFCallback):
        def __init__(self):
            self.steps, self.evals, self.kwargs = [], [], {}

        def on_step_end(self, args, state, control, **kwargs):
            self.steps.append((state.global_step, state.max_steps, len(state.log_history), args is trainer.config))
            self.kwargs = kwargs

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            self.evals.append((state.global_step, dict(metrics)))
            metrics.pop("eval/kl")  # a copy: the trainer's own metrics keep it

    rec = Recorder()
    data = [{"prompt": p} for p in PROMPTS]
    trainer = make_trainer(tokenizer, tmp_path, callbacks=[rec], eval_dataset=data, max_steps=3, eval_steps=2)
    trainer.train()
    # logging_steps=1 logs every step; the eval at step 2 adds a record of its own
    assert rec.steps == [(1, 3, 1, True), (2, 3, 3, True), (3, 3, 4, True)]
    assert trainer.state.log_history is trainer.log_history and trainer.state.global_step == 3
    assert [step for step, _ in rec.evals] == [2]
    assert "eval/scores" in rec.evals[0][1] and rec.evals[0][1]["eval/num_samples"] == len(PROMPTS)
    assert rec.kwargs["model"] is trainer.unwrapped_model and rec.kwargs["processing_class"] is tokenizer
    assert rec.kwargs["optimizer"] is trainer.optimizer and rec.kwargs["lr_scheduler"] is trainer.scheduler
    assert "eval/kl" in trainer.evaluate()


def test_control_flags_from_on_step_end_log_evaluate_and_save(tokenizer, tmp_path):
    class Flags(HFCallback):
        def __init__(self):
            self.at_step_begin, self.saves = [], []

        def on_step_begin(self, args, state, control, **kwargs):
            self.at_step_begin.append((control.should_log, control.should_evaluate, control.should_save))

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 1:
                control.should_log = True
            if state.global_step == 2:
                control.should_evaluate = control.should_save = True

        def on_save(self, args, state, control, **kwargs):
            self.saves.append(state.global_step)

    flags = Flags()
    data = [{"prompt": p} for p in PROMPTS]
    trainer = make_trainer(tokenizer, tmp_path, callbacks=[flags], eval_dataset=data, max_steps=3, logging_steps=10)
    trainer.train()
    run = tmp_path / "run"
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-2"]
    assert (run / "checkpoint-2" / "trainer_state.json").is_file() and flags.saves == [2]
    # off the logging grid (10): step 1 by should_log, the eval at step 2, step 3 as the last step
    assert [(r["step"], "eval/scores" in r) for r in trainer.log_history] == [(1, False), (2, True), (3, False)]
    assert flags.at_step_begin == [(False, False, False)] * 3  # reset at every new step


def test_hfpg_and_transformers_callbacks_fire_in_list_order(tokenizer, tmp_path):
    events = []

    class Hfpg(TrainerCallback):
        def __init__(self, name):
            self.name = name

        def on_train_begin(self, trainer):
            events.append(f"{self.name}:begin")

        def on_step_end(self, trainer, step, metrics):
            assert "objective/scores" in metrics
            events.append(f"{self.name}:step{step}")

        def on_log(self, trainer, step, logs):
            events.append(f"{self.name}:log{step}")

        def on_train_end(self, trainer):
            events.append(f"{self.name}:end")

    class HF(HFCallback):
        def on_init_end(self, args, state, control, **kwargs):
            events.append("hf:init")

        def on_train_begin(self, args, state, control, **kwargs):
            events.append("hf:begin")

        def on_step_begin(self, args, state, control, **kwargs):
            events.append(f"hf:step_begin{state.global_step}")

        def on_step_end(self, args, state, control, **kwargs):
            events.append(f"hf:step{state.global_step}")

        def on_log(self, args, state, control, logs=None, **kwargs):
            events.append(f"hf:log{state.global_step}")

        def on_train_end(self, args, state, control, **kwargs):
            events.append("hf:end")

    trainer = make_trainer(tokenizer, tmp_path, callbacks=[Hfpg("a"), HF(), Hfpg("b")], max_steps=1)
    assert events == ["hf:init"]  # hfpg callbacks have no on_init_end
    trainer.train()
    assert events == [
        "hf:init",
        "a:begin",
        "hf:begin",
        "b:begin",
        "hf:step_begin0",
        "a:log1",
        "hf:log1",
        "b:log1",
        "a:step1",
        "hf:step1",
        "b:step1",
        "a:end",
        "hf:end",
        "b:end",
    ]


def test_a_non_callback_is_a_type_error_naming_it(tokenizer, tmp_path):
    class NotACallback:
        def on_step_end(self, *args):
            pass

    with pytest.raises(TypeError, match="NotACallback"):
        make_trainer(tokenizer, tmp_path, callbacks=[PrinterCallback(), NotACallback()])
    trainer = make_trainer(tokenizer, tmp_path)
    trainer.callbacks.append(NotACallback())  # added after construction: caught when the first event fires
    with pytest.raises(TypeError, match="NotACallback"):
        trainer.train()
    assert trainer.global_step == 0
