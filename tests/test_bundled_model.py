"""The bundled SmolLM2: the cached safetensors conversion computes what the GGUF itself loads to."""

from __future__ import annotations

import torch

from polar_vbll.backbone import last_token_features
from polar_vbll.config import ModelConfig
from polar_vbll.models import bundled_gguf_path, load_backbone
from polar_vbll.tokens import answer_token_ids, pad_batch, tokenize_prompts


def test_converted_model_matches_the_gguf():
    from transformers import AutoModelForCausalLM

    model, tok = load_backbone(ModelConfig(source="smollm2"))
    assert type(model).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    gguf = bundled_gguf_path()
    reference = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    prompts = ["Question: Which is a planet?\nChoices:\nA) Mars\nB) The Moon\nAnswer:", "Hello there"]
    ids, mask = pad_batch(tokenize_prompts(tok, prompts, 300, add_bos=False).ids, tok.pad_token_id)
    with torch.no_grad():
        ours = last_token_features(model, ids, mask)
        ref = reference(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1][
            :, -1
        ]
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
    # the answer letters are single tokens of this tokenizer
    assert answer_token_ids(tok, ["A", "B", "C", "D", "E"]) == [330, 389, 340, 422, 414]  # unchanged ids
