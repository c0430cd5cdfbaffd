"""KV-cache generation: equal to naive re-encoding, stops, sampling, validation, and text."""

import importlib.util
import json
import os
import threading
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from mlflow_tunix import aot, generate
from mlflow_tunix.errors import InputError
from mlflow_tunix.generate import GenerationConfig, generate_ids, generate_text
from mlflow_tunix.model import ModelConfig, build_model, flat_params

TINY = ModelConfig(
    vocab_size=50, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=64, tie_embeddings=False
)
PAD = 0


@pytest.fixture(scope="module")
def model():
    # Weights of unit-variance scale (not the 0.02 init) so that greedy decoding wanders over
    # the vocabulary instead of repeating one token, and argmax margins are far above float error.
    rng = np.random.RandomState(0)
    params = {
        name: value if value.ndim == 1 else rng.normal(0, 1 / np.sqrt(value.shape[0]), value.shape)
        for name, value in flat_params(build_model(TINY)).items()
    }
    params["embed"] = rng.normal(0, 1, params["embed"].shape)
    return build_model(TINY, params=params)


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.RandomState(1)
    return [rng.randint(1, TINY.vocab_size, n).tolist() for n in (3, 7, 12, 20, 1)]


@pytest.fixture(scope="module")
def next_logits(model):
    """Logits after a sequence, from the full forward: no cache, no left padding, no kv_mask.

    The sequence is right-padded to one fixed length so that a single compiled forward serves
    every length; causal attention keeps the padding after it from mattering.
    """
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda state, tokens: nnx.merge(graphdef, state)(tokens))

    def run(seq):
        buffer = np.full((1, TINY.max_seq_len), PAD, np.int32)
        buffer[0, : len(seq)] = seq
        return np.asarray(forward(state, buffer))[0, len(seq) - 1]

    return run


def naive_greedy(next_logits, prompt, max_new_tokens):
    """Re-run the full forward on the growing sequence and take the argmax."""
    seq = list(prompt)
    for _ in range(max_new_tokens):
        seq.append(int(np.argmax(next_logits(seq))))
    return seq[len(prompt) :]


@pytest.fixture(scope="module")
def greedy(model, prompts):
    return generate_ids(model, prompts, max_new_tokens=10, pad_id=PAD, stop_ids=[])


def test_greedy_kv_cache_equals_naive_reencoding(next_logits, prompts, greedy):
    assert greedy == [naive_greedy(next_logits, p, 10) for p in prompts]
    assert max(len(set(row)) for row in greedy) > 5  # real sequences, not one token repeated


def test_a_decode_in_segments_of_growing_caches_equals_naive_reencoding(model, prompts, next_logits, monkeypatch):
    # Long decodes run their loop in pieces, each over a cache only as long as the slots written so far.
    assert generate.cache_segments(48, 128) == [80, 112, 144, 176]
    assert generate.cache_segments(16, 320) == [96, 176, 256, 336]
    assert generate.cache_segments(48, 127) == [175]  # shorter decodes: one loop over the whole cache
    monkeypatch.setattr(generate, "SEGMENT_FROM", 16)
    assert generate.cache_segments(20, 42) == [31, 42, 53, 62]
    out = generate_ids(model, prompts, max_new_tokens=42, pad_id=PAD, stop_ids=[])
    assert out == [naive_greedy(next_logits, p, 42) for p in prompts]
    # rows that stop early, in an early segment: the later segments do not run them on
    stop = out[3][5]
    cut = generate_ids(model, prompts, max_new_tokens=42, pad_id=PAD, stop_ids=[stop])
    assert cut == [row[: row.index(stop) + 1] if stop in row else row for row in out]


def test_batches_decoded_at_once_in_two_threads_give_the_same_tokens(model, prompts, greedy, monkeypatch):
    # On a CPU, batches decode in DECODE_STREAMS threads at once (a request of one batch is split so that
    # each thread has one); each batch's tokens depend on its own prompts alone.
    calls = []
    real = generate._run_batch
    monkeypatch.setattr(generate, "_run_batch", lambda *a: calls.append(threading.get_ident()) or real(*a))
    monkeypatch.setattr(generate, "DECODE_STREAMS", 1)
    one = generate_ids(model, prompts, max_new_tokens=10, pad_id=PAD, stop_ids=[])
    sampled = sample(model, prompts, seed=3)
    assert len(calls) == 2 * 1 and len(set(calls)) == 1  # one batch of 8 rows, greedy and sampled
    calls.clear()
    monkeypatch.setattr(generate, "DECODE_STREAMS", 2)
    assert generate._streams() == min(2, len(os.sched_getaffinity(0)))
    two = generate_ids(model, prompts, max_new_tokens=10, pad_id=PAD, stop_ids=[])
    assert two == one == greedy and sample(model, prompts, seed=3) == sampled
    if generate._streams() == 2:  # 5 prompts: batches of 4 and 1, given to two threads
        assert len(calls) == 4 and threading.get_ident() not in calls


def test_batching_does_not_change_greedy_output(model, prompts, greedy):
    # 5 prompts in batches of 2: three batches, the last one padded with a dummy row.
    assert generate_ids(model, prompts, max_new_tokens=10, pad_id=PAD, stop_ids=[], batch_size=2) == greedy


def test_a_batch_over_the_prefill_budget_runs_in_pieces_with_the_same_tokens(model, prompts, greedy):
    # One long prompt pads every row of its batch: dev-reasoning-v2's 1410-token prompt made a batch
    # of 128 rows need ~5 GB of attention scores a layer. Over the budget, fewer rows per piece.
    shape = ModelConfig(vocab_size=284, d_model=128, n_layers=2, n_heads=4, d_ff=384, max_seq_len=2048)
    assert generate._rows_within(shape, 1424, 320, 128, generate.PREFILL_BYTES) == 16
    assert generate._rows_within(shape, 112, 320, 128, generate.PREFILL_BYTES) == 128  # usual batches unchanged
    assert generate._rows_within(TINY, 32, 10, 8, 1) == 1
    # the prefill keeps the last position's logits only: a real vocabulary does not split the batch
    qwen_vocab = ModelConfig(vocab_size=151936, d_model=64, n_layers=2, n_heads=4, d_ff=192, max_seq_len=512)
    assert generate._rows_within(qwen_vocab, 208, 32, 64, generate.PREFILL_BYTES) == 64  # was 8 with all the logits
    # every row alone (each padded to its own length): the same greedy tokens and the same samples
    assert generate_ids(model, prompts, max_new_tokens=10, pad_id=PAD, stop_ids=[], prefill_bytes=1) == greedy
    assert sample(model, prompts, seed=7, prefill_bytes=1) == sample(model, prompts, seed=7)


def test_stop_token_cuts_output_and_is_kept(model, prompts, greedy):
    stop = greedy[3][4]
    out = generate_ids(model, prompts, max_new_tokens=10, pad_id=PAD, stop_ids=[stop])
    for full, cut in zip(greedy, out):
        expected = full[: full.index(stop) + 1] if stop in full else full
        assert cut == expected
    assert out[3][-1] == stop and len(out[3]) <= 5


def test_empty_prompt_list_gives_empty_list(model):
    assert generate_ids(model, [], max_new_tokens=5, pad_id=PAD, stop_ids=[]) == []


def sample(model, prompts, **kwargs):
    args = dict(max_new_tokens=10, pad_id=PAD, stop_ids=[], temperature=1.0, seed=0)
    return generate_ids(model, prompts, **{**args, **kwargs})


def test_sampling_is_deterministic_per_seed(model, prompts):
    first = sample(model, prompts, seed=7)
    assert sample(model, prompts, seed=7) == first
    assert sample(model, prompts, seed=7, batch_size=2) == first  # keys follow the prompt, not the batch
    assert sample(model, prompts, seed=8) != first


def test_top_k_1_sampling_is_greedy(model, prompts, greedy):
    assert sample(model, prompts, max_new_tokens=10, top_k=1, temperature=5.0) == greedy


def test_top_k_sampling_stays_within_the_k_best_tokens(model, prompts, next_logits):
    top3 = set(np.argsort(next_logits(prompts[2]))[-3:].tolist())
    # A high temperature makes the three allowed tokens nearly equally likely; 12 rows of one
    # prompt get 12 different sampling keys.
    firsts = sample(model, [prompts[2]] * 12, top_k=3, temperature=50.0)
    assert {row[0] for row in firsts} <= top3
    assert len({row[0] for row in firsts}) >= 2


@pytest.mark.parametrize(
    "prompts, kwargs, message",
    [
        ([[1, 2], []], {}, "prompt 1 is empty"),
        (
            [[1] * 60],
            {},
            "prompt 0 has 60 tokens + max_new_tokens 5 = 65, more than the model's max_seq_len 64",
        ),
        ([[1, 2]], {"max_new_tokens": 0}, "max_new_tokens must be at least 1, got 0"),
        ([[1, 2]], {"temperature": -0.5}, "temperature must be >= 0"),
        ([[1, 2]], {"top_k": -1}, "top_k must be >= 0"),
        ([[1, 99]], {}, "prompt 0 has token id 99 outside the vocabulary"),
    ],
)
def test_bad_requests_are_refused_with_a_clear_message(model, prompts, kwargs, message):
    args = dict(max_new_tokens=5, pad_id=PAD, stop_ids=[])
    with pytest.raises(InputError, match=message.replace("+", r"\+")):
        generate_ids(model, prompts, **{**args, **kwargs})


# --- generate_text, with a real byte-level BPE tokenizer and a model whose output is known ----


@pytest.fixture(scope="module")
def tokenizer():
    sentences = ["Q: what is two plus two? A:", "The answer is four.", "Say hi! hi there", "four plus four"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<eos>", "<answer>", "</answer>"]
    bpe.train_from_iterator(sentences, trainers.BpeTrainer(vocab_size=80, special_tokens=specials))
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        pad_token="<pad>",
        eos_token="<eos>",
        extra_special_tokens=["<answer>", "</answer>"],
    )


def bigram_model(vocab_size: int, next_token: dict[int, int], default: int):
    """A model whose greedy next token depends only on the current one, as next_token says.

    Attention and MLP outputs are zeroed, so the residual stream is the one-hot embedding of the
    current token, and the untied LM head maps it to the chosen next token.
    """
    config = ModelConfig(vocab_size=vocab_size, d_model=96, n_layers=1, n_heads=4, d_ff=32,
                         max_seq_len=64, tie_embeddings=False)
    params = {name: np.zeros_like(value) for name, value in flat_params(build_model(config)).items()}
    for norm in ("blocks.0.attn_norm.scale", "blocks.0.mlp_norm.scale", "final_norm.scale"):
        params[norm][:] = 1.0
    params["embed"] = np.eye(vocab_size, config.d_model, dtype=np.float32)
    for token in range(vocab_size):
        params["lm_head"][token, next_token.get(token, default)] = 1.0
    return build_model(config, params=params)


def chain(*tokens):
    return dict(zip(tokens[:-1], tokens[1:]))


def test_generate_text_stops_keeps_specials_and_drops_eos(tokenizer):
    tok = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    question, greeting = "Q: what is two plus two? A:", "Say hi!"
    eos = tokenizer.eos_token_id
    answer = tok("<answer> four</answer> there")  # <answer>, " four", </answer>, " there"
    assert len(answer) == 4
    next_token = {
        **chain(tok(question)[-1], *answer, eos),
        **chain(tok(greeting)[-1], *tok(" hi"), eos),
    }
    model = bigram_model(len(tokenizer), next_token, default=eos)
    config = GenerationConfig(max_new_tokens=8)

    texts = generate_text(model, tokenizer, [question, greeting], config)
    assert texts == ["<answer> four</answer>", " hi"]

    # Only EOS stops: the text runs past </answer>, and EOS itself is dropped.
    only_eos = generate_text(model, tokenizer, [question], config, stop_tokens=())
    assert only_eos == ["<answer> four</answer> there"]

    # A stop string spanning several tokens is cut in the decoded text.
    cut = generate_text(model, tokenizer, [question], config, stop_tokens=(" four</answer>",))
    assert cut == ["<answer> four</answer>"]


def test_generate_text_refuses_a_tokenizer_without_pad(tokenizer, model):
    bare = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer, eos_token="<eos>")
    with pytest.raises(InputError, match="pad_token"):
        generate_text(model, bare, ["hi"], GenerationConfig())


DECODE_FIXTURE = Path(__file__).parent / "fixtures" / "decode"


def make_fixture():
    spec = importlib.util.spec_from_file_location("make_fixture", DECODE_FIXTURE / "make_fixture.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_outputs_equal_the_saved_fixture():
    # tests/fixtures/decode/decode.json holds the decoder's outputs from before its KV cache changed
    # layout (written by make_fixture.py at that commit): greedy and sampled, 21 left-padded prompts
    # of 1-40 tokens, batches of 32 and 4, stop tokens, MHA llama and GQA qwen3. Every token must match.
    expected = json.loads((DECODE_FIXTURE / "decode.json").read_text())
    got = make_fixture().run_all()
    assert sorted(got) == sorted(expected)
    for key in expected:
        assert got[key] == expected[key], key


def test_a_decode_saved_for_the_next_process_gives_the_same_tokens(tmp_path, monkeypatch):
    # With the persistent cache on, the first call saves the compiled decode to a file; a new process
    # (here: the in-memory programs forgotten) loads it instead of tracing. Both must decode the
    # fixture's tokens.
    fixture = make_fixture()
    config = fixture.CONFIGS["qwen3-gqa"]
    model, prompts = fixture.unit_model(config, seed=0), fixture.prompts(1, config.vocab_size)
    kwargs = dict(fixture.REQUESTS)["greedy-stops"]
    monkeypatch.setattr(generate, "DECODE_STREAMS", 1)  # one batch: one program
    before = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "jax"))  # made at the first save
    try:
        generate._saved_decode.cache_clear()
        first = generate_ids(model, prompts, pad_id=fixture.PAD, **kwargs)
        saved = list((tmp_path / "jax").glob("mlflow-tunix-decode-*.xla"))
        generate._saved_decode.cache_clear()
        loaded = aot.LOADED["decode"]
        second = generate_ids(model, prompts, pad_id=fixture.PAD, **kwargs)
        loaded = aot.LOADED["decode"] - loaded
    finally:
        jax.config.update("jax_compilation_cache_dir", before)
        generate._saved_decode.cache_clear()
    expected = json.loads((DECODE_FIXTURE / "decode.json").read_text())["qwen3-gqa/greedy-stops"]
    assert len(saved) == 1 and loaded == 1
    assert first == second == expected
