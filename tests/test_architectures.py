"""Any Hugging Face causal LM: random-weight models of every family built from transformers configs, each
trained 2 steps with ``polar_vbll`` and ``lora_mle`` on its default targets (the cheap path on: one adapted
block over cached frozen-prefix states) and evaluated on the test split, its PEFT export loaded by
``PeftModel.from_pretrained`` with the logits of our adapted model, and the PoLAR-VBLL run reloaded from its
folder to predict. One family of each structure runs by default; ``-m slow`` runs every family the issue
names and every other family in peft's mapping that this transformers ships. Also: what each architecture
gets adapted by default, refused architectures, and a run refused before it writes anything."""

from __future__ import annotations

import contextlib
import json
import warnings
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from polar_vbll.methods import ADAPTERS
from polar_vbll_cli.app import app

runner = CliRunner()

#: model_type -> config values beyond the shared tiny shape (what that family's config needs to be tiny).
#: The default suite runs one family of each structure; Mistral, Qwen2 and Qwen3 (Llama's structure, names and
#: kernels) run with the other families under ``-m slow``.
NAMED = {"llama": {}, "gemma": {}, "gemma2": {}, "phi3": {}, "gpt2": {}, "gpt_neox": {}, "opt": {}}
OTHERS = {"mistral": {}, "qwen2": {}, "qwen3": {},
          "bloom": {}, "falcon": {}, "gptj": {"rotary_dim": 4}, "gpt_bigcode": {}, "codegen": {"rotary_dim": 4},
          "mpt": {}, "mixtral": {}, "stablelm": {}, "phi": {}, "gemma3_text": {}, "llama4_text": {},
          "gpt_neo": {"attention_types": [[["global", "local"], 1]], "num_layers": 2},
          "bert": {"is_decoder": True}, "roberta": {"is_decoder": True}, "xlm-roberta": {"is_decoder": True},
          "electra": {"is_decoder": True}, "nemotron_h": {}}  # fmt: skip
#: What ``target_modules: auto`` adapts, per family (the PoLAR setting: attention inputs, MLP up and down).
EXPECTED_TARGETS = {
    "llama": ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"],
    "gemma2": ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"],
    "phi3": ["qkv_proj", "gate_up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_fc", "mlp.c_proj"],
    "gpt_neox": ["query_key_value", "dense_h_to_4h", "dense_4h_to_h"],
    "opt": ["q_proj", "k_proj", "v_proj", "fc1", "fc2"],
    "bloom": ["query_key_value", "dense_h_to_4h", "dense_4h_to_h"],
    "mixtral": ["q_proj", "k_proj", "v_proj"],  # the experts are fused tensors, not linear layers
}
HIDDEN = 32


def tiny_config(model_type: str, vocab: int, **extra):
    """A tiny config of ``model_type`` (hidden 32, 2 blocks, 4 heads), special token ids inside ``vocab``."""
    from transformers import AutoConfig

    cfg = AutoConfig.for_model(model_type, vocab_size=vocab, hidden_size=HIDDEN, num_hidden_layers=2,
                               num_attention_heads=4, intermediate_size=2 * HIDDEN, max_position_embeddings=256,
                               tie_word_embeddings=True, **extra)  # fmt: skip
    shape = {"num_key_value_heads": 2, "head_dim": HIDDEN // 4, "n_inner": 2 * HIDDEN, "ffn_dim": 2 * HIDDEN,
             "n_positions": 256, "word_embed_proj_dim": HIDDEN, "d_model": HIDDEN, "embedding_size": HIDDEN,
             "num_kv_heads": 2}  # fmt: skip
    for key, value in shape.items():
        if hasattr(cfg, key):
            with contextlib.suppress(AttributeError):  # a derived value (Falcon's head_dim) has no setter
                setattr(cfg, key, value)
    for key in ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id"):
        if isinstance(getattr(cfg, key, None), int) and getattr(cfg, key) >= vocab:
            setattr(cfg, key, 0)
    return cfg


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from polar_vbll.models import bundled_tokenizer_dir

    return AutoTokenizer.from_pretrained(str(bundled_tokenizer_dir()))


def build(model_type: str, folder: Path, tokenizer, **extra) -> Path:
    """A random-weight model of ``model_type`` saved (safetensors) with the bundled tokenizer in ``folder``."""
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(tiny_config(model_type, len(tokenizer), **extra))
        model.save_pretrained(str(folder), safe_serialization=True)
    tokenizer.save_pretrained(str(folder))
    return folder


def _train(out: Path, model: Path, name: str, method: str, *extra: str):
    return runner.invoke(app, [
        "train", "--config", "tiny", "--no-progress", "--no-track", "--set", f"output_dir={out}", "--set",
        f"name={name}", "--set", "model.source=path", "--set", f"model.path={model}", "--set", f"method={method}",
        "--set", "train.steps=2", "--set", "data.train_limit=8", "--set", "data.val_limit=8", "--set",
        "data.eval_limit=8", *extra])  # fmt: skip


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float()


def _fresh(folder: Path):
    from transformers import AutoModelForCausalLM

    from polar_vbll.models import ATTENTION

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            model = AutoModelForCausalLM.from_pretrained(str(folder), attn_implementation=ATTENTION)
        except ValueError:  # no SDPA in this architecture (polar_vbll.models.attention_for)
            model = AutoModelForCausalLM.from_pretrained(str(folder), attn_implementation="eager")
    return model.eval()


def check_family(model_type: str, extra: dict, tmp_path: Path, tokenizer) -> None:
    from peft import PeftModel

    from polar_vbll.predictor import Predictor
    from polar_vbll.tasks import MCExample

    folder = build(model_type, tmp_path / model_type, tokenizer, **extra)
    ids = torch.randint(0, len(tokenizer), (2, 9), generator=torch.Generator().manual_seed(1))
    for method, kind in (("polar_vbll", "polar"), ("lora_mle", "lora")):
        result = _train(tmp_path / "runs", folder, f"{model_type}-{method}", method)
        assert result.exit_code == 0, (model_type, method, result.output[-2000:], result.exception)
        assert "does not reproduce" not in result.output  # the cheap path held on this architecture
        run = tmp_path / "runs" / f"{model_type}-{method}"
        results = json.loads((run / "results.json").read_text())
        assert results["metrics"]["eval"]["n"] == 8, results["metrics"]  # evaluated on the test split

        # the PEFT export: peft loads it, and its logits are ours
        ours = ADAPTERS[kind].load(_fresh(folder), run / "adapter")
        theirs = PeftModel.from_pretrained(_fresh(folder), str(run / "adapter_peft")).eval()
        torch.testing.assert_close(_logits(theirs, ids), _logits(ours.base_model, ids), rtol=1e-4, atol=1e-4)
        # the trained adapter moved the logits: the comparison is not of two base models
        assert (_logits(_fresh(folder), ids) - _logits(ours.base_model, ids)).abs().max() > 0

    # the PoLAR-VBLL run reloads from its folder alone and predicts
    predictor = Predictor.from_run(tmp_path / "runs" / f"{model_type}-polar_vbll", need_rule=False)
    q = MCExample(uid="q1", question="Which is a color?", choices=("red", "seven", "fast"), answer=0, source="test")
    probs = predictor.predictive([q])[0].probs
    assert probs.shape[0] == 1 and abs(float(probs[0].sum()) - 1.0) < 1e-5


@pytest.mark.parametrize("model_type", sorted(NAMED))
def test_named_families_train_export_and_predict(model_type, tmp_path, tokenizer):
    check_family(model_type, NAMED[model_type], tmp_path, tokenizer)


@pytest.mark.slow
@pytest.mark.parametrize("model_type", sorted(OTHERS))
def test_other_families_in_peft_mapping(model_type, tmp_path, tokenizer):
    check_family(model_type, OTHERS[model_type], tmp_path, tokenizer)


@pytest.mark.parametrize("model_type", sorted(EXPECTED_TARGETS))
def test_default_targets_per_architecture(model_type):
    from transformers import AutoModelForCausalLM

    from polar_vbll.architecture import default_target_modules

    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(tiny_config(model_type, 256))
    assert default_target_modules(model) == EXPECTED_TARGETS[model_type]


def test_conv1d_layers_are_adapted_and_merge_exactly(tokenizer):
    """GPT-2's Conv1D stores its weight (in, out): the adapter reads it so, and merging adds the transposed
    delta (the merged model computes what the adapted one does)."""
    from transformers import AutoModelForCausalLM

    from polar_vbll.adapters import PolarConfig, inject_polar

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("gpt2", 128)).eval()
    polar = inject_polar(model, PolarConfig(r=4))
    with torch.no_grad():
        for _, layer in polar.polar_layers():
            layer.polar_theta.normal_(0, 0.5)
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(0))
    adapted = _logits(model, ids)
    polar.merge()
    torch.testing.assert_close(_logits(model, ids), adapted, rtol=1e-5, atol=1e-5)
    polar.unmerge()
    assert {n.rsplit(".", 1)[-1] for n, _ in polar.polar_layers()} == {"c_attn", "c_fc", "c_proj"}


@pytest.mark.parametrize("model_type", ["bart"])
def test_a_decoder_whose_positions_ignore_padding_is_refused(model_type, tmp_path, tokenizer):
    """BART's decoder numbers positions from the first token, padding included, and takes no position ids:
    a left-padded prompt gets other features. Refused in one line."""
    folder = build(model_type, tmp_path / model_type, tokenizer)
    result = _train(tmp_path / "runs", folder, model_type, "polar_vbll")
    assert result.exit_code == 2 and "left-padded" in result.output and "Traceback" not in result.output


@pytest.mark.extras("mlflow")
def test_recurrent_model_without_a_mask_is_refused_and_the_failed_run_says_why(tmp_path, tokenizer, monkeypatch):
    """RWKV ignores the attention mask: refused in one line when it loads. The run's MLflow record, opened by
    then, is FAILED with the reason as a tag."""
    from mlflow.tracking import MlflowClient

    from polar_vbll.tracking import ERROR_TAG, local_store

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    folder = build("rwkv", tmp_path / "rwkv", tokenizer)
    result = _train(tmp_path / "runs", folder, "rwkv", "polar_vbll", "--track")
    assert result.exit_code == 2, result.output
    assert "ignores the attention mask" in result.output and "Traceback" not in result.output
    client = MlflowClient(local_store(tmp_path / "runs" / "rwkv")[0])
    (run,) = client.search_runs([client.get_experiment_by_name("polar-vbll-runs").experiment_id])
    assert run.info.status == "FAILED" and "ignores the attention mask" in run.data.tags[ERROR_TAG]


@pytest.mark.extras("mlflow")
def test_a_refused_architecture_writes_nothing(tmp_path, tokenizer):
    """Targets that match nothing are refused before a run folder or an MLflow run exists."""
    folder = build("gpt2", tmp_path / "gpt2", tokenizer)
    result = _train(tmp_path / "runs", folder, "bad", "polar_vbll", "--set", "polar.target_modules=[q_proj]",
                    "--track")  # the local MLflow store would live beside the run folder  # fmt: skip
    assert result.exit_code == 2 and "c_attn" in result.output, result.output
    assert not (tmp_path / "runs").exists()
    # the same refusal for a comparison, whose LoRA runs select layers too
    result = runner.invoke(app, [
        "compare", "--config", "tiny", "--no-progress", "--track", "--set", f"output_dir={tmp_path / 'runs'}",
        "--set", "base.model.source=path", "--set", f"base.model.path={folder}",
        "--set", "base.lora.target_modules=[q_proj]"])  # fmt: skip
    assert result.exit_code == 2 and "LoraConfig.target_modules" in result.output, result.output
    assert not (tmp_path / "runs").exists()
