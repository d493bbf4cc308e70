"""Kinds of fault found by trying the tool as a new user would (``../shared/cases/NN``), each tested on its
case and on at least one further place where the same kind could occur. Each test names its case."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from polar_vbll_cli.app import app
from tests.optional import for_entry

WORKERS = for_entry("polar-vbll train --workers")

runner = CliRunner()
FIXTURES = Path(__file__).parent / "fixtures"


def _train(out: Path, *sets: str, name: str = "tiny"):
    args = ["train", "--config", "tiny", "--no-track", "--no-progress", "--set", f"output_dir={out}",
            "--set", f"name={name}"]  # fmt: skip
    for s in sets:
        args += ["--set", s]
    return runner.invoke(app, args)


def _one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    for f in fragments:
        assert f in result.output, (f, result.output)


# ------------------------------------------------------------------ case 01: reload from saved metadata
def test_case01_eval_reproduces_results_of_a_run_with_a_wider_ood_set(tmp_path):
    """OBQA (4 choices) trained with ARC as its OOD set (5 choices): the head is 5 wide. `eval` reads the
    width and the answer tokens from the run folder and reproduces results.json exactly."""
    assert _train(tmp_path, "data.task=openbookqa", "data.ood_tasks=[arc_easy]", "data.ood_limit=180",
                  name="obqa_ood5").exit_code == 0  # fmt: skip
    run = tmp_path / "obqa_ood5"
    readout = json.loads((run / "readout.json").read_text())
    assert readout["num_classes"] == 5 and readout["answer_letters"] == ["A", "B", "C", "D", "E"]
    result = runner.invoke(app, ["eval", str(run), "--no-progress"])
    assert result.exit_code == 0, result.output
    evaluated = json.loads(result.output[result.output.index("{") :])
    assert evaluated == json.loads((run / "results.json").read_text())["metrics"]  # exactly


def test_case01_a_task_wider_than_the_head_is_refused_naming_both_widths(tmp_path):
    data = FIXTURES / "two_choice.jsonl"  # the case's own file
    assert _train(tmp_path, f"data.task=jsonl:{data}", "data.train_limit=null", "data.val_limit=null",
                  "data.eval_limit=null", name="k2").exit_code == 0  # fmt: skip
    result = runner.invoke(app, ["eval", str(tmp_path / "k2"), "--task", "arc_easy", "--limit", "8"])
    _one_line_error(result, "arc_easy has questions with 4 choices", "reads 2 answer letters")


def test_case01_kind_an_edited_head_or_readout_is_refused(tmp_path):
    """Everything a reload uses is covered by a hash: the readout and the head beside it."""
    assert _train(tmp_path, name="r").exit_code == 0
    run = tmp_path / "r"
    readout = run / "readout.json"
    raw = json.loads(readout.read_text())
    readout.write_text(json.dumps({**raw, "answer_token_ids": list(reversed(raw["answer_token_ids"]))}))
    _one_line_error(runner.invoke(app, ["eval", str(run)]), "readout.json was altered")
    readout.write_text(json.dumps(raw))
    head = run / "head.safetensors"
    head.write_bytes(head.read_bytes()[:-4] + b"\x00\x00\x00\x00")
    _one_line_error(runner.invoke(app, ["eval", str(run)]), "head.safetensors is missing or was altered")


# ------------------------------------------------------- case 03: results reused after the settings changed
def _compare(tmp_path: Path, *sets: str):
    cfg = {"name": "cmp", "output_dir": str(tmp_path), "tasks": ["arc_easy"], "seeds": [0],
           "methods": ["zero_shot", "polar_mle"],
           "base": {"model": {"source": "tiny", "max_length": 128}, "polar": {"r": 4, "alpha": 8, "layers": [-1]},
                    "data": {"train_limit": 16, "val_limit": 8, "eval_limit": 16},
                    "train": {"steps": 2, "batch_size": 4, "eval_batch_size": 16}}}  # fmt: skip
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    args = ["compare", "--config", str(tmp_path / "c.yaml"), "--no-track", "--no-progress"]
    for s in sets:
        args += ["--set", s]
    return runner.invoke(app, args)


def test_case03_a_rerun_with_changed_settings_reruns_what_changed_and_never_mixes_them(tmp_path):
    assert _compare(tmp_path).exit_code == 0
    result = _compare(tmp_path, "base.train.steps=4", "base.data.eval_limit=8")
    assert result.exit_code == 0, result.output
    assert "PoLAR-MLE / seed 0: settings changed since it was recorded (data.eval_limit: 16 -> 8; " \
           "train.steps: 2 -> 4); it runs again" in result.output  # fmt: skip
    assert "changed since the checkpoints in" in result.output  # the stale run's checkpoints too
    csv = (tmp_path / "cmp" / "results.csv").read_text().splitlines()
    assert len(csv) == 3 and all(",8," in line for line in csv[1:])  # N = 8: the new settings only
    results = json.loads((tmp_path / "cmp" / "arc_easy" / "polar_mle" / "seed0" / "results.json").read_text())
    assert results["training"]["steps"] == 4 and results["split_sizes"]["eval"] == 8
    again = _compare(tmp_path, "base.train.steps=4", "base.data.eval_limit=8")
    assert again.exit_code == 0 and "-- arc_easy" not in again.output  # nothing runs: the records match


@for_entry("polar-vbll tune")
def test_case03_kind_a_search_resumes_only_with_its_own_settings(tmp_path, monkeypatch):
    """The same kind in searches: a rerun of a search folder with another base config is refused, naming
    the key, before Ray starts (the restored trials would mix two searches)."""
    import tune_spaces.driver as driver
    from polar_vbll.config import load_config, packaged_config

    folder = tmp_path / "s"
    folder.mkdir()
    cfg = load_config(packaged_config("run", "tiny"), [f"output_dir={tmp_path}", "name=s", "train.steps=99"])
    cfg = driver._prepare_base(cfg)  # as the search did when it started
    settings = driver.search_settings(space="priors")
    record = {"settings": driver.search_provenance(cfg, settings, driver.get_space("priors"))}
    (folder / "search.json").write_text(json.dumps(record, default=str))
    result = runner.invoke(
        app, ["tune", "--space", "priors", "--config", "tiny", "--name", "s", "--set", f"output_dir={tmp_path}"]
    )
    _one_line_error(result, "was started with other settings", "base.train.steps: 99 -> 6", "--name")


# ------------------------------------------------------------------------- case 05: the LM head as a target
@pytest.mark.parametrize(("method", "section"), [("polar_mle", "polar"), ("lora_mle", "lora")])
def test_case05_the_lm_head_alone_is_refused_in_one_line(tmp_path, method, section):
    result = _train(tmp_path, f"method={method}", f"{section}.layers=null", f"{section}.target_modules=[lm_head]")
    _one_line_error(result, "target_modules selects only ['lm_head']", "not on the feature path")


def test_case05_the_lm_head_beside_other_targets_is_dropped_with_a_warning(tmp_path):
    with pytest.warns(UserWarning, match=r"\['lm_head'\] dropped from the adapted layers"):
        result = _train(tmp_path, "polar.layers=null", "polar.target_modules=[q_proj,lm_head]")
    assert result.exit_code == 0, result.output
    adapted = json.loads((tmp_path / "tiny" / "adapter" / "adapter_config.json").read_text())["adapted_modules"]
    assert adapted and all(m.endswith("q_proj") for m in adapted)


# ------------------------------------------------------------ case 06: SentencePiece answer letters
def test_case06_a_llama2_style_tokenizer_trains(tmp_path):
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    model_dir = tmp_path / "spm"
    tok = AutoTokenizer.from_pretrained(str(FIXTURES / "llama2_style_tokenizer"))
    tok.save_pretrained(str(model_dir))
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )  # fmt: skip
    LlamaForCausalLM(cfg).save_pretrained(str(model_dir), safe_serialization=True)
    result = _train(tmp_path, "model.source=path", f"model.path={model_dir}", "model.max_length=300", name="spm")
    assert result.exit_code == 0, result.output
    readout = json.loads((tmp_path / "spm" / "readout.json").read_text())
    assert readout["answer_tokens"][:4] == ["\u2581A", "\u2581B", "\u2581C", "\u2581D"]


def test_case06_26_choices_with_the_bundled_tokenizer(tmp_path):
    result = _train(tmp_path, f"data.task=jsonl:{FIXTURES / 'choices_26.jsonl'}", "data.train_limit=null",
                    "data.val_limit=null", "data.eval_limit=null", "method=polar_vbll",
                    "model.max_length=400", name="k26")  # fmt: skip
    assert result.exit_code == 0, result.output
    readout = json.loads((tmp_path / "k26" / "readout.json").read_text())
    assert readout["num_classes"] == 26 and readout["answer_tokens"][:2] == ["\u0120A", "\u0120B"]


# --------------------------------------------------------------------- case 07: prompts silently cut
def test_case07_shortened_prompts_are_counted_in_the_results(tmp_path):
    rows = [json.loads(line) for line in (FIXTURES / "long_prompts.jsonl").read_text().splitlines()]
    data = tmp_path / "long.jsonl"  # eight copies of the case's three rows, so every split holds some
    data.write_text("\n".join(json.dumps({**r, "id": f"{r['id']}-{i}"}) for i in range(8) for r in rows))
    with pytest.warns(UserWarning, match="question of .* prompt"):
        result = _train(tmp_path, f"data.task=jsonl:{data}", "data.train_limit=null", "data.val_limit=null",
                        "data.eval_limit=null", name="long")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "prompts shortened to fit model.max_length=128" in result.output
    shortened = json.loads((tmp_path / "long" / "results.json").read_text())["prompts_shortened"]
    assert sum(shortened[split]["question"] for split in shortened) >= 1


# ------------------------------------------------------------ case 15: run-time failures in one line
@pytest.mark.parametrize("setting", ["head.vbll.noise_init=1e-30", "head.fit.lr=1e8"])
def test_case15_a_diverging_head_fit_is_one_line(tmp_path, setting):
    """The case's settings with the Adam eta-phase (where a step count cannot back off) stop the run with
    one line; the default L-BFGS eta-phase (float64, a line search) recovers from both and trains."""
    result = _train(tmp_path, "method=polar_vbll", setting, "head.fit.optimizer=adam")
    _one_line_error(result, "the eta-phase (head refit 0) diverged", "lower head.fit.lr")
    result = _train(tmp_path, "method=polar_vbll", setting, name="lbfgs")
    assert result.exit_code == 0, result.output
    fits = json.loads((tmp_path / "lbfgs" / "results.json").read_text())["training"]["head_fits"]
    assert fits and all(f["converged"] or f["iterations"] > 0 for f in fits)


def test_case15_kind_a_later_refit_failure_leaves_the_last_checkpoint_intact(tmp_path):
    from polar_vbll.checkpoint import list_checkpoints, load_checkpoint
    from polar_vbll.errors import HeadFitDiverged

    from .test_alternating import _vbll_setup

    trainer = _vbll_setup(tmp_path, steps=6, round_steps=2, checkpoint_every=1)
    inner = trainer.coordinator.inner
    inner.cfg = inner.cfg.model_copy(update={"optimizer": "adam"})  # a step count that cannot back off
    for _ in range(2):
        trainer.train_step()
    trainer.save()
    good = list_checkpoints(trainer.store.run_dir)
    for group in trainer.coordinator.inner.optimizer.param_groups:
        group["lr"] = 1e30  # the next refit (round 2) explodes
    with pytest.raises(HeadFitDiverged, match="head refit 1"):
        trainer.train_step()
    assert list_checkpoints(trainer.store.run_dir) == good
    assert load_checkpoint(good[-1])["step"] == 2


def test_case15_kind_out_of_memory_is_one_line(tmp_path, monkeypatch):
    import torch

    import polar_vbll.runner

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(polar_vbll.runner, "run_method", oom)
    _one_line_error(_train(tmp_path), "out of accelerator memory", "train.batch_size")


# --------------------------------------------------- item 7: bad input caught early, nothing overwritten
@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        pytest.param(["--workers", "2", "--zero-stage", "5"], "zero_stage", marks=WORKERS),
        pytest.param(["--workers", "-1"], "workers", marks=WORKERS),
        (["--zero-stage", "0"], "--zero-stage needs --workers"),  # never silently ignored
    ],
)
def test_bad_distributed_settings_are_one_line(tmp_path, args, fragment):
    result = runner.invoke(app, ["train", "--config", "tiny", "--no-track", "--set", f"output_dir={tmp_path}", *args])
    _one_line_error(result, fragment)
    assert not (tmp_path / "tiny").exists()


def test_an_output_dir_that_is_a_file_is_refused_before_any_work(tmp_path):
    taken = tmp_path / "file"
    taken.write_text("x")
    _one_line_error(_train(taken), "is an existing file, not a folder")
    compare = {"name": "c", "output_dir": str(taken), "tasks": ["arc_easy"], "seeds": [0], "methods": ["zero_shot"],
               "base": {"model": {"source": "tiny"}}}  # fmt: skip
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(compare))
    result = runner.invoke(app, ["compare", "--config", str(tmp_path / "c.yaml"), "--no-track"])
    _one_line_error(result, "is an existing file, not a folder")


@pytest.mark.parametrize("task", ["arc_medium", "jsonl"])
def test_bad_data_is_reported_before_the_model_loads(tmp_path, monkeypatch, task):
    import polar_vbll.session

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr(polar_vbll.session, "load_backbone", no_model)
    if task == "jsonl":
        bad = tmp_path / "bad.jsonl"
        bad.write_text('{"question": "q", "choices": ["a", "b"], "answer": 0}\n{"question": "q", "choices": ["a"]}\n')
        task = f"jsonl:{bad}"
    result = _train(tmp_path, f"data.task={task}")
    _one_line_error(result, "arc_medium" if "medium" in task else "bad.jsonl")


def test_an_over_long_jsonl_row_is_refused_naming_its_line(tmp_path):
    from polar_vbll.tasks.jsonl import MAX_ROW_BYTES

    row = {"question": "q" * (MAX_ROW_BYTES + 10), "choices": ["a", "b"], "answer": 0}
    data = tmp_path / "big.jsonl"
    data.write_text(json.dumps({"question": "ok?", "choices": ["a", "b"], "answer": 0}) + "\n" + json.dumps(row) + "\n")
    result = _train(tmp_path, f"data.task=jsonl:{data}")
    _one_line_error(result, "big.jsonl, line 2: longer than 1,048,576 bytes")


def test_case06_kind_a_reload_with_a_tokenizer_that_reads_other_letters_is_refused(tmp_path):
    """The same kind on reload: the answer tokens come from the run folder, and a tokenizer that would map
    the letters to other tokens (another model's) is refused instead of silently reading wrong logits."""
    from transformers import AutoTokenizer

    from polar_vbll.readout import Readout, check_readout
    from polar_vbll.tasks import TEMPLATE_VERSION

    tok = AutoTokenizer.from_pretrained(str(FIXTURES / "llama2_style_tokenizer"))
    bundled = Readout(TEMPLATE_VERSION, 2, ["A", "B"], [330, 389], ["\u0120A", "\u0120B"], 300, False)
    with pytest.raises(Exception, match=r"maps the answer letters \['A', 'B'\] to token ids"):
        check_readout(bundled, tok, "runs/x")
    old = Readout(TEMPLATE_VERSION - 1, 2, ["A", "B"], [330, 389], ["\u0120A", "\u0120B"], 300, False)
    with pytest.raises(Exception, match="prompt template version"):
        check_readout(old, tok, "runs/x")


def test_case15_kind_non_finite_predictions_and_laplace_features_are_run_failures():
    import torch

    from polar_vbll.config import RunConfig
    from polar_vbll.errors import HeadFitDiverged, RunFailure
    from polar_vbll.evaluation import Member, evaluate
    from polar_vbll.features import EncodedSplit
    from polar_vbll.heads import DeterministicHead
    from polar_vbll.methods import HEADS

    enc = EncodedSplit("s", [[1, 2], [3]], torch.tensor([0, 1]), torch.tensor([2, 2]))

    class NanFeatures:
        model = torch.nn.Identity()

        def prepare(self, *a, **k):
            pass

        def split_features(self, enc, batch_size, progress=False):
            return torch.full((len(enc), 4), float("nan"))

    head = DeterministicHead(torch.randn(2, 4))
    splits = {"train": enc, "validation": enc, "eval": enc}
    with pytest.raises(RunFailure, match="predictions on the validation split are not finite"):
        evaluate(RunConfig(), NanFeatures(), None, [Member(head)], splits, progress=False)
    with pytest.raises(HeadFitDiverged, match="training features are not finite"):
        HEADS["laplace"].posthoc(RunConfig(method="laplace"), head, torch.full((2, 4), float("nan")),
                                 enc.labels, enc.n_choices)  # fmt: skip


# --------------------------------------- found by a newcomer's trial: the same kinds, further places
def test_a_run_and_a_comparison_never_share_a_folder(tmp_path):
    assert _compare(tmp_path).exit_code == 0  # the comparison folder is <tmp>/cmp
    result = _train(tmp_path, name="cmp")
    _one_line_error(result, "already holds a comparison (compare_config.json)")
    assert _train(tmp_path, name="solo").exit_code == 0
    cfg = yaml.safe_load((tmp_path / "c.yaml").read_text())
    (tmp_path / "c2.yaml").write_text(yaml.safe_dump({**cfg, "name": "solo"}))
    result = runner.invoke(app, ["compare", "--config", str(tmp_path / "c2.yaml"), "--no-track"])
    _one_line_error(result, "already holds a run (params.json)")


def test_a_record_is_reused_only_while_its_run_folder_holds_that_run(tmp_path):
    """Settings A, then B (which overwrites the run folders), then A again: A is not taken from the
    records, since its folders now hold B's runs; the table and the folders agree."""
    assert _compare(tmp_path).exit_code == 0
    assert _compare(tmp_path, "base.train.steps=4").exit_code == 0
    again = _compare(tmp_path)
    assert again.exit_code == 0, again.output
    assert "PoLAR-MLE / seed 0: its run folder" in again.output and "now holds another run" in again.output
    results = json.loads((tmp_path / "cmp" / "arc_easy" / "polar_mle" / "seed0" / "results.json").read_text())
    assert results["training"]["steps"] == 2


def test_an_edited_data_file_is_not_resumed_over(tmp_path):
    rows = [{"question": f"Is {i} even?", "choices": ["yes", "no"], "answer": i % 2} for i in range(20)]
    data = tmp_path / "mine.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    sets = (f"data.task=jsonl:{data}", "data.train_limit=null", "data.val_limit=null", "data.eval_limit=null")
    assert _train(tmp_path, *sets).exit_code == 0
    more = [{"question": f"Is {i} odd?", "choices": ["yes", "no"], "answer": (i + 1) % 2} for i in range(10)]
    data.write_text("\n".join(json.dumps(r) for r in rows + more) + "\n")
    _one_line_error(_train(tmp_path, *sets), "the training data changed since the checkpoint")


def test_a_relative_data_path_is_recorded_absolute(tmp_path, monkeypatch):
    rows = [{"question": f"Is {i} even?", "choices": ["yes", "no"], "answer": i % 2} for i in range(20)]
    (tmp_path / "mine.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    monkeypatch.chdir(tmp_path)
    assert _train(tmp_path, "data.task=jsonl:mine.jsonl", "data.train_limit=null", "data.val_limit=null",
                  "data.eval_limit=null", name="rel").exit_code == 0  # fmt: skip
    assert yaml.safe_load((tmp_path / "rel" / "config.yaml").read_text())["data"]["task"] == (
        f"jsonl:{tmp_path / 'mine.jsonl'}"
    )
    monkeypatch.chdir("/")
    assert runner.invoke(app, ["eval", str(tmp_path / "rel"), "--no-progress"]).exit_code == 0


def test_a_wrong_task_is_named_even_where_a_run_exists(tmp_path):
    assert _train(tmp_path).exit_code == 0
    _one_line_error(_train(tmp_path, "data.task=arc_eazy"), "unknown task 'arc_eazy'")


def test_eval_on_another_task_reports_no_validation_of_the_runs_own(tmp_path):
    assert _train(tmp_path).exit_code == 0
    result = runner.invoke(app, ["eval", str(tmp_path / "tiny"), "--task", "openbookqa", "--limit", "8"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.output[result.output.index("{") :])
    assert metrics["validation"] is None and metrics["eval"]["n"] == 8


@pytest.mark.extras("mlflow")
def test_no_resume_starts_a_new_mlflow_run_and_a_resume_continues_the_same(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from polar_vbll.tracking import local_store

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    args = ["train", "--config", "tiny", "--no-progress", "--set", f"output_dir={tmp_path}"]
    assert runner.invoke(app, args).exit_code == 0
    assert runner.invoke(app, args).exit_code == 0  # resumes: the same MLflow run
    client = MlflowClient(local_store(tmp_path / "tiny")[0])
    exp = client.get_experiment_by_name("polar-vbll-runs").experiment_id
    assert len(client.search_runs([exp])) == 1
    assert runner.invoke(app, [*args, "--no-resume", "--set", "train.steps=8"]).exit_code == 0
    runs = client.search_runs([exp])
    assert len(runs) == 2 and {r.data.params["train.steps"] for r in runs} == {"6", "8"}


@pytest.mark.extras("mlflow")
def test_opening_a_fresh_mlflow_store_logs_no_info_lines(tmp_path):
    """mlflow sets its own logger to INFO when first imported, so quieting it before the import did
    nothing ("Creating initial MLflow database tables..." in every run's log). A fresh process, as a user
    runs it: the first store opened prints no INFO line."""
    import subprocess
    import sys

    code = (
        "import pathlib, sys; from polar_vbll import tracking; "
        "uri, _ = tracking.local_store(pathlib.Path(sys.argv[1])); "
        "tracking.client_for(uri).search_experiments()"
    )
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "mlflow" / "mlflow.db").is_file()
    assert " INFO " not in done.stderr + done.stdout, done.stderr
