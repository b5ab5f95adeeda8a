import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import taq  # noqa: F401
import mlx.core as mx
from taq.pocket.text_encoder import (
    BOS,
    EOS,
    PAD,
    SPECIAL_TOKENS,
    UNK,
    TextEncoder,
    TextEncoderConfig,
    Tokenizer,
    build_vocab,
    pocket_text_encoder_config,
    split_words,
)

VOCAB = build_vocab(["a handwritten digit seven", "the number 7"])


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer(VOCAB, max_length=8)


@pytest.fixture(scope="module")
def small_encoder():
    mx.random.seed(0)
    return TextEncoder(TextEncoderConfig(vocab=VOCAB, max_length=8, dim=16, num_heads=2, pooled_dim=8))


def ids_of(tokenizer, *tokens):
    return [tokenizer.ids[t] for t in tokens]


# --------------------------------------------------------------------------- tokenizer


def test_words_are_lowercase_runs_of_letters_and_digits():
    assert split_words("The  number-7, written BY hand!") == ["the", "number", "7", "written", "by", "hand"]
    assert split_words("") == [] and split_words(" ,.;") == []


def test_vocab_starts_with_the_special_tokens_then_sorted_words():
    assert VOCAB[:4] == SPECIAL_TOKENS == (PAD, BOS, EOS, UNK)
    assert list(VOCAB[4:]) == sorted(["7", "a", "digit", "handwritten", "number", "seven", "the"])


def test_prompt_is_bos_words_eos_then_pads(tokenizer):
    ids = tokenizer(["The number 7"])
    assert ids.shape == (1, 8) and ids.dtype == np.int32
    assert ids[0].tolist() == ids_of(tokenizer, BOS, "the", "number", "7", EOS, PAD, PAD, PAD)


def test_empty_prompt_is_bos_eos_and_pads(tokenizer):
    assert tokenizer([""])[0].tolist() == ids_of(tokenizer, BOS, EOS) + [tokenizer.pad_id] * 6


def test_unknown_words_become_unk(tokenizer):
    assert tokenizer(["a scribbled 7"])[0, :5].tolist() == ids_of(tokenizer, BOS, "a", UNK, "7", EOS)


def test_long_prompts_are_truncated_and_still_end_with_eos(tokenizer):
    ids = tokenizer(["a digit seven a digit seven a digit seven"])[0]
    assert ids.tolist() == ids_of(tokenizer, BOS, "a", "digit", "seven", "a", "digit", "seven", EOS)


def test_a_single_string_or_non_string_prompt_is_refused(tokenizer):
    with pytest.raises(ValueError, match="list of prompts"):
        tokenizer("the number 7")
    with pytest.raises(ValueError, match="prompts must be strings"):
        tokenizer([7])


# --------------------------------------------------------------------------- config


def test_config_round_trips_through_json_with_its_vocab():
    cfg = pocket_text_encoder_config()
    assert TextEncoderConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert (cfg.max_length, cfg.token_dim, cfg.pooled_dim, cfg.num_layers, cfg.num_heads) == (16, 64, 32, 2, 2)


@pytest.mark.parametrize("bad, message", [
    (dict(vocab=("a", "b")), "vocab must start with"),
    (dict(vocab=VOCAB + ("a",)), "duplicate"),
    (dict(vocab=VOCAB, dim=30, num_heads=4), "not divisible"),
    (dict(vocab=VOCAB, max_length=1), "max_length"),
    (dict(vocab=VOCAB, pooled_dim=0), "pooled_dim"),
])
def test_bad_configs_are_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        TextEncoderConfig(**bad)


def test_unknown_config_fields_are_refused():
    with pytest.raises(ValueError, match="unknown TextEncoderConfig fields"):
        TextEncoderConfig.from_dict({"vocab": list(VOCAB), "width": 3})


# --------------------------------------------------------------------------- encoder


def test_pocket_encoder_gives_sd3s_two_inputs_at_the_pocket_mmdit_sizes():
    from taq.config import get_preset

    mmdit = get_preset("pocket").mmdit
    mx.random.seed(0)
    tokens, pooled = TextEncoder(pocket_text_encoder_config()).encode(["a scribbled seven", "", "handwritten 3"])
    assert tokens.shape == (3, 16, mmdit.token_dim) and pooled.shape == (3, mmdit.pooled_dim)
    assert tokens.dtype == pooled.dtype == mx.float32


@given(length=st.integers(2, 8), seed=st.integers(0, 2**16))
@settings(max_examples=25, deadline=None)
def test_pads_change_neither_pooled_nor_the_real_tokens(small_encoder, length, seed):
    rng = np.random.default_rng(seed)
    real = np.concatenate([[1], rng.integers(3, len(VOCAB), size=length - 2), [2]]).astype(np.int32)  # bos..eos
    padded = np.zeros(8, np.int32)
    padded[:length] = real
    tokens_short, pooled_short = small_encoder(mx.array(real[None]))
    tokens_long, pooled_long = small_encoder(mx.array(padded[None]))
    np.testing.assert_allclose(np.array(pooled_long), np.array(pooled_short), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.array(tokens_long[:, :length]), np.array(tokens_short), rtol=1e-5, atol=1e-6)


def test_a_prompt_encodes_the_same_alone_or_beside_others(small_encoder):
    alone = small_encoder.encode(["the number 7"])
    batched = small_encoder.encode(["a handwritten digit seven seven", "the number 7", ""])
    np.testing.assert_allclose(np.array(batched[1][1]), np.array(alone[1][0]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.array(batched[0][1]), np.array(alone[0][0]), rtol=1e-5, atol=1e-6)


def test_different_prompts_give_different_pooled_embeddings(small_encoder):
    pooled = np.array(small_encoder.encode(["the number 7", "a handwritten digit seven", ""])[1])
    assert min(np.abs(pooled[i] - pooled[j]).max() for i, j in [(0, 1), (0, 2), (1, 2)]) > 1e-3


def test_encoder_is_deterministic_given_the_seed():
    cfg = TextEncoderConfig(vocab=VOCAB, max_length=8, dim=16, num_heads=2, pooled_dim=8)

    def pooled_with_seed(seed):
        mx.random.seed(seed)
        return np.array(TextEncoder(cfg).encode(["the number 7", ""])[1])

    np.testing.assert_array_equal(pooled_with_seed(3), pooled_with_seed(3))
    assert np.abs(pooled_with_seed(3) - pooled_with_seed(4)).max() > 1e-3


@pytest.mark.parametrize("shape", [(8,), (2, 9), (2, 0)])
def test_ids_of_the_wrong_shape_are_refused(small_encoder, shape):
    with pytest.raises(ValueError, match="ids must be"):
        small_encoder(mx.zeros(shape, dtype=mx.int32))


def test_prompts_without_a_known_word_are_named_in_a_warning(small_encoder):
    unconditional = np.array(small_encoder.encode([""])[1])
    with pytest.warns(UserWarning, match=r"knows no word of 3 prompt\(s\).*'写一个七', '🙂', 'hello world'") as caught:
        _, pooled = small_encoder.encode(["写一个七", "🙂", "hello world", "a handwritten digit seven", ""])
    assert len(caught) == 1
    # As if "": within float32 rounding (BLAS may round a 5-row product differently from a 1-row one).
    np.testing.assert_allclose(np.array(pooled[:2]), np.repeat(unconditional, 2, axis=0), rtol=1e-5, atol=1e-6)
    assert not np.array_equal(np.array(pooled[3]), unconditional[0])


def test_known_prompts_and_the_unconditional_one_encode_without_a_warning(small_encoder, recwarn):
    small_encoder.encode(["", "the number 7", "A HANDWRITTEN digit, seven!"])
    assert not recwarn.list
