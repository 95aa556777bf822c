"""What PGTrainer writes: the final model (adapter or full, value head, tokenizer, config, model card), pushes to the
Hub, and resumable checkpoints. A mixin of :class:`hfpg.trainer.PGTrainer`, kept apart so the loop stays readable."""

from __future__ import annotations

import json
import os
import re
import shutil

from accelerate.utils import broadcast_object_list

from . import cards, hub
from .distributed import full_weights
from .errors import ConfigError, HubError

TRAINER_STATE = "trainer_state.json"


class SavingMixin:
    """save_model / create_model_card / push_to_hub / save_checkpoint / load_checkpoint for PGTrainer."""

    def save_model(self, output_dir: str | None = None, merge: bool | None = None) -> str:
        """Write the policy (its adapter, or the full model), the value head, the tokenizer, the training config
        (``hfpg_config.yaml``) and a model card (``README.md``). Plain ``peft`` / ``transformers`` load the policy
        without hfpg; :meth:`AutoModelForCausalLMWithValueHead.from_pretrained` loads it with its value head.

        merge: write the adapter merged into a full model (default: ``config.merge_adapter``).
        """
        output_dir = output_dir or self.config.output_dir
        merge = self.config.merge_adapter if merge is None else merge
        self.accelerator.wait_for_everyone()
        with full_weights(self.model, self.accelerator) as policy:  # ZeRO-3 / FSDP: every process gathers
            if self.accelerator.is_main_process:
                policy.save_pretrained(output_dir, merge=merge)
                self.tokenizer.save_pretrained(output_dir)
                self.config.to_yaml(os.path.join(output_dir, cards.CONFIG_FILE))
                self.create_model_card(output_dir, merged=merge)
        self.accelerator.wait_for_everyone()
        return output_dir

    def create_model_card(self, output_dir: str, merged: bool = False, repo_id: str | None = None) -> str:
        """Write ``output_dir/README.md``: YAML metadata (base_model, library_name, tags, datasets, rewards and
        weights, final metrics) from :attr:`model_card_data` and the log history, and a usage snippet."""
        meta = cards.trainer_card_metadata(self, merged)
        card = cards.render_model_card(meta, repo_id or self.config.hub_model_id, self.config.to_dict(), output_dir)
        path = os.path.join(output_dir, cards.CARD_FILE)
        card.save(path)
        return path

    def push_to_hub(
        self,
        repo_id: str | None = None,
        *,
        private: bool | None = None,
        token: str | None = None,
        commit_message: str | None = None,
        revision: str | None = None,
        merge: bool | None = None,
        output_dir: str | None = None,
        create_pr: bool = False,
    ) -> str | None:
        """Save the model (as :meth:`save_model`, into ``output_dir``, default ``<config.output_dir>/final``) and
        upload that folder to the Hub model repo ``repo_id`` (default ``config.hub_model_id``; created if needed).

        The token comes from ``token``, else ``HF_TOKEN`` / ``hf auth login``; it is never printed or logged. Returns
        the commit URL (None on processes other than the main one). Raises :class:`hfpg.HubError` with the cause
        and the fix when the Hub cannot be reached or refuses; the saved folder stays as it is.
        """
        cfg = self.config
        repo_id = repo_id or cfg.hub_model_id
        if not repo_id:
            raise ConfigError("push_to_hub needs a repo id: push_to_hub('your-name/model') or config.hub_model_id")
        private = cfg.hub_private_repo if private is None else private
        revision = revision or cfg.hub_revision
        folder = self.save_model(output_dir or os.path.join(cfg.output_dir, "final"), merge=merge)
        url, error = None, None
        if self.accelerator.is_main_process:
            try:
                url = hub.push_folder(
                    folder,
                    repo_id,
                    private=private,
                    token=token,
                    commit_message=commit_message or f"hfpg {cfg.algorithm}: step {self.global_step}",
                    revision=revision,
                    extra_files=hub.hub_files(folder, repo_id),
                    create_pr=create_pr,
                )
            except HubError as e:
                error = str(e)
        if self.accelerator.num_processes > 1:  # every process raises, or none does
            error = broadcast_object_list([error])[0]
        if error is not None:
            raise HubError(error)
        return url

    def save_checkpoint(self) -> str:
        """A resumable checkpoint: model, optimizer, scheduler, KL controller, score statistics, sampler, RNG, step."""
        path = os.path.join(self.config.output_dir, f"checkpoint-{self.global_step}")
        self.accelerator.save_state(path)
        if self.accelerator.is_main_process:
            with open(os.path.join(path, TRAINER_STATE), "w") as f:
                json.dump({"global_step": self.global_step, "config": self.config.to_dict()}, f, indent=2)
            self._rotate_checkpoints()
        self.accelerator.wait_for_everyone()
        self._callback("on_save", checkpoint_dir=path)
        return path

    def load_checkpoint(self, path: str | bool) -> None:
        if path is True:
            path = latest_checkpoint(self.config.output_dir)
            if path is None:
                raise FileNotFoundError(
                    f"resume_from_checkpoint=True but {self.config.output_dir} holds no "
                    f"checkpoint-N folder; train with save_steps>0 first or pass a path"
                )
        state_file = os.path.join(path, TRAINER_STATE)
        if not os.path.isfile(state_file):
            raise FileNotFoundError(
                f"{path} is not an hfpg checkpoint (no {TRAINER_STATE}); pass a checkpoint-N folder"
            )
        self.accelerator.load_state(path)
        with open(state_file) as f:
            self.global_step = int(json.load(f)["global_step"])

    def _rotate_checkpoints(self) -> None:
        limit = self.config.save_total_limit
        if not limit:
            return
        ckpts = sorted(_checkpoints(self.config.output_dir), key=lambda p: p[0])
        for _, path in ckpts[:-limit]:
            shutil.rmtree(path, ignore_errors=True)


def _checkpoints(output_dir: str) -> list[tuple[int, str]]:
    if not os.path.isdir(output_dir):
        return []
    out = []
    for name in os.listdir(output_dir):
        m = re.fullmatch(r"checkpoint-(\d+)", name)
        if m and os.path.isfile(os.path.join(output_dir, name, TRAINER_STATE)):
            out.append((int(m.group(1)), os.path.join(output_dir, name)))
    return out


def latest_checkpoint(output_dir: str) -> str | None:
    """The newest complete ``checkpoint-N`` folder in ``output_dir`` (None if there is none)."""
    ckpts = _checkpoints(output_dir)
    return max(ckpts)[1] if ckpts else None
