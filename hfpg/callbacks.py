"""Callbacks: hooks into the training loop. Subclass and override what you need.

``PGTrainer(callbacks=[...])`` takes two kinds, side by side, called in list order at each event:

* hfpg's :class:`TrainerCallback`: every hook receives the trainer (``on_step_end(trainer, step, metrics)``, ...);
* a ``transformers.TrainerCallback`` (``PrinterCallback``, your own, ...): called as the transformers ``Trainer``
  calls it, ``hook(args, state, control, model=..., processing_class=..., optimizer=..., lr_scheduler=..., ...)``,
  where ``args`` is the :class:`~hfpg.PGConfig`, ``state`` a ``transformers.TrainerState`` and ``control`` a
  ``transformers.TrainerControl`` whose ``should_training_stop`` / ``should_log`` / ``should_evaluate`` /
  ``should_save`` the loop honours after ``on_step_end``.
"""

from __future__ import annotations

from transformers import TrainerCallback as HFTrainerCallback
from transformers import TrainerControl, TrainerState


class TrainerCallback:
    """Every hook receives the trainer; set ``trainer.should_stop = True`` to end training after this step."""

    def on_train_begin(self, trainer) -> None: ...

    def on_step_end(self, trainer, step: int, metrics: dict[str, float]) -> None: ...

    def on_log(self, trainer, step: int, logs: dict[str, float]) -> None: ...

    def on_evaluate(self, trainer, step: int, metrics: dict[str, float]) -> None: ...

    def on_save(self, trainer, step: int, checkpoint_dir: str) -> None: ...

    def on_train_end(self, trainer) -> None: ...


EVENTS = (
    "on_init_end",
    "on_train_begin",
    "on_step_begin",
    "on_step_end",
    "on_log",
    "on_evaluate",
    "on_save",
    "on_train_end",
)
# what an hfpg callback's hook takes after (trainer, step): the event's keyword arguments, in order; events missing
# here (on_init_end, on_step_begin) are not hfpg hooks and are skipped for hfpg callbacks
_HFPG_HOOKS: dict[str, tuple[str, ...] | None] = {
    "on_train_begin": None,  # None: (trainer) only
    "on_step_end": ("metrics",),
    "on_log": ("logs",),
    "on_evaluate": ("metrics",),
    "on_save": ("checkpoint_dir",),
    "on_train_end": None,
}
# the keyword arguments a transformers callback gets beside (args, state, control) and the common ones; each is a copy
_HF_KWARGS: dict[str, tuple[str, ...]] = {"on_log": ("logs",), "on_evaluate": ("metrics",)}


def trainer_state(config, accelerator) -> TrainerState:
    """A fresh ``transformers.TrainerState`` for a PGTrainer run: steps from ``config``, process ranks from
    ``accelerator``, ``global_step`` 0 and an empty ``log_history``."""
    state = TrainerState(
        global_step=0,
        train_batch_size=config.rollout_batch_size,
        is_local_process_zero=accelerator.is_local_main_process,
        is_world_process_zero=accelerator.is_main_process,
        log_history=[],
    )
    sync_state(state, config)
    return state


def sync_state(state: TrainerState, config) -> None:
    """Copy the step counts of ``config`` (which may have been edited since the trainer was built) into ``state``."""
    state.max_steps = config.max_steps
    state.logging_steps = config.logging_steps
    state.eval_steps = config.eval_steps
    state.save_steps = config.save_steps
    state.train_batch_size = config.rollout_batch_size


class CallbackHandler:
    """Calls hfpg and ``transformers`` callbacks, in list order, at each event of the PGTrainer loop.

    ``callbacks`` may hold callback classes (instantiated with no arguments, as transformers does); anything that is
    neither kind is a TypeError. ``self.callbacks`` is the live list: ``trainer.callbacks.append(cb)`` works.
    ``fire`` returns the (possibly replaced) ``trainer.control``, which the trainer stores back.
    """

    def __init__(self, callbacks, trainer):
        self.trainer = trainer
        self.callbacks: list = []
        for cb in callbacks or []:
            self.add_callback(cb)

    def add_callback(self, callback) -> None:
        """Append ``callback`` (an instance, or a class to instantiate) after checking its kind."""
        cb = callback() if isinstance(callback, type) else callback
        _check(cb)
        self.callbacks.append(cb)

    def fire(self, event: str, **kwargs) -> TrainerControl:
        """Call ``event`` on every callback. kwargs: the event's data (``metrics=`` for on_step_end / on_evaluate,
        ``logs=`` for on_log, ``checkpoint_dir=`` for on_save). Control flags are reset as transformers'
        ``CallbackHandler`` resets them before the event; a transformers callback's non-None return replaces
        ``trainer.control``."""
        if event not in EVENTS:
            raise ValueError(f"unknown callback event {event!r}; one of {', '.join(EVENTS)}")
        trainer = self.trainer
        control = trainer.control
        _reset_flags(event, control)
        hf_common = None
        for cb in list(self.callbacks):
            _check(cb)
            if isinstance(cb, TrainerCallback):
                if event not in _HFPG_HOOKS:
                    continue
                names = _HFPG_HOOKS[event]
                hook = getattr(cb, event)
                if names is None:
                    hook(trainer)
                else:
                    hook(trainer, trainer.global_step, *(kwargs[n] for n in names))
                continue
            if hf_common is None:  # built once per event, only when a transformers callback is there
                hf_common = {
                    "model": trainer.unwrapped_model,
                    "processing_class": trainer.tokenizer,
                    "optimizer": trainer.optimizer,
                    "lr_scheduler": trainer.scheduler,
                    "train_dataloader": None,
                    "eval_dataloader": None,
                }
            extra = {n: dict(kwargs[n]) for n in _HF_KWARGS.get(event, ())}  # a copy: PrinterCallback pops keys
            result = getattr(cb, event)(trainer.config, trainer.state, control, **hf_common, **extra)
            if result is not None:  # transformers' rule: a callback may return a new control
                control = result
        trainer.control = control
        return control


def _reset_flags(event: str, control: TrainerControl) -> None:
    """What transformers' CallbackHandler does to the control before each event."""
    if event == "on_train_begin":
        control._new_training()
    elif event == "on_step_begin":
        control._new_step()
    elif event == "on_evaluate":
        control.should_evaluate = False
    elif event == "on_save":
        control.should_save = False
    elif event == "on_log":
        control.should_log = False


def _check(cb) -> None:
    if isinstance(cb, type):
        raise TypeError(
            f"callback {cb.__name__} is a class; pass an instance, or pass the class in PGTrainer(callbacks=[...])"
        )
    if not isinstance(cb, (TrainerCallback, HFTrainerCallback)):
        raise TypeError(
            f"callbacks must be hfpg.TrainerCallback or transformers.TrainerCallback instances (or classes), "
            f"not {cb!r} ({type(cb).__name__})"
        )
