"""``polar-vbll eval``: evaluate a finished run's saved adapter, beside the zero-shot model, on any split."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch

from polar_vbll.adapters import PolarModel
from polar_vbll.config import load_config
from polar_vbll.errors import UserInputError
from polar_vbll.evaluate import predict
from polar_vbll.features import FeatureSource, encode_examples
from polar_vbll.heads import DeterministicHead
from polar_vbll.metrics import format_table
from polar_vbll.models import answer_head_weight, answer_token_ids, load_backbone
from polar_vbll.tasks import answer_token_strings, load_task, num_classes, task_num_classes


@contextlib.contextmanager
def adapters_off(polar: PolarModel):
    """Temporarily set every Theta to zero: ``W0 + s U 0 V^T = W0`` is exactly the base model."""
    saved = [p.detach().clone() for p in polar.theta_parameters()]
    try:
        with torch.no_grad():
            for p in polar.theta_parameters():
                p.zero_()
        yield polar
    finally:
        with torch.no_grad():
            for p, v in zip(polar.theta_parameters(), saved, strict=True):
                p.copy_(v)


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
    head = DeterministicHead(*answer_head_weight(model, answer_ids))
    enc = encode_examples(f"{task}:{split}", examples, tokenizer, cfg.model.max_length, cfg.model.add_bos)

    polar = PolarModel.load_adapter(model, run / "adapter")
    source = FeatureSource(
        polar.base_model, tokenizer.pad_token_id, cache_prefix=cfg.train.cache_frozen_prefix
    )
    tuned = predict(source, head, enc, cfg.train.eval_batch_size, progress)
    with adapters_off(polar):  # the same cached frozen blocks serve the zero-shot model
        zero_shot = predict(source, head, enc, cfg.train.eval_batch_size, progress)
    rows = {"zero-shot": zero_shot.metrics(), "PoLAR (MLE head)": tuned.metrics()}
    print(f"## {task} {split} ({len(enc)} questions)\n\n{format_table(rows)}")
    return {"task": task, "split": split, "metrics": rows}
