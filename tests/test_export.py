"""``polar-vbll export RUN --merged DIR`` (polar_vbll.export): the merged backbone loads with
``AutoModelForCausalLM`` and its logits equal the adapted model's (a PoLAR run: tests/test_cli.py, on its
module's tiny run; a LoRA run here, slow); the PEFT export refuses what vLLM would mishandle."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from polar_vbll_cli.app import app

runner = CliRunner()


def assert_merged_logits_equal(run, dest):
    from transformers import AutoModelForCausalLM

    from polar_vbll.saved import check_run_folder, load_run

    result = runner.invoke(app, ["export", str(run), "--merged", str(dest)])
    assert result.exit_code == 0, result.output
    assert f"merged model: {dest.resolve()}" in result.output
    names = {p.name for p in dest.iterdir()}
    assert {"config.json", "model.safetensors", "head.safetensors", "readout.json", "tokenizer_config.json"} <= names
    assert not any(n.endswith((".bin", ".pt", ".pth")) for n in names)
    merged = AutoModelForCausalLM.from_pretrained(dest, torch_dtype=torch.float32).eval()
    assert not any("polar" in n or "lora" in n for n, _ in merged.named_parameters())
    loaded = load_run(check_run_folder(run), n_train=1, device="cpu")
    ids = loaded.tokenizer(["What is 2 + 2? Answer: A", "The sky is"], return_tensors="pt", padding=True)
    with torch.no_grad():
        want = loaded.adapter(**ids).logits
        got = merged(**ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert json.loads((dest / "readout.json").read_text()) == json.loads((run / "readout.json").read_text())
    return loaded


@pytest.mark.slow
def test_merged_export_of_a_lora_run_has_its_logits(tmp_path):
    result = runner.invoke(app, ["train", "--config", "tiny", "--no-progress", "--no-track",
                                 "--set", f"output_dir={tmp_path}", "--set", "method=lora_mle"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert_merged_logits_equal(tmp_path / "tiny", tmp_path / "merged")


def test_peft_export_refuses_an_lm_head_delta_or_no_module(tmp_path):
    from polar_vbll.adapters.model import check_peft_targets, inject_polar
    from polar_vbll.errors import UserInputError
    from tests.conftest import make_tiny_llama

    model = make_tiny_llama()
    check_peft_targets(model, ["model.layers.0.self_attn.q_proj"], "x")  # an ordinary target passes
    with pytest.raises(UserInputError, match=r"delta on the LM head \(lm_head\).*--merged"):
        check_peft_targets(model, ["model.layers.0.self_attn.q_proj", "lm_head"], "x")
    with pytest.raises(UserInputError, match="adapts no module"):
        check_peft_targets(model, [], "x")
    polar = inject_polar(model, {"r": 2, "target_modules": ["q_proj"]})
    polar.polar_layers = lambda: iter([("lm_head", None)])  # as if an adapter held an lm_head delta
    with pytest.raises(UserInputError, match="LM head"):
        polar.export_peft_lora(tmp_path / "peft")
    assert not (tmp_path / "peft").exists()
