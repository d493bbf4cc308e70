"""Backbone loading and feature extraction: last-token features under either padding, the cached-prefix
path against the full model, and clear errors for bad model paths."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from polar_vbll.backbone import SplitDecoder, last_token_features, last_token_index
from polar_vbll.config import ModelConfig
from polar_vbll.errors import ModelLoadError, UserInputError
from polar_vbll.models import load_backbone
from polar_vbll.tokens import answer_token_ids, pad_batch, tokenize_prompts

SEQS = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [20, 21, 22, 23]]


def _unpadded_reference(model) -> torch.Tensor:
    """Each prompt alone, no padding, through the *whole* CausalLM; the last position's hidden state."""
    rows = []
    for s in SEQS:
        ids = torch.tensor([s])
        out = model(input_ids=ids, output_hidden_states=True)
        rows.append(out.hidden_states[-1][0, -1])
    return torch.stack(rows)


def test_last_token_index_left_and_right():
    _, left = pad_batch(SEQS, 0, "left")
    _, right = pad_batch(SEQS, 0, "right")
    assert last_token_index(left).tolist() == [5, 5, 5]
    assert last_token_index(right).tolist() == [5, 2, 3]


@pytest.mark.parametrize("side", ["left", "right"])
def test_features_are_padding_invariant(tiny_llama, side):
    ref = _unpadded_reference(tiny_llama)
    ids, mask = pad_batch(SEQS, 0, side)
    with torch.no_grad():
        phi = last_token_features(tiny_llama, ids, mask)
    torch.testing.assert_close(phi, ref, atol=1e-5, rtol=1e-5)


def test_right_padding_position_minus_one_is_wrong(tiny_llama):
    """Guards the trap named in method.md: index -1 of a right-padded batch is a pad token."""
    ref = _unpadded_reference(tiny_llama)
    ids, mask = pad_batch(SEQS, 0, "right")
    with torch.no_grad():
        hidden = tiny_llama(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
    assert not torch.allclose(hidden[1, -1], ref[1], atol=1e-3)


@pytest.mark.parametrize("split", [0, 1])
def test_cached_prefix_equals_full_model(tiny_llama, split):
    ref = _unpadded_reference(tiny_llama)
    ids, mask = pad_batch(SEQS, 0, "left")
    sd = SplitDecoder(tiny_llama, split)
    states = sd.prefix_states(ids, mask)
    # the cache stores real positions only: pad positions arrive as zeros
    states = states.masked_fill(~mask.bool().unsqueeze(-1), 0.0).requires_grad_(True)
    phi = sd.features(states, mask)
    torch.testing.assert_close(phi, ref, atol=1e-5, rtol=1e-5)
    phi.square().sum().backward()
    assert torch.isfinite(states.grad).all()


def test_split_views_share_modules(tiny_llama):
    sd = SplitDecoder(tiny_llama, 1)
    blocks = tiny_llama.model.layers
    assert sd.prefix.layers[0] is blocks[0] and sd.suffix.layers[1]._block is blocks[1]
    assert len(sd.prefix.layers) == len(sd.suffix.layers) == 2  # same length: per-block lookups stay aligned
    assert all(isinstance(b, type(blocks[0])) for b in tiny_llama.model.layers)  # the decoder is untouched
    with pytest.raises(UserInputError, match="outside 0..1"):
        SplitDecoder(tiny_llama, 2)


def test_missing_model_path_is_clear(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_backbone(ModelConfig(source="path", path=str(tmp_path / "nope")))


def test_empty_model_dir_is_clear(tmp_path):
    with pytest.raises(ModelLoadError, match="config.json is missing"):
        load_backbone(ModelConfig(source="path", path=str(tmp_path)))


def test_pickled_weights_are_refused(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ModelLoadError, match="safetensors"):
        load_backbone(ModelConfig(source="path", path=str(tmp_path)))


def test_local_hf_dir_round_trip(tmp_path, tiny_llama):
    """A saved HF directory loads through source=path and gives the same features."""
    from polar_vbll.models import bundled_tokenizer_dir, load_tokenizer

    tok = load_tokenizer(ModelConfig(source="tiny"))
    tiny_llama.save_pretrained(str(tmp_path), safe_serialization=True)
    tok.save_pretrained(str(tmp_path))
    model, tok2 = load_backbone(ModelConfig(source="path", path=str(tmp_path)))
    ids, mask = pad_batch(SEQS, 0, "left")
    with torch.no_grad():
        torch.testing.assert_close(
            last_token_features(model, ids, mask), last_token_features(tiny_llama, ids, mask)
        )
    assert tok2.padding_side == "left"
    assert bundled_tokenizer_dir().is_dir()


def test_tokenize_bos_and_no_silent_cut():
    from polar_vbll.errors import DataError
    from polar_vbll.models import load_tokenizer

    tok = load_tokenizer(ModelConfig(source="tiny"))
    plain = tokenize_prompts(tok, ["Question: why?\nAnswer:"], max_length=300, add_bos=False).ids[0]
    with_bos = tokenize_prompts(tok, ["Question: why?\nAnswer:"], max_length=300, add_bos=True).ids[0]
    assert with_bos == [tok.bos_token_id, *plain]
    assert plain[0] != tok.bos_token_id
    with pytest.raises(DataError, match="prompt 0 is .* tokens, more than model.max_length=4"):
        tokenize_prompts(tok, ["Question: why?\nAnswer:"], max_length=4, add_bos=True)  # never cut silently


def _encoded_text(tok, example, max_length):
    from polar_vbll.features import encode_examples

    enc = encode_examples("t", [example], tok, max_length=max_length, add_bos=False)
    return tok.decode(enc.ids[0]), len(enc.ids[0]), enc.shortened


def test_long_context_is_cut_not_the_question():
    from polar_vbll.models import load_tokenizer
    from polar_vbll.tasks import MCExample

    tok = load_tokenizer(ModelConfig(source="tiny"))
    ex = MCExample(uid="u", question="why?", choices=("yes", "no"), answer=0, source="t", context="word " * 400)
    text, n, shortened = _encoded_text(tok, ex, 60)
    assert n <= 60 and shortened == {"passage": 1, "choices": 0, "question": 0}
    assert text.startswith("Return the label") and text.endswith("Question: why?\nChoices:\nA) yes\nB) no\nAnswer:")
    assert "word word...\nQuestion:" in text  # cut at its end, marked
    short = MCExample(uid="u", question="why?", choices=("yes", "no"), answer=0, source="t", context="word")
    assert _encoded_text(tok, short, 60)[0].endswith("Passage: word\nQuestion: why?\nChoices:\nA) yes\nB) no\nAnswer:")


@pytest.mark.parametrize(
    ("question", "choices", "context", "cut"),
    [
        ("filler " * 300 + "so which?", ("first", "second"), None, "question"),
        ("Short?", ("c " * 300, "short"), "p " * 300, "choices"),
    ],
)
def test_over_long_questions_and_choices_keep_every_label_and_the_cue(question, choices, context, cut):
    """The kind of fault behind case 07: whatever is long, the question line, every choice label and
    "Answer:" survive; what was cut is marked "..." and counted."""
    from polar_vbll.models import load_tokenizer
    from polar_vbll.tasks import MCExample

    tok = load_tokenizer(ModelConfig(source="tiny"))
    ex = MCExample(uid="long-1", question=question, choices=choices, answer=0, source="t", context=context)
    for max_length in (64, 128):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            text, n, shortened = _encoded_text(tok, ex, max_length)
        assert n <= max_length
        assert "\nQuestion: " in text and "\nA) " in text and "\nB) " in text and text.endswith("\nAnswer:")
        assert shortened[cut] == 1 and "..." in text
        named = [str(w.message) for w in caught if "question of 1 prompt" in str(w.message)]
        assert bool(named) == (cut == "question") and all("long-1" in m for m in named)
    if cut == "question":
        assert text.split("\nChoices:")[0].endswith("so which?")  # the question's own end is kept


def test_a_prompt_that_cannot_fit_is_refused_naming_the_example():
    from polar_vbll.errors import DataError
    from polar_vbll.models import load_tokenizer
    from polar_vbll.tasks import MCExample

    tok = load_tokenizer(ModelConfig(source="tiny"))
    ex = MCExample(uid="wide-1", question="q", choices=tuple(f"choice {i}" for i in range(26)), answer=0, source="t")
    with pytest.raises(DataError, match="wide-1.*raise model.max_length"):
        _encoded_text(tok, ex, 40)


def test_answer_tokens_are_single_tokens():
    from polar_vbll.models import load_tokenizer

    tok = load_tokenizer(ModelConfig(source="tiny"))
    ids = answer_token_ids(tok, [" A", " B", " C", " D", " E"])
    assert len(set(ids)) == 5
    assert [tok.decode([i]) for i in ids] == [" A", " B", " C", " D", " E"]
    assert answer_token_ids(tok, ["A", "B", "C", "D", "E"]) == ids  # with or without the space
    with pytest.raises(UserInputError, match="not one token"):
        answer_token_ids(tok, [" Antidisestablishmentarianism"])


FIXTURES = Path(__file__).parent / "fixtures"


def test_answer_letters_of_a_sentencepiece_tokenizer_are_read_from_the_prompts_end():
    """A Llama-2 / Mistral-style tokenizer (prefix-space normalizer): a lone " A" is two pieces, but the
    token after "Answer:" is the single piece "▁A", and that is the class token."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(FIXTURES / "llama2_style_tokenizer"))
    assert len(tok(" A", add_special_tokens=False)["input_ids"]) == 2  # why " A" alone cannot be used
    ids = answer_token_ids(tok, ["A", "B", "C", "D"])
    assert tok.convert_ids_to_tokens(ids) == ["\u2581A", "\u2581B", "\u2581C", "\u2581D"]
    prompt = tok("Question: q\nChoices:\nA) x\nB) y\nAnswer: B", add_special_tokens=False)["input_ids"]
    assert prompt[-1] == ids[1]  # exactly what the model reads after a real prompt


def test_a_local_load_prints_no_loading_bar_and_restores_the_setting(tmp_path, tiny_llama, capfd):
    """transformers' "Loading weights" bar ignored --no-progress and came once per run of a comparison
    (noise in every log); the load silences it for itself only and leaves the global setting as it was."""
    from transformers.utils import logging as hf_logging

    from polar_vbll.models import load_tokenizer

    tiny_llama.save_pretrained(str(tmp_path), safe_serialization=True)
    load_tokenizer(ModelConfig(source="tiny")).save_pretrained(str(tmp_path))
    was_on = hf_logging.is_progress_bar_enabled()
    capfd.readouterr()
    load_backbone(ModelConfig(source="path", path=str(tmp_path)))
    assert "Loading weights" not in capfd.readouterr().err
    assert hf_logging.is_progress_bar_enabled() == was_on
