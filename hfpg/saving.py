"""What PGTrainer writes: the final model (adapter or full, value head, tokenizer, config, model card), pushes to the
Hub, and resumable checkpoints. A mixin of :class:`hfpg.trainer.PGTrainer`, kept apart so the loop stays readable."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import shutil

import numpy as np
import safetensors.torch
import torch
from accelerate.utils import DistributedType, broadcast_object_list

from . import cards, hub
from .distributed import full_weights
from .errors import CheckpointError, ConfigError, DataError, HubError
from .guards import check_finite
from .value_model import VALUE_MODEL_DIR

TRAINER_STATE = "trainer_state.json"


class SavingMixin:
    """save_model / create_model_card / push_to_hub / save_checkpoint / load_checkpoint for PGTrainer."""

    def save_model(self, output_dir: str | None = None, merge: bool | None = None) -> str:
        """Write the policy (its adapter, or the full model), the value head, the tokenizer, the training config
        (``hfpg_config.yaml``) and a model card (``README.md``). Plain ``peft`` / ``transformers`` load the policy
        without hfpg; :meth:`AutoModelForCausalLMWithValueHead.from_pretrained` loads it with its value head.

        No file of the folder names a local path (see :mod:`hfpg.cards`): a local base model is named by its Hub id
        (``model_card_data["base_model"]``) when known, else by its path relative to the working directory when it
        lies inside it, else by its folder name; ``output_dir`` and reward files likewise.

        merge: write the adapter merged into a full model (default: ``config.merge_adapter``).
        """
        output_dir = output_dir or self.config.output_dir
        merge = self.config.merge_adapter if merge is None else merge
        self.accelerator.wait_for_everyone()
        with full_weights(self.model, self.accelerator) as policy:  # ZeRO-3 / FSDP: every process gathers
            if self.accelerator.is_main_process:
                critic = getattr(self, "critic", None)
                # with a separate value_model the policy's value head is unused: not saved
                policy.save_pretrained(output_dir, merge=merge, save_value_head=critic is None)
                self.tokenizer.save_pretrained(output_dir)
                if critic is not None:  # value_model/: a plain AutoModelForSequenceClassification + the tokenizer
                    critic_dir = os.path.join(output_dir, VALUE_MODEL_DIR)
                    self.accelerator.unwrap_model(critic.model).save_pretrained(critic_dir)
                    self.tokenizer.save_pretrained(critic_dir)
                with open(os.path.join(output_dir, cards.CONFIG_FILE), "w", encoding="utf-8") as f:
                    f.write(cards.config_yaml(self.config.to_dict()))
                cards.make_portable(output_dir, self.model_card_data.get("base_model"))
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

    # ---- checkpoints -----------------------------------------------------------------------------------------------
    def save_checkpoint(self) -> str:
        """Write the resumable checkpoint ``output_dir/checkpoint-<step>``: model, optimizer, scheduler, KL controller,
        score and reward statistics, sampler, update rule, replay buffer, every process's RNG, the step.

        Atomic: everything goes into ``.checkpoint-<step>.tmp`` (each process writes its own state), then the main
        process writes ``trainer_state.json`` with the manifest of every file, last, and renames the folder; a crash
        leaves a complete ``checkpoint-<step>`` or a ``.tmp`` folder nothing reads. No pickle: JSON and safetensors
        (a DeepSpeed / FSDP engine writes its own weight and optimizer files). The layout is in this module's
        ``CHECKPOINT_FILES``."""
        acc = self.accelerator
        rng = _rng_state()  # first, before anything here could draw a random number
        check_finite(acc.unwrap_model(self.model), f"checkpoint-{self.global_step}")  # never save NaN weights
        if getattr(self, "critic", None) is not None:
            check_finite(acc.unwrap_model(self.critic.model), f"checkpoint-{self.global_step} (value_model)")
        final = os.path.join(self.config.output_dir, f"checkpoint-{self.global_step}")
        tmp = _sibling(final, "tmp")
        engine = _weights_format(acc)
        acc.wait_for_everyone()
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)  # a half-written save of this step by a run that crashed
            os.makedirs(tmp)
        acc.wait_for_everyone()
        if engine == ENGINE_WEIGHTS:  # DeepSpeed / FSDP: the engine's files, then drop Accelerate's RNG pickle
            acc.save_state(tmp)
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(tmp, f"random_states_{acc.process_index}.pkl"))
        elif acc.is_main_process:  # one copy of the (DDP-replicated) weights and optimizer
            safetensors.torch.save_model(
                acc.unwrap_model(self.model), os.path.join(tmp, MODEL_FILE), {"format": "pt"}, force_contiguous=True
            )
            _fsync(os.path.join(tmp, MODEL_FILE))
            encoder = _Encoder()
            encoder.write(
                encoder.encode(self.optimizer.state_dict(), "optimizer"), tmp, OPTIMIZER_JSON, OPTIMIZER_TENSORS
            )
            critic = getattr(self, "critic", None)
            if critic is not None:  # the separate value_model and its optimizer
                critic_file = os.path.join(tmp, CRITIC_FILE)
                safetensors.torch.save_model(
                    acc.unwrap_model(critic.model), critic_file, {"format": "pt"}, force_contiguous=True
                )
                encoder = _Encoder()
                encoder.write(
                    encoder.encode(critic.optimizer.state_dict(), "critic_optimizer"),
                    tmp,
                    CRITIC_OPTIMIZER_JSON,
                    CRITIC_OPTIMIZER_TENSORS,
                )
        self._save_process_state(tmp, rng)
        acc.wait_for_everyone()
        error = None
        if acc.is_main_process:
            try:
                self._finish_checkpoint(tmp, final, engine)
            except Exception as e:
                if acc.num_processes == 1:
                    raise
                error = f"{type(e).__name__}: {e}"  # the other processes wait for the outcome
        if acc.num_processes > 1:  # every process raises, or none does
            error = broadcast_object_list([error])[0]
        if error is not None:
            raise CheckpointError(error)
        self._callback("on_save", checkpoint_dir=final)
        return final

    def load_checkpoint(self, path: str | bool) -> None:
        """Restore what :meth:`save_checkpoint` wrote; ``path``: a ``checkpoint-N`` folder, or True for the newest in
        ``output_dir``. Every process loads its own state. A checkpoint that is incomplete, corrupt (a file of its
        manifest missing or changed), lacks a piece of the state, or was made by another setup (number of processes,
        replay buffer, stateful reward, mixed precision, engine) raises :class:`~hfpg.errors.CheckpointError` naming
        the file; all of these are checked before anything is loaded."""
        acc, rank = self.accelerator, self.accelerator.process_index
        if path is True:
            path = _newest_checkpoint(self.config.output_dir)
        else:
            path = os.path.normpath(os.fspath(path))
            if not os.path.isfile(os.path.join(path, TRAINER_STATE)):
                raise FileNotFoundError(
                    f"{path} is not an hfpg checkpoint (no {TRAINER_STATE}); pass a checkpoint-N folder"
                )
        try:
            meta = _verify(path, hashes=True)
        except CheckpointError as e:
            raise _corrupt(path, e) from None
        if meta.get("num_processes") != acc.num_processes:
            raise CheckpointError(
                f"{path} was written by {meta.get('num_processes')} processes, this run has {acc.num_processes}: each "
                f"process resumes its own sampler position, replay buffer and RNG, so resume with "
                f"{meta.get('num_processes')} processes"
            )
        engine = _weights_format(acc)
        if meta.get("weights") != engine:
            raise CheckpointError(
                f"{path} holds its weights as {meta.get('weights')!r}, this run's engine writes {engine!r} "
                f"({acc.distributed_type}); resume with the launch configuration the checkpoint was made with"
            )
        # read and check everything before the first object changes
        state_file = os.path.join(path, STATE_JSON.format(rank=rank))
        state, tensors = _read_encoded(path, STATE_JSON.format(rank=rank), STATE_TENSORS.format(rank=rank))
        if (state.get("process_index"), state.get("num_processes")) != (rank, acc.num_processes):
            raise CheckpointError(
                f"{state_file} is the state of process {state.get('process_index')} of {state.get('num_processes')}, "
                f"not of process {rank} of {acc.num_processes}"
            )
        if state.get("global_step") != meta["global_step"]:
            raise CheckpointError(
                f"{state_file} is from step {state.get('global_step')}, {path}/{TRAINER_STATE} from step "
                f"{meta['global_step']}: the folder mixes two checkpoints"
            )
        objects = self._checkpoint_objects()
        saved = _require(state, "objects", state_file)
        if not isinstance(saved, dict):
            raise CheckpointError(f"{state_file}: the 'objects' entry is not a mapping")
        for name in objects:
            if name not in saved:
                raise CheckpointError(
                    f"{state_file} holds no {name} state ({_WHAT[name]}): {path} cannot resume this run exactly"
                )
        for name in saved:
            if name not in objects:
                raise CheckpointError(
                    f"{state_file} holds {name} state ({_WHAT.get(name, name)}) that this run does not have: it was "
                    f"made with another configuration; resume with the one it was made with"
                )
        decoded = {name: _decode(saved[name], tensors, state_file) for name in objects}
        rng = _decode(_require(state, "rng", state_file), tensors, state_file)
        _check_rng(rng, state_file)
        scaler_state = None
        if acc.scaler is not None:
            scaler_state = _decode(_require(state, "scaler", state_file), tensors, state_file)
        elif state.get("scaler") is not None:
            raise CheckpointError(
                f"{state_file} holds a gradient scaler's state (mixed_precision fp16) but this run has none; resume "
                f"with the mixed_precision the checkpoint was made with"
            )
        # the weights and the optimizer
        if engine == ENGINE_WEIGHTS:
            for name in sorted(os.listdir(path)):
                if re.fullmatch(r"(custom_checkpoint|random_states)_\d+\.pkl", name):
                    raise CheckpointError(
                        f"{os.path.join(path, name)} is a pickle that hfpg did not write and will not load; delete it"
                    )
            acc.load_state(path)
        else:
            optimizer_state = _decode(*_read_encoded(path, OPTIMIZER_JSON, OPTIMIZER_TENSORS), OPTIMIZER_JSON)
            model_file = os.path.join(path, MODEL_FILE)
            try:
                safetensors.torch.load_model(acc.unwrap_model(self.model), model_file, strict=True)
            except Exception as e:  # a missing / unexpected / misshapen weight, or an unreadable file
                raise CheckpointError(f"{model_file} does not fit this model: {e}") from e
            try:
                self.optimizer.load_state_dict(optimizer_state)
            except Exception as e:
                raise CheckpointError(f"{path}/{OPTIMIZER_JSON} does not fit this optimizer: {e}") from e
            self._load_critic(path)
        for name, obj in objects.items():
            try:
                obj.load_state_dict(decoded[name])
            except (CheckpointError, DataError):
                raise
            except Exception as e:
                raise CheckpointError(f"the {name} state in {state_file} does not fit this run: {e!r}") from e
        if scaler_state is not None:
            acc.scaler.load_state_dict(scaler_state)
        _set_rng_state(rng, state_file)  # last: nothing above may draw from a restored generator
        self.global_step = int(meta["global_step"])

    def _load_critic(self, path: str) -> None:
        """The separate value_model's weights and optimizer state (plain-weights checkpoints)."""
        critic = getattr(self, "critic", None)
        critic_file = os.path.join(path, CRITIC_FILE)
        if critic is None:
            if os.path.isfile(critic_file):
                raise CheckpointError(
                    f"{critic_file} holds a separate value model but this run has none (value_model is null); resume "
                    f"with the value_model the checkpoint was made with"
                )
            return
        if not os.path.isfile(critic_file):
            raise CheckpointError(
                f"{path} holds no {CRITIC_FILE} but this run trains a separate value_model; resume with the "
                f"configuration the checkpoint was made with"
            )
        critic_state = _decode(*_read_encoded(path, CRITIC_OPTIMIZER_JSON, CRITIC_OPTIMIZER_TENSORS), path)
        try:
            safetensors.torch.load_model(self.accelerator.unwrap_model(critic.model), critic_file, strict=True)
            critic.optimizer.load_state_dict(critic_state)
        except Exception as e:
            raise CheckpointError(f"{critic_file} (or its optimizer) does not fit this value model: {e}") from e

    def _checkpoint_objects(self) -> dict:
        """Every piece of run state a checkpoint holds beside the weights, optimizer and RNG, by name."""
        objects = {
            "scheduler": self.scheduler,
            "kl_controller": self.kl_ctl,
            "score_shaper": self.score_shaper,
            "sampler": self.sampler,
            "update_rule": self.algorithm,
        }
        if self.replay is not None:
            objects["replay_buffer"] = self.replay
        if getattr(self, "critic", None) is not None:
            objects["value_scheduler"] = self.critic.scheduler
        if callable(getattr(self.reward_fn, "state_dict", None)) and callable(
            getattr(self.reward_fn, "load_state_dict", None)
        ):
            objects["reward"] = self.reward_fn
        return objects

    def _save_process_state(self, folder: str, rng: dict) -> None:
        """This process's ``hfpg_state_<rank>.json`` + ``.safetensors``: RNG, run-state objects, gradient scaler."""
        acc = self.accelerator
        encoder = _Encoder()
        state = {
            "checkpoint_format": CHECKPOINT_FORMAT,
            "process_index": acc.process_index,
            "num_processes": acc.num_processes,
            "global_step": self.global_step,
            "rng": encoder.encode(rng, "rng"),
            "objects": {
                name: encoder.encode(_state_of(name, obj), name) for name, obj in self._checkpoint_objects().items()
            },
        }
        if acc.scaler is not None:
            state["scaler"] = encoder.encode(acc.scaler.state_dict(), "scaler")
        rank = acc.process_index
        encoder.write(state, folder, STATE_JSON.format(rank=rank), STATE_TENSORS.format(rank=rank))

    def _finish_checkpoint(self, tmp: str, final: str, engine: str) -> None:
        """Main process, once every process has written: the manifest in trainer_state.json, the rename, rotation."""
        n = self.accelerator.num_processes
        required = [name.format(rank=r) for r in range(n) for name in (STATE_JSON, STATE_TENSORS)]
        if engine == PLAIN_WEIGHTS:
            required += [MODEL_FILE, OPTIMIZER_JSON, OPTIMIZER_TENSORS]
            if getattr(self, "critic", None) is not None:
                required += [CRITIC_FILE, CRITIC_OPTIMIZER_JSON, CRITIC_OPTIMIZER_TENSORS]
        missing = [name for name in required if not os.path.isfile(os.path.join(tmp, name))]
        if missing:
            raise CheckpointError(f"{tmp}: {', '.join(missing)} not written; the checkpoint was not completed")
        state = {
            "global_step": self.global_step,
            "checkpoint_format": CHECKPOINT_FORMAT,
            "num_processes": n,
            "weights": engine,
            "files": _manifest(tmp),
            "config": self.config.to_dict(),
        }
        _write_json(os.path.join(tmp, TRAINER_STATE), state, indent=2)
        _fsync_dir(tmp)
        old = None
        if os.path.exists(final):  # this step was saved before (a resumed run): swap the new one in
            old = _sibling(final, "deleting")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync_dir(os.path.dirname(final) or ".")
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        self._rotate_checkpoints(final)

    def _rotate_checkpoints(self, just_written: str | None = None) -> None:
        """Keep the newest ``save_total_limit`` complete checkpoints and ``just_written``; delete only complete ones
        older than ``just_written`` (never one of a newer step, an incomplete one, or another run's ``.tmp``)."""
        out = self.config.output_dir
        for name in os.listdir(out):  # folders whose deletion was interrupted
            if re.fullmatch(r"\.checkpoint-\d+\.deleting", name):
                shutil.rmtree(os.path.join(out, name), ignore_errors=True)
        limit = self.config.save_total_limit
        if not limit:
            return
        complete = sorted((step, p) for step, p in _checkpoint_dirs(out) if _is_complete(p))
        if not complete:
            return
        newest = just_written or complete[-1][1]
        step_written = _step_of(newest)
        keep = {p for _, p in complete[-limit:]} | {newest}
        for step, p in complete:
            if step < step_written and p not in keep:
                trash = _sibling(p, "deleting")  # out of the checkpoint-N namespace at once, then deleted
                shutil.rmtree(trash, ignore_errors=True)
                os.replace(p, trash)
                shutil.rmtree(trash, ignore_errors=True)


# ---- the checkpoint format ---------------------------------------------------------------------------------------
CHECKPOINT_FORMAT = 2  # 1: hfpg 0.1.0, Accelerate's pickles (custom_checkpoint_*.pkl, random_states_*.pkl)
MODEL_FILE = "model.safetensors"
OPTIMIZER_JSON = "optimizer.json"
OPTIMIZER_TENSORS = "optimizer.safetensors"
CRITIC_FILE = "value_model.safetensors"
CRITIC_OPTIMIZER_JSON = "value_model_optimizer.json"
CRITIC_OPTIMIZER_TENSORS = "value_model_optimizer.safetensors"
STATE_JSON = "hfpg_state_{rank}.json"
STATE_TENSORS = "hfpg_state_{rank}.safetensors"
PLAIN_WEIGHTS = "safetensors"  # one process, DDP, ZeRO-free: hfpg writes MODEL_FILE and OPTIMIZER_*
ENGINE_WEIGHTS = "engine"  # DeepSpeed / FSDP: Accelerate's save_state writes the engine's own files
CHECKPOINT_FILES = {
    TRAINER_STATE: "written last, by the main process: step, config, number of processes, the manifest (every other "
    "file's size, and sha256 up to 16 MiB); its presence in checkpoint-N marks a complete checkpoint",
    MODEL_FILE: "the policy with its value head (every weight; main process)",
    OPTIMIZER_JSON: "the optimizer's state_dict as JSON: param groups, scalars, references into optimizer.safetensors",
    OPTIMIZER_TENSORS: "the optimizer's tensors (Adam moments, step counts)",
    CRITIC_FILE: "value_model only: the separate critic's weights (a LoRA critic: its adapter and head)",
    CRITIC_OPTIMIZER_JSON: "value_model only: the critic optimizer's state_dict, as OPTIMIZER_JSON",
    CRITIC_OPTIMIZER_TENSORS: "value_model only: the critic optimizer's tensors",
    STATE_JSON: "one per process: RNG (python, numpy; torch / CUDA in the .safetensors), scheduler, KL controller, "
    "score shaper, sampler position, update rule, replay buffer, stateful reward, fp16 gradient scaler",
    STATE_TENSORS: "one per process: the tensors STATE_JSON refers to (RNG states, replay buffer)",
}
_WHAT = {
    "scheduler": "learning-rate schedule",
    "kl_controller": "KL coefficient",
    "score_shaper": "running score statistics",
    "sampler": "prompt sampler position",
    "update_rule": "update rule: moving-average baseline, value optimizer",
    "replay_buffer": "replay buffer",
    "value_scheduler": "the value model's learning-rate schedule",
    "reward": "reward statistics",
}
_HASH_LIMIT = 16 * 2**20
_TENSOR, _TUPLE, _ITEMS = "__hfpg_tensor__", "__hfpg_tuple__", "__hfpg_items__"


class _Encoder:
    """Plain data for JSON: tensors go to :attr:`tensors` (``{"__hfpg_tensor__": key}`` in their place), tuples and
    dicts with non-string keys are tagged so they come back as they were. Anything else is a CheckpointError."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self._storages: set[int] = set()

    def encode(self, obj, path: str):
        if obj is None or isinstance(obj, (bool, int, float, str)):
            return obj
        if isinstance(obj, torch.Tensor):
            t = obj.detach().to("cpu").contiguous()
            ptr = t.untyped_storage().data_ptr()
            if ptr in self._storages or t.untyped_storage().nbytes() != t.numel() * t.element_size():
                t = t.clone()  # safetensors refuses tensors that share memory
            self._storages.add(t.untyped_storage().data_ptr())
            key = path if path not in self.tensors else f"{path}#{len(self.tensors)}"
            self.tensors[key] = t
            return {_TENSOR: key}
        if isinstance(obj, tuple):
            return {_TUPLE: [self.encode(v, f"{path}.{i}") for i, v in enumerate(obj)]}
        if isinstance(obj, list):
            return [self.encode(v, f"{path}.{i}") for i, v in enumerate(obj)]
        if isinstance(obj, dict):
            if all(isinstance(k, str) for k in obj) and not {_TENSOR, _TUPLE, _ITEMS} & obj.keys():
                return {k: self.encode(v, f"{path}.{k}") for k, v in obj.items()}
            return {_ITEMS: [[self.encode(k, path), self.encode(v, f"{path}.{k}")] for k, v in obj.items()]}
        raise CheckpointError(
            f"cannot checkpoint {path}: it is a {type(obj).__name__}; a state_dict may hold plain data (dict, list, "
            f"tuple, str, int, float, bool, None) and tensors only"
        )

    def write(self, state, folder: str, json_name: str, tensors_name: str) -> None:
        path = os.path.join(folder, tensors_name)
        safetensors.torch.save_file(self.tensors, path, metadata={"format": "pt"})
        _fsync(path)
        _write_json(os.path.join(folder, json_name), state)


def _decode(obj, tensors: dict, where: str):
    if isinstance(obj, list):
        return [_decode(v, tensors, where) for v in obj]
    if isinstance(obj, dict):
        if len(obj) == 1:
            if _TENSOR in obj:
                key = obj[_TENSOR]
                if key not in tensors:
                    raise CheckpointError(f"{where} refers to the tensor {key!r}, which its .safetensors file lacks")
                return tensors[key]
            if _TUPLE in obj:
                return tuple(_decode(v, tensors, where) for v in obj[_TUPLE])
            if _ITEMS in obj:
                return {_decode(k, tensors, where): _decode(v, tensors, where) for k, v in obj[_ITEMS]}
        return {k: _decode(v, tensors, where) for k, v in obj.items()}
    return obj


def _read_encoded(folder: str, json_name: str, tensors_name: str) -> tuple[dict, dict]:
    """(JSON data, tensors) of one encoded pair of files; json and safetensors only, never pickle."""
    json_path, tensors_path = os.path.join(folder, json_name), os.path.join(folder, tensors_name)
    for f in (json_path, tensors_path):
        if not os.path.isfile(f):
            raise CheckpointError(
                f"{f} is missing: {folder} lacks a piece of the run's state and cannot resume it exactly; resume "
                f"from another checkpoint"
            )
    try:
        with open(json_path) as fh:
            data = json.load(fh)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{json_path} is unreadable ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{json_path} does not hold a JSON object")
    try:
        tensors = safetensors.torch.load_file(tensors_path)
    except Exception as e:  # SafetensorError, OSError
        raise CheckpointError(f"{tensors_path} is unreadable ({e})") from None
    return data, tensors


def _require(state: dict, key: str, where: str):
    if key not in state:
        raise CheckpointError(f"{where} holds no {key!r} entry: the checkpoint cannot resume the run exactly")
    return state[key]


def _state_of(name: str, obj) -> dict:
    state = obj.state_dict()
    if name == "scheduler" and isinstance(state.get("lr_lambdas"), list):
        # LambdaLR keeps each lambda's __dict__ (None for a plain function); its code and closures are rebuilt by the
        # constructor, so only the plain-data attributes are state
        state = dict(state)
        state["lr_lambdas"] = [
            None if fn is None else {k: v for k, v in fn.items() if _is_plain(v)} for fn in state["lr_lambdas"]
        ]
    return state


def _is_plain(obj) -> bool:
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return True
    if isinstance(obj, (list, tuple)):
        return all(_is_plain(v) for v in obj)
    if isinstance(obj, dict):
        return all(isinstance(k, str) and _is_plain(v) for k, v in obj.items())
    return False


# ---- random number generators ------------------------------------------------------------------------------------
def _rng_state() -> dict:
    """This process's generators: python, numpy (legacy global), torch CPU and every CUDA device."""
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state = {
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": [int(k) for k in keys],
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _check_rng(rng, where: str) -> None:
    if not isinstance(rng, dict):
        raise CheckpointError(f"{where}: the 'rng' entry is not a mapping")
    for key in ("python", "numpy", "torch"):
        if key not in rng:
            raise CheckpointError(f"{where} holds no {key} random state: the checkpoint cannot resume the run exactly")
    try:  # on throwaway generators: a state that does not load fails here, before anything is restored
        random.Random().setstate(rng["python"])
        n = rng["numpy"]
        np.random.RandomState().set_state(
            (n["kind"], np.asarray(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
        )
        torch.Generator().set_state(rng["torch"])
    except (TypeError, ValueError, KeyError, RuntimeError) as e:
        raise CheckpointError(f"{where}: a random state does not load ({e!r})") from None
    cuda = rng.get("cuda")
    if torch.cuda.is_available():
        if cuda is None:
            raise CheckpointError(
                f"{where} holds no CUDA random state (it was written without CUDA) and this process has CUDA; resume "
                f"on the kind of machine the checkpoint was made on"
            )
        if len(cuda) != torch.cuda.device_count():
            raise CheckpointError(
                f"{where} holds the CUDA random state of {len(cuda)} devices, this process sees "
                f"{torch.cuda.device_count()}; resume with the same devices visible"
            )
    elif cuda:
        raise CheckpointError(
            f"{where} holds the CUDA random state of {len(cuda)} devices but CUDA is not available here; resume on "
            f"the kind of machine the checkpoint was made on"
        )


def _set_rng_state(rng: dict, where: str) -> None:
    try:
        random.setstate(rng["python"])
        n = rng["numpy"]
        np.random.set_state(
            (n["kind"], np.asarray(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
        )
        torch.set_rng_state(rng["torch"])
        if rng.get("cuda") is not None:
            torch.cuda.set_rng_state_all(rng["cuda"])
    except (TypeError, ValueError, KeyError, RuntimeError) as e:
        raise CheckpointError(f"{where}: a random state does not load ({e!r})") from e


# ---- files -------------------------------------------------------------------------------------------------------
def _weights_format(accelerator) -> str:
    sharded = (DistributedType.DEEPSPEED, DistributedType.FSDP, DistributedType.MEGATRON_LM)
    return ENGINE_WEIGHTS if accelerator.distributed_type in sharded else PLAIN_WEIGHTS


def _sibling(checkpoint: str, suffix: str) -> str:
    """``.checkpoint-N.<suffix>`` next to ``checkpoint-N``: outside the names that are ever read as checkpoints."""
    head, name = os.path.split(os.path.normpath(checkpoint))
    return os.path.join(head, f".{name}.{suffix}")


def _write_json(path: str, obj, indent: int | None = None) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=indent)
        f.flush()
        os.fsync(f.fileno())


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: str) -> None:
    with contextlib.suppress(OSError):  # a filesystem / platform that cannot sync a directory
        _fsync(path)


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _manifest(folder: str) -> dict[str, dict]:
    """Every file under ``folder`` but trainer_state.json, synced to disk: relative name -> size (and sha256 up to
    16 MiB)."""
    files = {}
    for root, dirs, names in os.walk(folder):
        dirs.sort()
        for name in sorted(names):
            full = os.path.join(root, name)
            rel = os.path.relpath(full, folder).replace(os.sep, "/")
            if rel == TRAINER_STATE:
                continue
            _fsync(full)  # an engine's files too: on disk before trainer_state.json says they are
            size = os.path.getsize(full)
            files[rel] = {"size": size, **({"sha256": _sha256(full)} if size <= _HASH_LIMIT else {})}
    return files


def _verify(path: str, hashes: bool = False) -> dict:
    """trainer_state.json of a complete checkpoint (every file of its manifest there, at its size, and with
    ``hashes`` its sha256), else a CheckpointError naming the file."""
    state_file = os.path.join(path, TRAINER_STATE)
    try:
        with open(state_file) as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{state_file} is missing: {path} was never completed") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{state_file} is unreadable or truncated ({e})") from None
    if not isinstance(meta, dict) or "global_step" not in meta:
        raise CheckpointError(f"{state_file} is not an hfpg trainer state (no global_step)")
    if "checkpoint_format" not in meta or "files" not in meta:
        raise CheckpointError(
            f"{state_file} has no file manifest: {path} was written by hfpg 0.1.0, whose checkpoints are pickles "
            f"(Accelerate's custom_checkpoint_*.pkl / random_states_*.pkl) that hfpg no longer loads; resume with the "
            f"hfpg version that wrote it, or start a new run"
        )
    if meta["checkpoint_format"] != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{state_file} is checkpoint format {meta['checkpoint_format']}, this hfpg reads format {CHECKPOINT_FORMAT}"
        )
    try:
        for rel, info in meta["files"].items():
            full = os.path.join(path, *rel.split("/"))
            try:
                size = os.path.getsize(full)
            except OSError:
                raise CheckpointError(f"{full} is missing ({state_file} lists it)") from None
            if size != info["size"]:
                raise CheckpointError(
                    f"{full} has {size} bytes, {state_file} recorded {info['size']}: it is truncated or was changed"
                )
            if hashes and info.get("sha256") and _sha256(full) != info["sha256"]:
                raise CheckpointError(f"{full} does not match the sha256 {state_file} recorded: it was changed")
    except (AttributeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{state_file} holds a malformed file manifest ({e!r})") from None
    return meta


def _is_complete(path: str) -> bool:
    try:
        _verify(path)
    except CheckpointError:
        return False
    return True


def _step_of(path: str) -> int:
    m = re.fullmatch(r"checkpoint-(\d+)", os.path.basename(os.path.normpath(path)))
    return int(m.group(1)) if m else -1


def _checkpoint_dirs(output_dir: str) -> list[tuple[int, str]]:
    """Every ``checkpoint-N`` folder of ``output_dir`` (complete or not), as (N, path); never a ``.tmp`` folder."""
    if not os.path.isdir(output_dir):
        return []
    out = []
    for name in os.listdir(output_dir):
        m = re.fullmatch(r"checkpoint-(\d+)", name)
        if m and os.path.isdir(os.path.join(output_dir, name)):
            out.append((int(m.group(1)), os.path.join(output_dir, name)))
    return sorted(out)


def _corrupt(path: str, error: CheckpointError) -> CheckpointError:
    """``error`` with what to do: the previous complete checkpoint in the same folder, if any."""
    step = _step_of(path)
    older = [p for n, p in _checkpoint_dirs(os.path.dirname(path) or ".") if n < step and _is_complete(p)]
    if older:
        good = older[-1]
        hint = (
            f"the previous complete checkpoint is {good}: delete {path} to resume from it with "
            f"resume_from_checkpoint=True, or pass resume_from_checkpoint={good!r}"
        )
    else:
        hint = f"there is no complete checkpoint before it; delete {path} and start again"
    return CheckpointError(f"{path} is incomplete or corrupt: {error}. {hint}")


def _newest_checkpoint(output_dir: str) -> str:
    """The newest ``checkpoint-N`` of ``output_dir``, complete or not, for ``resume_from_checkpoint=True`` (the caller
    verifies it: a corrupt newest checkpoint is an error, never silently an older one); FileNotFoundError if none."""
    ckpts = _checkpoint_dirs(output_dir)
    if not ckpts:
        raise FileNotFoundError(
            f"resume_from_checkpoint=True but {output_dir} holds no "
            f"checkpoint-N folder; train with save_steps>0 first or pass a path"
        )
    return ckpts[-1][1]


def latest_checkpoint(output_dir: str) -> str | None:
    """The newest complete ``checkpoint-N`` folder in ``output_dir`` (None if there is none); ``.tmp`` folders of
    unfinished saves and checkpoints with a missing, truncated or changed file are passed over."""
    for _, path in reversed(_checkpoint_dirs(output_dir)):
        if _is_complete(path):
            return path
    return None
