"""``polar-vbll eval``: evaluate a finished run's saved adapter and head, beside the zero-shot model.

The run folder fixes everything, and nothing is re-derived: its ``config.yaml`` (backbone, method, prompt
length, BOS handling), ``readout.json`` (the answer letters and their token ids, the head's width, the
prompt template version; verified against the tokenizer), the adapter (``adapter/``, content hash
verified; one per member under ``member-<i>/`` for an ensemble) and the head (``head.safetensors``, hash
recorded in ``readout.json``). Predictions go through the same evaluation as training
(``polar_vbll.evaluation``), so on the run's own splits the metrics are those of ``results.json``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from polar_vbll.adapters.state import adapters_off, read_safetensors
from polar_vbll.backbone import answer_head_weight
from polar_vbll.config import RunConfig, load_config
from polar_vbll.errors import CheckpointError, UserInputError
from polar_vbll.evaluation import Member, evaluate
from polar_vbll.features import FeatureSource, encode_examples
from polar_vbll.files import read_json
from polar_vbll.heads.deterministic import DeterministicHead
from polar_vbll.methods import METHODS
from polar_vbll.metrics import format_table
from polar_vbll.models import load_backbone
from polar_vbll.placement import Placement, placement_for
from polar_vbll.predictives import predict
from polar_vbll.readout import Readout, check_readout, check_width, load_readout
from polar_vbll.results import Metrics
from polar_vbll.session import build_head, load_examples
from polar_vbll.tasks import load_task, num_classes
from polar_vbll.tasks.registry import run_splits


def _load_head_state(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: the run did not finish saving its head")
    return read_safetensors(path, "the head")


def _run_temperature(run: Path) -> float | None:
    """The temperature the run fitted on its own validation split (``results.json``), if any."""
    scaled = _run_metric(run, "temperature_scaled")
    return float(scaled["temperature"]) if scaled else None


def run_posterior(run: Path) -> dict | None:
    """The report of the run's post-hoc posterior step (TFB's search: ``results.json`` ``metrics.posterior``),
    which a reload reuses, if any."""
    return _run_metric(run, "posterior")


def _run_metric(run: Path, key: str):
    import json

    try:
        return json.loads((run / "results.json").read_text())["metrics"].get(key)
    except (OSError, ValueError, KeyError, AttributeError):
        return None


@dataclass
class RunFolder:
    """A finished run's folder, checked without loading the model: its config, method, the folder of each
    member (the run itself, or ``member-<i>/`` for an ensemble) and the readout (answer letters, token ids,
    prompt settings)."""

    path: Path
    cfg: RunConfig
    folders: list[Path]
    readout: Readout

    @property
    def method(self):
        return METHODS[self.cfg.method]

    def temperature(self) -> float | None:
        """The temperature the run fitted on its validation split (None: the run has no temperature scaling)."""
        return _run_temperature(self.path) if self.cfg.eval.temperature_scaling else None


def pinned_snapshot(cfg: RunConfig, run: Path) -> RunConfig:
    """``cfg`` with ``model.revision`` set to the Hugging Face snapshot the run trained on (``params.json``:
    ``model_source.revision``) when the config names none, so a run named by hub id reloads that exact
    snapshot even after the cache's ``main`` moved on (a one-line error if the cache no longer holds it)."""
    params = run / "params.json"
    if cfg.model.source != "path" or cfg.model.revision or not params.is_file():
        return cfg
    recorded = read_json(params, "the run's parameters", "run the training again").get("model_source.revision")
    if not recorded:
        return cfg
    return cfg.model_copy(update={"model": cfg.model.model_copy(update={"revision": recorded})})


def check_run_folder(run: str | Path) -> RunFolder:
    """The cheap checks of a run folder (config, every member's adapter and readout); raises
    ``UserInputError`` naming what is missing."""
    run = Path(run)
    if not run.exists():
        raise UserInputError(f"{run} does not exist (give a run folder written by `polar-vbll train` or `compare`)")
    if not (run / "config.yaml").is_file():
        raise UserInputError(f"{run} is not a run folder: config.yaml is missing")
    cfg = pinned_snapshot(load_config(run / "config.yaml"), run)
    n_members = METHODS[cfg.method].predictive_kind.members(cfg)
    folders = [run] if n_members == 1 else [run / f"member-{i}" for i in range(n_members)]
    for folder in folders:
        if not (folder / "adapter").is_dir():
            raise UserInputError(f"{run} holds no trained adapter ({folder / 'adapter'} is missing)")
    readouts = [load_readout(folder) for folder in folders]
    return RunFolder(run, cfg, folders, readouts[0])


@dataclass
class LoadedRun:
    """A run's trained model, ready to predict: backbone and tokenizer (readout verified), the adapter,
    the members (head, and adapter state for an ensemble) and the feature source (frozen-prefix cache)."""

    folder: RunFolder
    model: Any
    tokenizer: Any
    adapter: Any
    members: list[Member]
    source: FeatureSource


def load_run(folder: RunFolder, n_train: int, device: str | None = None) -> LoadedRun:
    """Load the backbone, verify the readout against its tokenizer, and load every member's adapter (hash
    verified) and head (``n_train``: the training split's size, which the head's KL scaling records).
    ``device``: where to run (``eval --device``, ``predict --device``; default the run's ``model.device``);
    raises :class:`~polar_vbll.errors.ConfigError` for a device this process does not have."""
    cfg, method = folder.cfg, folder.method
    placement = placement_for(cfg.model, device)
    model, tokenizer = load_backbone(cfg.model, placement)
    check_readout(folder.readout, tokenizer, str(folder.path))
    kind = method.adapter_kind
    adapter = kind.load(model, folder.folders[0] / "adapter")
    members = []
    for i, where in enumerate(folder.folders):
        head = build_head(cfg, model, folder.readout.answer_token_ids, n_train=n_train, device=placement.device)
        head.load_state_dict(_load_head_state(where / "head.safetensors"))
        state = None
        if len(folder.folders) > 1:  # each member's verified weights, read through a host backbone of its own
            host = Placement(torch.device("cpu"), placement.dtype)
            own_adapter = adapter if i == 0 else kind.load(load_backbone(cfg.model, host)[0], where / "adapter")
            state = own_adapter.adapter_state_dict()
        members.append(Member(head, state))
    source = FeatureSource.for_config(adapter.base_model, tokenizer.pad_token_id, cfg.train)
    return LoadedRun(folder, model, tokenizer, adapter, members, source)


def evaluate_saved_run(
    run: str | Path,
    task: str | None = None,
    split: str | None = None,
    limit: int | None = None,
    progress: bool = True,
    device: str | None = None,
) -> dict[str, Any]:
    """The metrics block (``results.json``'s ``metrics``: ``eval`` with the zero-shot model beside it, and
    on the run's own splits ``validation`` and the OOD sets; on another task ``validation`` is None) of the
    run's saved model on ``task``/``split`` (the run's evaluation split by default). Everything cheap is
    checked before the model loads (the device first). ``device``: see :func:`load_run`. Prints the table;
    the caller prints the block as JSON."""
    folder = check_run_folder(run)
    placement_for(folder.cfg.model, device)
    run, cfg, method, readout = folder.path, folder.cfg, folder.method, folder.readout

    own = task is None and split is None and limit is None
    examples = load_examples(cfg)  # the training split too: a post-hoc head refits on it
    if not own:
        task, split = task or cfg.data.task, split or cfg.data.eval_split
        # the training split only for a post-hoc head's refit; the run's own validation set is not this task's
        same = task == cfg.data.task  # the run's own task: read with its column mapping and split rule
        kw = {"columns": cfg.data.columns, "wanted": run_splits(cfg.data)} if same else {}
        examples = {"train": examples["train"],
                    "eval": load_task(task, split, seed=cfg.data.split_seed, limit=limit, **kw)}  # fmt: skip
    check_width(readout, max(num_classes(exs) for exs in examples.values()), f"{task or cfg.data.task}")

    loaded = load_run(folder, n_train=len(examples["train"]), device=device)
    model, tokenizer, adapter, members, source = (loaded.model, loaded.tokenizer, loaded.adapter, loaded.members,
                                                  loaded.source)  # fmt: skip
    answer_ids = readout.answer_token_ids
    names = {name: name for name in examples} | ({} if own else {"eval": f"{task}:{split}"})
    splits = {
        name: encode_examples(names[name], exs, tokenizer, readout.max_length, readout.add_bos)
        for name, exs in examples.items()
    }
    bs = cfg.train.eval_batch_size
    zero_head = DeterministicHead(*answer_head_weight(model, answer_ids))
    with adapters_off(adapter):  # the same cached frozen blocks serve the zero-shot model
        zero = predict(source, zero_head, splits["eval"], bs, progress).probs
    ev = evaluate(cfg, source, adapter, members, splits, zero, progress, temperature=_run_temperature(run),
                  posterior=run_posterior(run))
    metrics = Metrics.model_validate(ev.metrics()).model_dump(mode="json")  # the results.json form
    rows = {"zero-shot": metrics["zero_shot"], method.label: metrics["eval"]}
    name = f"{task} {split}" if not own else f"{cfg.data.task} {cfg.data.eval_split}"
    print(f"## {name} ({len(splits['eval'])} questions)\n\n{format_table(rows)}")
    return {"task": task or cfg.data.task, "split": split or cfg.data.eval_split, "label": method.label,
            "metrics": metrics}  # fmt: skip
