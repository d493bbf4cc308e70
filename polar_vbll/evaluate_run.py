"""``polar-vbll eval``: evaluate a finished run's saved adapter, beside the zero-shot model, on any split."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from polar_vbll.adapters import PolarModel
from polar_vbll.config import RunConfig, load_config
from polar_vbll.errors import CheckpointError, UserInputError
from polar_vbll.evaluate import predict
from polar_vbll.features import FeatureSource, encode_examples
from polar_vbll.heads import DeterministicHead
from polar_vbll.metrics import format_table
from polar_vbll.models import answer_head_weight, answer_token_ids, load_backbone
from polar_vbll.run import build_head, method_label, predict_with
from polar_vbll.tasks import answer_token_strings, load_task, num_classes, task_num_classes


def load_adapter(cfg: RunConfig, model, directory: Path):
    """Load a saved adapter of the run's kind into ``model`` (content hash verified)."""
    if cfg.adapter_kind == "lora":
        from polar_vbll.baselines.lora import LoraAdapter

        return LoraAdapter.load_adapter(model, directory)
    return PolarModel.load_adapter(model, directory)


def _load_head(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: the run did not finish saving its head")
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own types; all mean "unreadable"
        raise CheckpointError(f"{path} is not a readable safetensors file: {exc}") from None


@contextlib.contextmanager
def adapters_off(adapter):
    """Temporarily zero the update: PoLAR's Theta (``W0 + s U 0 V^T = W0``) or LoRA's B, so the adapted
    model computes exactly the base model."""
    params = [p for n, p in _update_params(adapter)]
    saved = [p.detach().clone() for p in params]
    try:
        with torch.no_grad():
            for p in params:
                p.zero_()
        yield adapter
    finally:
        with torch.no_grad():
            for p, v in zip(params, saved, strict=True):
                p.copy_(v)


def _update_params(adapter):
    """The parameters whose zeroing removes the update: Theta for PoLAR, B for LoRA."""
    if isinstance(adapter, PolarModel):
        return [("theta", p) for p in adapter.theta_parameters()]
    return [(n, p) for n, p in adapter.base_model.named_parameters() if "lora_B" in n]


def evaluate_run(
    run: str | Path,
    task: str | None = None,
    split: str | None = None,
    limit: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Metrics of the zero-shot model and of the run's adapter on ``task``/``split`` (the run's by default).

    The adapter is loaded from ``<run>/adapter`` with its content hash verified; the run's own config
    fixes the backbone, prompt length and BOS handling, so the numbers match those of ``train``.
    """
    run = Path(run)
    if not (run / "config.yaml").is_file():
        raise UserInputError(f"{run} is not a run folder: config.yaml is missing")
    if not (run / "adapter").is_dir():
        raise UserInputError(f"{run} holds no trained adapter ({run / 'adapter'} is missing)")
    cfg = load_config(run / "config.yaml")
    if limit is None and task is None and split is None:
        limit = cfg.data.eval_limit  # the run's own evaluation set, exactly as `train` evaluated it
    task = task or cfg.data.task
    split = split or cfg.data.eval_split
    examples = load_task(task, split, seed=cfg.data.split_seed, limit=limit)

    model, tokenizer = load_backbone(cfg.model)
    k = max(task_num_classes(cfg.data.task), num_classes(examples))
    answer_ids = answer_token_ids(tokenizer, answer_token_strings(k))
    zero_shot_head = DeterministicHead(*answer_head_weight(model, answer_ids))
    head = build_head(cfg, model, answer_ids, n_train=1)  # N only weights the training loss
    head.load_state_dict(_load_head(run / "head.safetensors"))
    enc = encode_examples(f"{task}:{split}", examples, tokenizer, cfg.model.max_length, cfg.model.add_bos)

    adapter = load_adapter(cfg, model, run / "adapter")
    source = FeatureSource(
        adapter.base_model, tokenizer.pad_token_id, cache_prefix=cfg.train.cache_frozen_prefix
    )
    train = None
    if cfg.head.laplace != "none":
        train_examples = load_task(
            cfg.data.task, cfg.data.train_split, seed=cfg.data.split_seed, limit=cfg.data.train_limit
        )
        train = encode_examples("train", train_examples, tokenizer, cfg.model.max_length, cfg.model.add_bos)
    tuned, _ = predict_with(cfg, source, head, enc, train, progress)
    with adapters_off(adapter):  # the same cached frozen blocks serve the zero-shot model
        zero_shot = predict(source, zero_shot_head, enc, cfg.train.eval_batch_size, progress)
    rows = {"zero-shot": zero_shot.metrics(), method_label(cfg): tuned.metrics()}
    print(f"## {task} {split} ({len(enc)} questions)\n\n{format_table(rows)}")
    return {"task": task, "split": split, "metrics": rows}
