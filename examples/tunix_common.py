"""What the two Tunix examples share: our addition data tokenized for Tunix, a tiny random Qwen3 (Tunix's own
model code), greedy generation, and logging the trained Qwen3 as an MLflow model that generates.

The model is logged as a pyfunc *from code* (``tunix_qwen3_pyfunc.py``): weights as safetensors, the Qwen3 and
LoRA config as JSON, our tokenizer as files -- no pickle. (The mlflow_tunix flavor itself does not hold Tunix's
Qwen3 yet: that waits for the Qwen3/Llama3 families in our own model.)
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
LORA_MODULES = ".*q_proj|.*k_proj|.*v_proj|.*o_proj|.*gate_proj|.*up_proj|.*down_proj"


# --------------------------------------------------------------------------- data
def addition_examples(n: int, seed: int, digits=(1, 2)):
    """Our addition generator's sums with the digit-by-digit scratchpad, as (prompt, completion, answer)."""
    from mlflow_tunix.data import examples_from_records, render_prompt
    from mlflow_tunix.generators import addition

    examples = examples_from_records(addition(n, seed, digits=digits), f"generator:addition seed={seed}")
    return [(render_prompt(e.prompt), e.completion, e.answer) for e in examples]


def build_tokenizer(examples, vocab_size: int = 320):
    from mlflow_tunix.tokenizer import TokenizerConfig, train_tokenizer

    return train_tokenizer([p + c for p, c, _ in examples], TokenizerConfig(vocab_size=vocab_size))


def sft_batches(examples, tokenizer, batch_size: int, seq_len: int):
    """Tunix TrainingInputs: prompt + completion + EOS, right-padded; the loss mask covers the completion only."""
    from tunix.sft import peft_trainer

    rows, masks = [], []
    for prompt, completion, _ in examples:
        p = tokenizer.encode(prompt)
        c = tokenizer.encode(completion) + [tokenizer.eos_token_id]
        ids = (p + c)[:seq_len]
        mask = ([0] * len(p) + [1] * len(c))[:seq_len]
        pad = seq_len - len(ids)
        rows.append(ids + [tokenizer.pad_token_id] * pad)
        masks.append(mask + [0] * pad)
    rows, masks = np.asarray(rows, np.int32), np.asarray(masks, np.int32)
    return [peft_trainer.TrainingInput(input_tokens=rows[i : i + batch_size], input_mask=masks[i : i + batch_size])
            for i in range(0, len(rows) - batch_size + 1, batch_size)]


def model_inputs(x):
    """PeftTrainer's model inputs from a TrainingInput (Tunix's recipe: positions and a causal mask from the
    padding; the loss mask is the completion mask)."""
    from tunix.sft import utils

    not_pad = x.input_tokens != 0
    return {"input_tokens": x.input_tokens, "input_mask": x.input_mask,
            "positions": utils.build_positions_from_mask(not_pad),
            "attention_mask": utils.make_causal_attn_mask(not_pad)}


# --------------------------------------------------------------------------- the model
def qwen3_config(vocab_size: int, **overrides) -> dict:
    config = dict(num_layers=2, vocab_size=vocab_size, embed_dim=64, hidden_dim=128, num_heads=4, head_dim=16,
                  num_kv_heads=2, rope_theta=10_000, norm_eps=1e-6, use_tied_embedding=False)
    config.update(overrides)
    return config


def build_qwen3(config: dict, seed: int = 0, lora: dict | None = None):
    """Tunix's Qwen3 from a plain config dict; with ``lora`` ({rank, alpha}) qwix LoRA adapters on every projection."""
    from flax import nnx
    from tunix.models.qwen3 import model as qwen3

    model = qwen3.Qwen3(qwen3.ModelConfig(**config), rngs=nnx.Rngs(seed))
    if lora:
        import qwix

        provider = qwix.LoraProvider(module_path=LORA_MODULES, rank=lora["rank"], alpha=lora["alpha"])
        tokens = np.ones((1, 8), np.int32)
        model = qwix.apply_lora_to_model(model, provider, input_tokens=tokens,
                                         positions=np.arange(8, dtype=np.int32)[None],
                                         cache=None, attention_mask=np.tril(np.ones((1, 8, 8), bool)))
    return model


def greedy_generate(model, tokenizer, prompts, max_new_tokens: int = 48) -> list[str]:
    """Greedy decoding, re-encoding the sequence each step in one fixed-width jitted forward (one compile; a
    causal mask makes the right padding harmless). Tiny models: simple beats a KV cache here."""
    import jax.numpy as jnp
    from flax import nnx

    encoded = [tokenizer.encode(p) for p in prompts]
    width = max(len(ids) for ids in encoded) + max_new_tokens
    causal = jnp.tril(jnp.ones((1, width, width), bool))

    @nnx.jit
    def logits_at(model, tokens, index):
        logits, _ = model(tokens, jnp.arange(width)[None], None, causal)
        return logits[0, index]

    outputs = []
    for ids in encoded:
        tokens = np.full((1, width), tokenizer.pad_token_id, np.int32)
        tokens[0, : len(ids)] = ids
        n = len(ids)
        while n < len(ids) + max_new_tokens:
            token = int(jnp.argmax(logits_at(model, jnp.asarray(tokens), n - 1)))
            if token == tokenizer.eos_token_id:
                break
            tokens[0, n] = token
            n += 1
        outputs.append(tokenizer.decode(tokens[0, len(ids) : n].tolist()))
    return outputs


def state_arrays(model) -> dict[str, np.ndarray]:
    """Every parameter (LoRA adapters included) as {path: array}, for safetensors."""
    import jax
    from flax import nnx

    leaves = jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves}


def load_state_arrays(model, arrays: dict[str, np.ndarray]) -> None:
    import jax
    from flax import nnx

    state = nnx.state(model, nnx.Param)
    restored = jax.tree_util.tree_map_with_path(lambda path, leaf: jax.numpy.asarray(arrays[jax.tree_util.keystr(path)]), state)
    nnx.update(model, restored)


def log_qwen3_model(model, tokenizer, config: dict, *, lora: dict | None, name: str, registered_model_name: str,
                    input_example=None):
    """Log the trained Qwen3 as an MLflow pyfunc that generates (from code, no pickle) and register it."""
    import mlflow
    from safetensors.numpy import save_file

    folder = Path(tempfile.mkdtemp(prefix="tunix-qwen3-"))
    save_file(state_arrays(model), str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"qwen3": config, "lora": lora}, indent=1))
    tokenizer.save_pretrained(str(folder / "tokenizer"))
    return mlflow.pyfunc.log_model(
        name=name, python_model=str(HERE / "tunix_qwen3_pyfunc.py"),
        artifacts={"weights": str(folder / "model.safetensors"), "config": str(folder / "config.json"),
                   "tokenizer": str(folder / "tokenizer")},
        code_paths=[str(HERE / "tunix_common.py")], input_example=input_example,
        registered_model_name=registered_model_name,
        pip_requirements=["mlflow-tunix[tunix]", "google-tunix>=0.1.7,<0.2"])
