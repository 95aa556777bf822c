"""Prompt datasets: loading from any ``datasets`` source, validation up front, and a resumable sampler that shards
each global batch over processes."""

from __future__ import annotations

import os
import sys
from typing import Any

import torch

from .chat import check_chat_template, prompt_kind, render
from .errors import ConfigError, DataError
from .sources import relative_to

__all__ = [
    "DataError",
    "PromptSampler",
    "Rows",
    "StreamSampler",
    "as_dataset",
    "check_prompt_format",
    "check_prompts",
    "is_stream",
    "load_splits",
    "make_sampler",
]

# a local file named as a dataset path (`path: prompts.jsonl`) is read by the load_dataset builder of its type
FILE_BUILDERS = {"jsonl": "json", "json": "json", "csv": "csv", "parquet": "parquet", "txt": "text"}


def load_splits(
    path: str,
    *,
    split: str = "train",
    eval_split: str | None = None,
    eval_size: float = 0,
    seed: int = 0,
    base_dir: str | None = None,
    data_files=None,
    **kwargs,
):
    """(train, eval or None) as ``datasets.Dataset`` from any ``datasets.load_dataset`` source: a Hub id, a builder
    (``json``, ``csv``, ...) with ``data_files``, or a local file as ``path``. Relative files are found from the working
    directory, then in ``base_dir`` (the YAML file's folder). Held-out rows come from ``eval_split``, else
    ``eval_size`` rows (an int) or a fraction (a float) held out of train. ``kwargs`` go to ``load_dataset``."""
    import datasets  # pyarrow and pandas: loaded only when a dataset is

    builder = FILE_BUILDERS.get(os.path.splitext(path)[1].lstrip("."))
    local_file = relative_to(path, base_dir)
    if data_files is not None:
        kwargs["data_files"] = relative_to(data_files, base_dir)
    elif builder and os.path.isfile(local_file):
        path, kwargs["data_files"] = builder, local_file
    for file in _local_files(kwargs.get("data_files")):
        with open(file, "rb") as f:
            empty = not f.read(1 << 16).strip()
        if empty and os.path.getsize(file) < 1 << 16:
            raise DataError(
                f"data: the data file {file} is empty; it needs at least one row (for .jsonl: one JSON object per "
                f'line, e.g. {{"prompt": "..."}})'
            )
    try:
        train = datasets.load_dataset(path, split=split, **kwargs)
        evals = datasets.load_dataset(path, split=eval_split, **kwargs) if eval_split else None
    except (FileNotFoundError, ValueError) as e:  # a missing file, an unknown split, bad builder arguments
        raise DataError(f"data: {e}") from None
    if hasattr(train, "__len__") and len(train) == 0:
        raise DataError(f"data: split {split!r} of {path} has no rows; give a dataset with at least one prompt")
    if evals is None and eval_size:
        n = len(train)
        shown = f"{path} ({kwargs['data_files']})" if kwargs.get("data_files") else path
        whole = isinstance(eval_size, int) and not isinstance(eval_size, bool)
        if (whole and not 0 < eval_size < n) or (not whole and not 0 < eval_size < 1):
            raise DataError(
                f"data.eval_size={eval_size!r} must hold out part of the {n} rows of {shown}: a number of rows from 1 "
                f"to {n - 1}, or a fraction between 0 and 1 (e.g. 0.1); or set data.eval_split"
            )
        try:
            parts = train.train_test_split(test_size=eval_size, seed=seed)
        except ValueError as e:  # a fraction that leaves no row on one side
            raise DataError(f"data.eval_size={eval_size!r} does not split the {n} rows of {shown}: {e}") from None
        train, evals = parts["train"], parts["test"]
    return train, evals


def _local_files(data_files) -> list[str]:
    """The existing local files among ``data_files`` (a path, a list, or a dict of split -> path(s))."""
    if isinstance(data_files, dict):
        return [f for v in data_files.values() for f in _local_files(v)]
    if isinstance(data_files, (list, tuple)):
        return [f for v in data_files for f in _local_files(v)]
    return [data_files] if isinstance(data_files, str) and os.path.isfile(data_files) else []


class Rows:
    """Prompts given as Python rows, behind the part of the ``datasets.Dataset`` API the trainer reads: ``len``,
    rows by index (``ds[i]`` -> dict, ``ds[[i, j]]`` -> dict of lists), columns by name and ``column_names``.

    A list of a few thousand prompts needs no Arrow table: keeping it a list saves importing pyarrow and pandas
    (about 80 MiB of resident memory). Columns missing from a row read as None, as in ``Dataset.from_list``.
    """

    def __init__(self, rows: list[dict]):
        self._rows = rows
        self.column_names: list[str] = list(dict.fromkeys(k for row in rows for k in row))

    def __len__(self) -> int:
        return len(self._rows)

    @property
    def num_rows(self) -> int:
        return len(self._rows)

    def __getitem__(self, key):
        if isinstance(key, str):
            if key not in self.column_names:
                raise KeyError(f"column {key!r} not in {self.column_names}")
            return [row.get(key) for row in self._rows]
        if isinstance(key, slice):
            key = range(len(self._rows))[key]
        elif not isinstance(key, (list, tuple, range)):
            return {c: self._rows[key].get(c) for c in self.column_names}
        return {c: [self._rows[i].get(c) for i in key] for c in self.column_names}

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def __repr__(self) -> str:
        return f"Rows(num_rows={len(self)}, column_names={self.column_names})"


def is_stream(data) -> bool:
    """Whether ``data`` is a ``datasets.IterableDataset`` (streamed rows: no length, no indexing)."""
    datasets = sys.modules.get("datasets")  # not imported: it cannot be one, and Rows users never import it
    return datasets is not None and isinstance(data, datasets.IterableDataset)


def as_dataset(data, name: str, allow_stream: bool | None = None):
    """Accept a ``datasets.Dataset`` (used as it is), a list of dicts or a dict of lists (kept as :class:`Rows`), and
    for training (``allow_stream``, by default unless ``name`` starts with "eval") a ``datasets.IterableDataset``."""
    if data is None or isinstance(data, Rows):
        return data
    if is_stream(data):
        if allow_stream is None:
            allow_stream = not name.startswith("eval")
        if not allow_stream:
            raise DataError(
                f"{name} is a datasets.IterableDataset (a stream); evaluation needs a fixed set of prompts. "
                f"Materialise a slice of it, e.g. {name}=Dataset.from_list(list(stream.take(n)))"
            )
        return data
    if isinstance(data, list):
        if data and not all(isinstance(r, dict) for r in data):
            raise DataError(f"{name} must be a list of dicts (one per row), got a list of {type(data[0]).__name__}")
        return Rows(data)
    if isinstance(data, dict):
        lengths = {k: len(v) for k, v in data.items()}
        if len(set(lengths.values())) > 1:
            raise DataError(f"{name}: the columns of a dict of lists must have one length, got {lengths}")
        n = next(iter(lengths.values()), 0)
        return Rows([{k: v[i] for k, v in data.items()} for i in range(n)])
    import datasets

    if isinstance(data, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        raise DataError(f"{name} is a DatasetDict with splits {list(data)}; pass one split, e.g. {name}=ds['train']")
    if isinstance(data, datasets.Dataset):
        return data
    stream = " (or, to train on, a datasets.IterableDataset)" if allow_stream is not False else ""
    raise DataError(
        f"{name} must be a datasets.Dataset, a list of dicts or a dict of lists{stream}, not {type(data).__name__}"
    )


def check_prompt_format(dataset, name: str, prompt_column: str, tokenizer=None) -> str:
    """Fail early, naming the rows, on an empty dataset, a missing column, prompts that are neither strings nor message
    lists (or a mix), malformed messages, or messages with a tokenizer that has no chat template. Returns the kind:
    ``"text"`` or ``"messages"``."""
    if len(dataset) == 0:
        raise DataError(f"{name} is empty (0 rows); give it at least one prompt")
    if prompt_column not in dataset.column_names:
        raise DataError(
            f"{name} has no column {prompt_column!r}; its columns are {dataset.column_names}. "
            f"Rename a column or set prompt_column=<name>"
        )
    kind = prompt_kind(dataset[prompt_column], name)
    if kind == "messages" and tokenizer is not None:
        check_chat_template(tokenizer, name)
    return kind


def check_prompts(
    dataset,
    name: str,
    prompt_column: str,
    tokenizer,
    max_prompt_length: int | None,
    max_new_tokens: int,
    context_length: int | None,
    chat_template_kwargs: dict | None = None,
) -> None:
    """:func:`check_prompt_format`, then empty or over-long prompts (conversational ones as rendered), naming rows."""
    kind = check_prompt_format(dataset, name, prompt_column, tokenizer)
    prompts = dataset[prompt_column]
    if kind == "messages":
        prompts = render(tokenizer, prompts, chat_template_kwargs)
    lengths = []
    for start in range(0, len(prompts), 1024):
        enc = tokenizer(prompts[start : start + 1024], add_special_tokens=kind == "text")["input_ids"]
        lengths.extend(len(ids) for ids in enc)
    empty = [i for i, n in enumerate(lengths) if n == 0]
    if empty:
        raise DataError(
            f"{name} row {empty[0]}: the prompt is empty (0 tokens, {len(empty)} such rows); "
            f"every prompt needs at least one token"
        )
    if context_length is None:
        return
    limit = context_length - max_new_tokens
    eff = [min(n, max_prompt_length) if max_prompt_length else n for n in lengths]
    too_long = [i for i, n in enumerate(eff) if n > limit]
    if too_long:
        i = too_long[0]
        raise DataError(
            f"{name} row {i}: the prompt is {eff[i]} tokens; with max_new_tokens={max_new_tokens} that exceeds the "
            f"model's context of {context_length} tokens ({len(too_long)} of {len(eff)} rows do). Shorten the prompts, "
            f"set max_prompt_length<={max(limit, 0)} (keeps the last tokens), or lower max_new_tokens"
        )


class PromptSampler:
    """Draws global batches of row indices: a fresh seeded permutation per pass over the data, consecutive slices of
    it per step (wrapping into the next pass), and each process keeps its contiguous share. Checkpointable.

    With ``dataset`` (anything indexed like a ``datasets.Dataset``: ``dataset[indices]`` -> dict of lists),
    :meth:`next_rows` gives this process's rows themselves."""

    def __init__(
        self, num_rows: int, global_batch: int, seed: int, process_index: int = 0, num_processes: int = 1, dataset=None
    ):
        if global_batch % num_processes:
            raise ConfigError(f"rollout_batch_size={global_batch} must be a multiple of num_processes={num_processes}")
        self.num_rows, self.global_batch, self.seed = num_rows, global_batch, seed
        self.process_index, self.num_processes = process_index, num_processes
        self.dataset = dataset
        self.epoch, self.offset = 0, 0

    def _perm(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(self.num_rows, generator=g)

    def next_global(self) -> list[int]:
        out: list[int] = []
        while len(out) < self.global_batch:
            perm = self._perm(self.epoch)
            take = min(self.global_batch - len(out), self.num_rows - self.offset)
            out.extend(perm[self.offset : self.offset + take].tolist())
            self.offset += take
            if self.offset >= self.num_rows:
                self.epoch, self.offset = self.epoch + 1, 0
        return out

    def next_local(self) -> list[int]:
        """This process's rows of the next global batch."""
        indices = self.next_global()
        share = self.global_batch // self.num_processes
        return indices[self.process_index * share : (self.process_index + 1) * share]

    def next_rows(self) -> list[dict]:
        """This process's rows of the next global batch, one dict per row."""
        if self.dataset is None:
            raise ValueError("PromptSampler.next_rows needs the dataset: PromptSampler(..., dataset=ds)")
        indices = self.next_local()
        columns = self.dataset[indices]
        return [{k: v[i] for k, v in columns.items()} for i in range(len(indices))]

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "offset": self.offset, "seed": self.seed, "num_rows": self.num_rows}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("num_rows", self.num_rows) != self.num_rows:
            raise DataError(
                f"the checkpoint was made with a dataset of {state['num_rows']} rows, this one has "
                f"{self.num_rows}; resume with the same train_dataset"
            )
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])


class StreamSampler:
    """Rows of a ``datasets.IterableDataset`` per step: each process reads its own part of the stream
    (``datasets.distributed.split_dataset_by_node``: whole shards when their number divides evenly, else every
    ``num_processes``-th row) and takes ``global_batch // num_processes`` rows a step. An exhausted stream starts a
    new pass (``set_epoch(epoch)``, which reshuffles a ``.shuffle()``-d stream), wrapping mid-step as
    :class:`PromptSampler` does.

    Checkpointable through the dataset's own resumable iteration (``IterableDataset.state_dict``): a resumed run
    continues with the next unseen rows, within the limits datasets documents (a shuffle buffer's rows may be
    refilled with others). :meth:`state_dict` holds this process's position (plain data: JSON); each process saves
    and loads its own (the trainer's ``hfpg_state_<rank>.json``). ``seed`` is recorded only: the stream's order is
    its own (shuffle it with ``stream.shuffle(seed=..., buffer_size=...)``)."""

    def __init__(self, dataset, global_batch: int, seed: int, process_index: int = 0, num_processes: int = 1):
        if global_batch % num_processes:
            raise ConfigError(f"rollout_batch_size={global_batch} must be a multiple of num_processes={num_processes}")
        from datasets.distributed import split_dataset_by_node

        self.global_batch, self.seed = global_batch, seed
        self.process_index, self.num_processes = process_index, num_processes
        # a new IterableDataset even for one process: set_epoch / load_state_dict leave the caller's object alone
        self.stream = split_dataset_by_node(dataset, rank=process_index, world_size=num_processes)
        self.epoch = 0
        self._iterator = None

    def next_rows(self) -> list[dict]:
        """This process's ``global_batch // num_processes`` rows for the next step."""
        share = self.global_batch // self.num_processes
        out: list[dict] = []
        # a resumed pass may have nothing left, so only two passes in a row without a row mean an empty stream
        empty_passes, drawn = 0, 1  # an iterator carried over from the last step has drawn rows
        while len(out) < share:
            if self._iterator is None:
                self.stream.set_epoch(self.epoch)
                self._iterator, drawn = iter(self.stream), 0
            try:
                out.append(dict(next(self._iterator)))
                drawn = 1
                empty_passes = 0
            except StopIteration:
                self._iterator = None
                self.epoch += 1
                empty_passes += 1 - drawn
                if empty_passes >= 2:
                    where = "the stream yields no rows; check the dataset's split, data files and filters"
                    if self.num_processes > 1:
                        where = (
                            f"process {self.process_index} of {self.num_processes} gets no rows of the stream; check "
                            f"that it has rows (split, data files, filters) and at least one row or shard per process"
                        )
                    raise DataError(f"train_dataset: {where}") from None
        return out

    def state_dict(self) -> dict[str, Any]:
        """This process's position in its part of the stream (every process saves its own)."""
        return {
            "epoch": self.epoch,
            "dataset": self.stream.state_dict(),
            "seed": self.seed,
            "process_index": self.process_index,
            "num_processes": self.num_processes,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("num_processes", self.num_processes) != self.num_processes:
            raise DataError(
                f"the checkpoint was made with {state['num_processes']} processes, each reading its own part of the "
                f"stream; resume with the same number of processes ({self.num_processes} now)"
            )
        if state.get("process_index", self.process_index) != self.process_index:
            raise DataError(
                f"this stream position is process {state['process_index']}'s, not process {self.process_index}'s: "
                f"each process resumes from its own state"
            )
        self.epoch = int(state["epoch"])
        self.stream.set_epoch(self.epoch)
        self.stream.load_state_dict(state["dataset"])  # applied when the next pass of this epoch starts
        self._iterator = None


def make_sampler(dataset, global_batch: int, seed: int, process_index: int = 0, num_processes: int = 1):
    """A :class:`StreamSampler` for a ``datasets.IterableDataset``, else a :class:`PromptSampler` over ``dataset``."""
    if is_stream(dataset):
        return StreamSampler(dataset, global_batch, seed, process_index, num_processes)
    return PromptSampler(len(dataset), global_batch, seed, process_index, num_processes, dataset=dataset)
