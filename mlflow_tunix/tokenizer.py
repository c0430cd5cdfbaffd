"""The tokenizer: a byte-level BPE trained on the project's own training text.

Trained locally (no hub), wrapped as a transformers ``PreTrainedTokenizerFast`` so it saves and
loads with ``save_pretrained``/``from_pretrained`` next to the model. Two choices matter for
reasoning data:

* the four format tags (and the chat-template markers) are single special tokens, so the model
  emits ``</answer>`` as one decision and decoding can stop on it;
* every digit is its own token, as in Llama's and Gemma's tokenizers: merged digit strings
  ("123" as one token) make column-wise arithmetic unlearnable.

``single_char_letters: true`` does for letters what is always done for digits: no merge can join
two letters, so a word is spelled letter by letter and reversing, sorting, uppercasing or
comparing words becomes a per-token task (the `reasoning` project's string families need it).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable

from mlflow_tunix.data import TAGS, TEMPLATE_SPECIAL_TOKENS
from mlflow_tunix.errors import ConfigError

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # no "PyTorch was not found" banner: we never use it

PAD, EOS = "<pad>", "<eos>"
SPECIAL_TOKENS = (PAD, EOS, *TAGS, *TEMPLATE_SPECIAL_TOKENS)
BYTE_ALPHABET = 256


@dataclass(frozen=True)
class TokenizerConfig:
    vocab_size: int = 512  # includes the 256 byte symbols and the special tokens
    single_char_letters: bool = False  # every ASCII letter its own token, as every digit is

    def __post_init__(self):
        if not isinstance(self.single_char_letters, bool):
            raise ConfigError(f"tokenizer.single_char_letters: must be true or false, got {self.single_char_letters!r}")
        minimum = BYTE_ALPHABET + len(SPECIAL_TOKENS)
        if isinstance(self.vocab_size, bool) or not isinstance(self.vocab_size, int) or self.vocab_size < minimum:
            raise ConfigError(f"tokenizer.vocab_size: {self.vocab_size!r} is too small; "
                              f"byte-level BPE needs at least {minimum}")


def train_tokenizer(texts: Iterable[str], config: TokenizerConfig = TokenizerConfig()):
    """Train a byte-level BPE on ``texts`` and return it as a ``PreTrainedTokenizerFast``."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # Digits first, one per pre-token, so no merge can ever join two digits (or a digit and a space).
    splits = [pre_tokenizers.Digits(individual_digits=True)]
    if config.single_char_letters:
        splits.append(pre_tokenizers.Split(Regex("[A-Za-z]"), behavior="isolated"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([*splits, pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=config.vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        eos_token=EOS,
        extra_special_tokens=[t for t in SPECIAL_TOKENS if t not in (PAD, EOS)],
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )


def load_tokenizer(path):
    """Load a tokenizer saved with ``save_pretrained`` (no network: a local directory only)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(path), local_files_only=True)

