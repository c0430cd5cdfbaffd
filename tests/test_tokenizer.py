"""The tokenizer's two promises (every digit its own token; the format tags single tokens) and a
lossless round trip, on a BPE trained here, in a second."""

from __future__ import annotations

import random

import pytest

from conftest import addition_texts, tiny_tokenizer
from mlflow_tunix.data import TAGS, TEMPLATE_SPECIAL_TOKENS
from mlflow_tunix.errors import ConfigError
from mlflow_tunix.tokenizer import EOS, PAD, SPECIAL_TOKENS, TokenizerConfig, load_tokenizer, train_tokenizer


def _digit_heavy_texts() -> list[str]:
    """Long numbers repeated many times: a byte-level BPE without digit splitting, trained on these
    with a vocabulary of 600, makes ~320 tokens that hold a digit and something else."""
    rng = random.Random(1)
    numbers = [str(rng.randint(10**5, 10**6)) for _ in range(50)]
    return addition_texts(1000) + [f"{n} + {n} = {2 * int(n)}" for n in numbers for _ in range(20)]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(_digit_heavy_texts(), TokenizerConfig(vocab_size=600))


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_no_token_in_the_vocabulary_holds_a_digit_with_anything_else(tokenizer):
    pieces = {tokenizer.convert_tokens_to_string([t]) for t in tokenizer.get_vocab()}
    merged = [p for p in pieces if len(p) > 1 and p not in SPECIAL_TOKENS]
    assert len(merged) >= 10  # BPE did merge ("at", "answ", "><", ...)...
    with_digits = sorted(p for p in pieces if any(c.isdigit() for c in p))
    assert with_digits == list("0123456789")  # ...but never a digit with anything


@pytest.mark.parametrize("text", ["31415926535897932384", "What is 1234 + 5678?", "x=007\n", "<answer>10000</answer>"])
def test_every_digit_is_one_token(tokenizer, text):
    pieces = [tokenizer.decode([i]) for i in _ids(tokenizer, text)]
    assert "".join(pieces) == text
    digits = [p for p in pieces if any(c.isdigit() for c in p)]
    assert digits == [c for c in text if c.isdigit()]  # one token per digit, in order


def test_tags_and_markers_are_single_special_tokens(tokenizer):
    ids = {}
    for tag in (PAD, EOS, *TAGS, *TEMPLATE_SPECIAL_TOKENS):
        (ids[tag],) = _ids(tokenizer, tag)  # alone: exactly one token
        assert tokenizer.convert_ids_to_tokens(ids[tag]) == tag
    assert len(set(ids.values())) == len(ids)
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id) == (ids[PAD], ids[EOS])
    # Glued to text on both sides, still one token each.
    text = "x<reasoning>a+b</reasoning><answer>12</answer>y"
    got = _ids(tokenizer, text)
    assert [i for i in got if i in ids.values()] == [ids[t] for t in TAGS]


@pytest.mark.parametrize("text", [
    "What is 12 + 7?\n<reasoning>2+7+0=9\n1+0+0=1</reasoning><answer>19</answer>",
    "  leading and trailing spaces  ",
    "tabs\tand\n\nblank lines\r\n",
    "École, naïve, straße, İstanbul",
    "北京 東京 서울 — “quotes” …",
    "emoji 🙂👍🏽 and a zero-width\u200bspace",
    "<start_of_turn>user\nHi?<end_of_turn>\n<start_of_turn>model\n<eos><pad>",
    "<answer> spaced </answer><answer>twice</answer>",
    "",
])
def test_decode_of_encode_is_the_text(tokenizer, text):
    assert tokenizer.decode(_ids(tokenizer, text)) == text


def test_a_saved_tokenizer_loads_to_the_same_ids(tmp_path):
    tokenizer = tiny_tokenizer()
    tokenizer.save_pretrained(tmp_path)
    loaded = load_tokenizer(tmp_path)
    for text in addition_texts(20, seed=9) + ["École 北京 🙂"]:
        assert _ids(loaded, text) == _ids(tokenizer, text)
    assert (loaded.pad_token_id, loaded.eos_token_id, len(loaded)) == (tokenizer.pad_token_id, tokenizer.eos_token_id,
                                                                       len(tokenizer))


def test_a_vocabulary_too_small_for_the_bytes_and_specials_is_a_config_error():
    smallest = 256 + len(SPECIAL_TOKENS)
    TokenizerConfig(vocab_size=smallest)
    with pytest.raises(ConfigError, match=f"tokenizer.vocab_size: {smallest - 1} is too small; "
                                          f"byte-level BPE needs at least {smallest}"):
        TokenizerConfig(vocab_size=smallest - 1)
