"""Turning a run config into the objects a run needs, through the method registries.

``build_session(cfg)`` loads the backbone, injects the method's adapter kind, loads and tokenizes the
splits (train / validation / eval, and the OOD sets), and builds the method's head and the zero-shot head
(the LM-head rows of the answer letters). One process and every distributed rank build their objects here;
what differs afterwards is only the backend they are wrapped in.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from polar_vbll.backbone import answer_head_weight
from polar_vbll.config import RunConfig
from polar_vbll.errors import DataError
from polar_vbll.features import EncodedSplit, encode_examples
from polar_vbll.heads.deterministic import DeterministicHead
from polar_vbll.methods import METHODS, Method
from polar_vbll.models import check_model_source, load_backbone, load_tokenizer, model_skeleton
from polar_vbll.placement import Placement, placement_for
from polar_vbll.protocols import AdapterModel
from polar_vbll.tasks import answer_letters, load_task, num_classes, task_num_classes
from polar_vbll.tasks.file_rows import FileSplit
from polar_vbll.tasks.registry import run_split, run_splits
from polar_vbll.tokens import answer_token_ids


@dataclass
class Session:
    """The objects of one run (one ensemble member): model, tokenizer, adapter, head, zero-shot head,
    tokenized splits and answer-letter token ids."""

    cfg: RunConfig
    method: Method
    model: nn.Module
    tokenizer: Any
    adapter: AdapterModel
    head: Any
    zero_shot_head: DeterministicHead
    splits: dict[str, EncodedSplit]
    answer_ids: list[int]
    placement: Placement | None = None


def load_examples(cfg: RunConfig) -> dict[str, list]:
    """The examples of every split a run reads: ``train``, ``validation``, ``eval`` and ``ood:<task>``; splits
    too small for the method (:func:`check_split_sizes`) and a training split of one answer class
    (:func:`check_training_classes`) are refused."""
    d = cfg.data
    examples = {
        "train": run_split(d, d.train_split, d.train_limit),
        "validation": run_split(d, d.val_split, d.val_limit),
        "eval": run_split(d, d.eval_split, d.eval_limit),
    }
    check_split_sizes(cfg, examples)  # too few examples first: one example is also one class
    check_training_classes(cfg, examples["train"])
    for task in d.ood_tasks:
        examples[f"ood:{task}"] = load_task(task, d.ood_split, seed=d.split_seed, limit=d.ood_limit)
    return examples


def learns_from_labels(method: str) -> bool:
    """Whether ``method`` fits anything to the training answers: every method but the zero-shot model
    (the linear probe trains no adapter but fits its head to them)."""
    m = METHODS[method]
    return m.trains or m.head != "deterministic"


def check_training_classes(cfg: RunConfig, train: list) -> None:
    """Refuse (``DataError``, one line) a training split whose answers are all one class, for a method that
    learns from them: it can only learn to answer that class, and its calibration measures nothing.
    Checked by every entry point before any work (:func:`validate_inputs`, a comparison's data check)."""
    classes = set(train.answers.tolist()) if isinstance(train, FileSplit) else {e.answer for e in train}
    if len(classes) != 1 or not learns_from_labels(cfg.method):
        return
    d, k = cfg.data, next(iter(classes))
    texts = {e.choices[k] for e in train}
    text = f" ({next(iter(texts))!r})" if len(texts) == 1 else ""
    limit = f", data.train_limit={d.train_limit}" if d.train_limit is not None else ""
    raise DataError(
        f"data.task={d.task}: the training split {d.train_split!r} (data.split_seed={d.split_seed}{limit}) holds "
        + (f"{len(train)} questions, all answered " if len(train) > 1 else "1 question, answered ")
        + f"{chr(ord('A') + k)}{text}: a model trained on one answer class learns only to give it; train on "
        "questions with at least two different answers (more data, a larger data.train_limit, or another "
        "data.split_seed)"
    )


def validate_inputs(cfg: RunConfig, device: bool = True) -> None:
    """Everything a run reads that is cheap to check, checked before anything is loaded, resumed or
    written: the device (``model.device``: a CUDA request without CUDA is refused here; ``device=False``
    where the work runs elsewhere, e.g. on Ray workers), every data row of every split (task names, files,
    fields) and the model's folder."""
    if device:
        placement_for(cfg.model)
    check_model_source(cfg.model)
    check_architecture(cfg)
    load_examples(cfg)


def check_architecture(cfg: RunConfig) -> None:
    """For a user's model folder: its architecture is one the method can adapt (decoder blocks found, the
    adapter's ``target_modules`` and ``layers`` select layers), checked on the model's skeleton (built from
    its config on the meta device: no weight is read), so a refusal comes before any run folder exists."""
    if cfg.model.source != "path":
        return
    from polar_vbll.architecture import decoder_of

    model = model_skeleton(cfg.model)
    decoder_of(model)
    kind = METHODS[cfg.method].adapter_kind
    if kind.select is not None:
        kind.select(model, kind.settings(cfg))


def check_split_sizes(cfg: RunConfig, examples: dict[str, list]) -> None:
    """Refuse splits too small for what the method does with them (:class:`~polar_vbll.errors.DataError`):
    a head that reads standardised features needs at least 2 training examples (their mean and standard
    deviation); every split a run predicts needs at least one."""
    method = METHODS[cfg.method]
    need = 2 if "features" in method.head_kind.settings else 1
    n = len(examples["train"])
    if n < need:
        raise DataError(
            f"the training split ({cfg.data.task}, {cfg.data.train_split}) has {n} example(s); {cfg.method} needs "
            f"at least {need} (its head standardises the features with the training set's mean and standard "
            "deviation): raise data.train_limit or use more data"
        )
    for name, rows in examples.items():
        if not rows:
            raise DataError(f"the {name} split of {cfg.data.task} is empty; check data.*_split and data.*_limit")


def load_splits(
    cfg: RunConfig, tokenizer, examples: dict[str, list] | None = None
) -> tuple[dict[str, EncodedSplit], list[int]]:
    """Train / validation / eval splits (and OOD sets), tokenized, plus the answer-letter token ids.
    ``examples``: already loaded (:func:`load_examples`)."""
    examples = examples if examples is not None else load_examples(cfg)
    # size the head from the whole task (one split may lack the rare 5-choice question), and the OOD sets
    d = cfg.data
    k = max([task_num_classes(d.task, columns=d.columns, wanted=run_splits(d))]
            + [num_classes(exs) for exs in examples.values()])  # fmt: skip
    answer_ids = answer_token_ids(tokenizer, answer_letters(k))
    splits = {
        name: encode_examples(name, exs, tokenizer, cfg.model.max_length, cfg.model.add_bos)
        for name, exs in examples.items()
    }
    cut = {name: enc.shortened for name, enc in splits.items() if any(enc.shortened.values())}
    if cut:
        counts = "; ".join(f"{n}: " + ", ".join(f"{part} {k}" for part, k in c.items() if k) for n, c in cut.items())
        print(f"prompts shortened to fit model.max_length={cfg.model.max_length} ({counts})", flush=True)
    return splits, answer_ids


def tokenise_files(cfg: RunConfig) -> int:
    """Write the token cache (``polar_vbll.token_file``) of every split a run reads from a plain JSONL file,
    if it is not there yet, and return how many files that covered: the driver of a distributed run calls
    it before the workers start, so each worker opens the memory-mapped ids instead of tokenising the file
    itself (a worker on a node without the entry writes it there). Raises ``DataError`` as the rows' check."""
    from polar_vbll.token_file import open_or_build

    if not any(task.startswith("jsonl:") for task in [cfg.data.task, *cfg.data.ood_tasks]):
        return 0  # no user file: nothing to read twice
    scans = {id(s.scan): s.scan for s in load_examples(cfg).values() if isinstance(s, FileSplit)}
    if scans:
        tokenizer = load_tokenizer(cfg.model)
        for scan in scans.values():
            open_or_build(scan, tokenizer, cfg.model.max_length, cfg.model.add_bos)
    return len(scans)


def build_adapter(cfg: RunConfig, model: nn.Module) -> AdapterModel:
    """Inject the method's adapter kind into ``model`` (in place), from its config section; with
    ``train.activation_checkpointing`` the adapted blocks are checkpointed, with ``train.compile`` every block
    is compiled (``polar_vbll.checkpointing``)."""
    kind = METHODS[cfg.method].adapter_kind
    adapter = kind.inject(model, kind.settings(cfg))
    if cfg.train.activation_checkpointing:
        from polar_vbll.checkpointing import enable_activation_checkpointing

        enable_activation_checkpointing(model)
    if cfg.train.compile:
        from polar_vbll.checkpointing import compile_blocks

        compile_blocks(model)
    return adapter


HeadRows = Callable[[nn.Module, list[int]], tuple[torch.Tensor, torch.Tensor | None]]


def build_head(
    cfg: RunConfig, model: nn.Module, answer_ids: list[int], n_train: int, head_rows: HeadRows = answer_head_weight,
    device: torch.device | None = None,
):  # fmt: skip
    """The method's head as it trains, started from the LM head's answer-token rows (so training starts
    at the zero-shot model), in fp32 on ``device`` (the backbone's: the head's loss is part of the step);
    ``n_train`` weights a Bayesian head's KL (1/N)."""
    weight, bias = head_rows(model, answer_ids)
    head = METHODS[cfg.method].head_kind.build(cfg, weight.cpu(), None if bias is None else bias.cpu(), n_train)
    return head.to(device) if device is not None else head


def zero_shot_head(
    model: nn.Module, answer_ids: list[int], head_rows: HeadRows = answer_head_weight,
    device: torch.device | None = None,
) -> DeterministicHead:  # fmt: skip
    """The zero-shot head (the LM head's answer-token rows, fp32) on ``device``."""
    head = DeterministicHead(*head_rows(model, answer_ids))
    return head.to(device) if device is not None else head


def build_session(
    cfg: RunConfig,
    splits: dict[str, EncodedSplit] | None = None,
    answer_ids: list[int] | None = None,
    load: Callable[[Any, Placement], tuple[nn.Module, Any]] | None = None,
    rank: int = 0,
    head_rows: HeadRows = answer_head_weight,
    placement: Placement | None = None,
    memory_check: bool = True,
) -> Session:
    """Build a run's objects. ``splits``/``answer_ids``: already tokenized splits to share (a comparison
    shares them, and their cached frozen-prefix states, across methods and seeds). ``load``: how to load
    the backbone (default :func:`~polar_vbll.models.load_backbone`; workers load node by node, under ZeRO-3
    partitioned). ``head_rows``: how to read the LM
    head's answer rows (a partitioned model reads them from its checkpoint file). The data is read and
    validated before the model loads, so a bad row or task name fails in a second, not after the load. The
    global RNG is seeded with ``train.seed + rank`` (adapter dropout draws from it). ``placement``: where
    the backbone runs and in which dtype (default: :func:`~polar_vbll.placement.placement_for` the config);
    the adapter follows the backbone's weights and the heads are put on its device, in fp32. ``memory_check``:
    refuse, before the backbone loads, a run whose estimated peak exceeds the device's free memory
    (``polar_vbll.memory``; workers, whose weights ZeRO shards, skip it)."""
    placement = placement or placement_for(cfg.model)
    tokenizer = None
    if splits is None or answer_ids is None:  # data errors first, then the prompts' lengths for the memory check
        tokenizer = load_tokenizer(cfg.model)
        splits, answer_ids = load_splits(cfg, tokenizer, load_examples(cfg))
    if memory_check:
        from polar_vbll.memory import check_session_fits

        check_session_fits(cfg, splits, placement, tokenizer)  # before the backbone loads (polar_vbll.memory)
    torch.manual_seed(cfg.train.seed + rank)
    model, tokenizer = (load or load_backbone)(cfg.model, placement)
    adapter = build_adapter(cfg, model)
    device = placement.device
    head = build_head(cfg, model, answer_ids, n_train=len(splits["train"]), head_rows=head_rows, device=device)
    zero = zero_shot_head(model, answer_ids, head_rows, device)
    return Session(cfg, METHODS[cfg.method], model, tokenizer, adapter, head, zero, splits, answer_ids, placement)
