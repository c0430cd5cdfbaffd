"""Hugging Face checkpoints in and out: a local Llama / Qwen2 / Qwen3 folder becomes a Transformer
and its tokenizer, and any Transformer becomes such a folder again.

A stage between ``model`` and ``train`` (it uses the model and the tokenizer, nothing later)::

    ckpt = load_checkpoint("SmolLM2-135M/")          # config.json, *.safetensors, tokenizer files
    ckpt.model(tokens)                                  # the same logits transformers computes
    export_hf(ckpt.model, "out/", tokenizer=ckpt.tokenizer)

What a folder holds: ``config.json`` (``model_type`` llama, qwen2 or qwen3), the weights as
``model.safetensors`` or shards listed in ``model.safetensors.index.json``, ``tokenizer.json`` (+
``tokenizer_config.json``, the chat template), and optionally ``generation_config.json``. Nothing is
ever downloaded: a hub id is refused with the command that downloads it.

The weights stream tensor by tensor (``safe_open``), each cast to the wanted dtype and transposed
into our ``x @ W`` layout as it is read, so a load peaks at about the model's size plus one tensor.
Anything this module cannot represent exactly (another ``model_type``, rope scaling, sliding-window
attention, biases Llama does not have, a missing or misshaped tensor) is refused with one line
naming it, never approximated.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import jax.numpy as jnp
import numpy as np

from mlflow_tunix.errors import ModelLoadError
from mlflow_tunix.model import ModelConfig, Transformer, build_model, flat_params
from mlflow_tunix.tokenizer import load_tokenizer

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
CONFIG_FILE = "config.json"
GENERATION_FILE = "generation_config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# Tensors some checkpoints carry that hold nothing to load (RoPE frequencies are recomputed).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


# --------------------------------------------------------------------------- names and layouts
def tensor_names(config: ModelConfig) -> Iterator[tuple[str, str, bool]]:
    """(our parameter name, the HF tensor name, transposed?) for every parameter of ``config``.

    HF's ``nn.Linear`` stores [out, in] and computes ``x @ W.T``; we store [in, out] and compute
    ``x @ W``: every projection is transposed, embeddings and norm scales are not.
    """
    yield "embed", "model.embed_tokens.weight", False
    for i in range(config.n_layers):
        ours, theirs = f"blocks.{i}", f"model.layers.{i}"
        yield f"{ours}.attn_norm.scale", f"{theirs}.input_layernorm.weight", False
        for w, proj in (("wq", "q_proj"), ("wk", "k_proj"), ("wv", "v_proj"), ("wo", "o_proj")):
            yield f"{ours}.attn.{w}", f"{theirs}.self_attn.{proj}.weight", True
        if config.qkv_bias:
            for b, proj in (("bq", "q_proj"), ("bk", "k_proj"), ("bv", "v_proj")):
                yield f"{ours}.attn.{b}", f"{theirs}.self_attn.{proj}.bias", False
        if config.qk_norm:
            yield f"{ours}.attn.q_norm.scale", f"{theirs}.self_attn.q_norm.weight", False
            yield f"{ours}.attn.k_norm.scale", f"{theirs}.self_attn.k_norm.weight", False
        yield f"{ours}.mlp_norm.scale", f"{theirs}.post_attention_layernorm.weight", False
        for w, proj in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
            yield f"{ours}.mlp.{w}", f"{theirs}.mlp.{proj}.weight", True
    yield "final_norm.scale", "model.norm.weight", False
    if not config.tie_embeddings:
        yield "lm_head", "lm_head.weight", True


# --------------------------------------------------------------------------- config.json
def _rope_theta(hf: dict, where: Path) -> float:
    """The RoPE base, from transformers 5's ``rope_parameters`` or the older ``rope_theta`` +
    ``rope_scaling``; any scaling (llama3, yarn, linear, dynamic...) is refused."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    for source in (params, scaling):
        kind = source.get("rope_type", source.get("type", "default"))
        if kind != "default":
            raise ModelLoadError(f"{where}: rope scaling {kind!r} is not supported (only plain RoPE)")
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def config_from_hf(hf: dict, where: Path = Path(CONFIG_FILE), *, max_seq_len: int | None = None) -> ModelConfig:
    """A ModelConfig from a parsed HF config.json; ``max_seq_len`` caps the context (the KV cache
    limit), which otherwise is the checkpoint's ``max_position_embeddings``."""
    family = hf.get("model_type")
    if family not in ARCHITECTURES:
        raise ModelLoadError(f"{where}: model_type {family!r} is not supported (supported: {', '.join(ARCHITECTURES)})")
    if hf.get("hidden_act", "silu") != "silu":
        raise ModelLoadError(f"{where}: hidden_act {hf['hidden_act']!r} is not supported (only silu)")
    if family != "qwen2" and hf.get("attention_bias"):
        raise ModelLoadError(f"{where}: attention_bias is not supported for {family}")
    if hf.get("mlp_bias"):
        raise ModelLoadError(f"{where}: mlp_bias is not supported")
    if hf.get("use_sliding_window"):
        raise ModelLoadError(f"{where}: sliding-window attention (use_sliding_window) is not supported")
    other_layers = sorted(set(hf.get("layer_types") or ["full_attention"]) - {"full_attention"})
    if other_layers:
        raise ModelLoadError(f"{where}: layer type {other_layers[0]!r} is not supported (only full_attention)")
    try:
        positions = int(hf.get("max_position_embeddings", 2048))
        return ModelConfig(
            family=family,
            vocab_size=int(hf["vocab_size"]),
            d_model=int(hf["hidden_size"]),
            n_layers=int(hf["num_hidden_layers"]),
            n_heads=int(hf["num_attention_heads"]),
            n_kv_heads=int(hf.get("num_key_value_heads") or hf["num_attention_heads"]),
            head_dim=int(hf["head_dim"]) if hf.get("head_dim") else None,
            d_ff=int(hf["intermediate_size"]),
            max_seq_len=min(positions, max_seq_len) if max_seq_len else positions,
            rope_theta=_rope_theta(hf, where),
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            # transformers' default for all three families: untied, unless the config says so.
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        )
    except KeyError as exc:
        raise ModelLoadError(f"{where}: missing key {exc.args[0]!r}") from None
    except Exception as exc:  # a ConfigError (a value out of range) or a wrong type
        raise ModelLoadError(f"{where}: {exc}") from None


def config_to_hf(config: ModelConfig, **token_ids) -> dict:
    """config.json for ``config``, as transformers writes it for the family."""
    hf = {
        "architectures": [ARCHITECTURES[config.family]],
        "model_type": config.family,
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "intermediate_size": config.d_ff,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim,
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "tie_word_embeddings": config.tie_embeddings,
        "hidden_act": "silu",
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        "dtype": "float32",
        **{k: v for k, v in token_ids.items() if v is not None},
    }
    if config.family == "llama":
        hf.update(attention_bias=False, mlp_bias=False)
    if config.family == "qwen3":
        hf.update(attention_bias=False)
    if config.family in ("qwen2", "qwen3"):
        hf.update(use_sliding_window=False, sliding_window=None, max_window_layers=config.n_layers)
    return hf


# --------------------------------------------------------------------------- reading a folder
@dataclass
class Checkpoint:
    """An imported checkpoint: the model, its tokenizer, and its generation_config.json ({} if none)."""

    model: Transformer
    tokenizer: Any
    generation: dict
    path: Path


def local_folder(path) -> Path:
    """``path`` as a local checkpoint folder; a hub id ("Qwen/Qwen3-0.6B") is refused: nothing is
    downloaded at run time."""
    folder = Path(path).expanduser()
    if folder.is_dir():
        return folder
    if not folder.exists() and str(path).count("/") == 1 and not str(path).startswith((".", "/", "~")):
        raise ModelLoadError(f"{path}: no such folder; a Hugging Face hub id is not downloaded here: download it "
                             f"first (hf download {path} --local-dir DIR) and give DIR")
    raise ModelLoadError(f"{path}: not a checkpoint folder")


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelLoadError(f"{path}: missing") from None
    except ValueError as exc:
        raise ModelLoadError(f"{path}: not valid JSON ({exc})") from None


def _weight_files(folder: Path) -> dict[str, Path]:
    """HF tensor name -> the safetensors file that holds it."""
    if (folder / INDEX_FILE).is_file():
        weight_map = read_json(folder / INDEX_FILE).get("weight_map") or {}
        return {name: folder / file for name, file in weight_map.items()}
    if not (folder / WEIGHTS_FILE).is_file():
        raise ModelLoadError(f"{folder}: no {WEIGHTS_FILE} and no {INDEX_FILE}")
    from safetensors import safe_open

    with safe_open(str(folder / WEIGHTS_FILE), framework="numpy") as f:
        return {name: folder / WEIGHTS_FILE for name in f.keys()}


class _StreamedWeights(Mapping):
    """A read-once mapping {our name: array} over the checkpoint's safetensors files, for
    build_model: each tensor is read when asked for, cast and transposed, and then dropped."""

    def __init__(self, config: ModelConfig, folder: Path, dtype):
        self.folder, self.dtype = folder, dtype
        self.names = {ours: (theirs, transposed) for ours, theirs, transposed in tensor_names(config)}
        self.files = _weight_files(folder)
        self._open: dict[Path, Any] = {}
        theirs_used = {theirs for theirs, _ in self.names.values()}
        for ours, (theirs, _) in self.names.items():
            if theirs not in self.files:
                raise ModelLoadError(f"{folder}: missing tensor {theirs!r}")
        for name in sorted(self.files):
            if name in theirs_used or name.endswith(_IGNORED_SUFFIXES):
                continue
            if name == "lm_head.weight" and config.tie_embeddings:
                continue  # some tied checkpoints store the head too; it is the embedding
            raise ModelLoadError(f"{folder}: unexpected tensor {name!r} for a {config.family} model with this config")

    def __iter__(self):
        return iter(self.names)

    def __len__(self):
        return len(self.names)

    def __getitem__(self, ours: str):
        from safetensors import safe_open

        theirs, transposed = self.names[ours]
        file = self.files[theirs]
        if not file.is_file():
            raise ModelLoadError(f"{file}: missing (listed in {INDEX_FILE})")
        if file not in self._open:
            self._open.clear()  # one shard open at a time
            self._open[file] = safe_open(str(file), framework="numpy")
        # A numpy view, cast only if needed: build_model's jnp.asarray makes the one copy that stays.
        value = self._open[file].get_tensor(theirs).astype(self.dtype, copy=False)
        return value.T if transposed else value

    def shape_of(self, ours: str) -> tuple[str, tuple]:
        """(HF name, HF shape) of a parameter, read from the file header only."""
        from safetensors import safe_open

        theirs, _ = self.names[ours]
        with safe_open(str(self.files[theirs]), framework="numpy") as f:
            return theirs, tuple(f.get_slice(theirs).get_shape())

    def close(self):
        self._open.clear()


def load_checkpoint(path, *, dtype: str = "float32", max_seq_len: int | None = None) -> Checkpoint:
    """Read a local HF folder: config, weights (streamed, cast to ``dtype``), tokenizer, generation config."""
    if dtype not in DTYPES:
        raise ModelLoadError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    folder = local_folder(path)
    config = config_from_hf(read_json(folder / CONFIG_FILE), folder / CONFIG_FILE, max_seq_len=max_seq_len)
    tokenizer = _load_tokenizer(folder)
    if len(tokenizer) > config.vocab_size:
        raise ModelLoadError(f"{folder}: the tokenizer has {len(tokenizer)} tokens, more than vocab_size {config.vocab_size}")
    weights = _StreamedWeights(config, folder, DTYPES[dtype])
    try:
        model = build_model(config, params=weights, dtype=DTYPES[dtype])
    except ModelLoadError as exc:
        # build_model names our parameter; the user knows the checkpoint's tensor names.
        key = str(exc).split("'")[1] if "'" in str(exc) else None
        if key in weights.names:
            theirs, shape = weights.shape_of(key)
            raise ModelLoadError(f"{folder}: tensor {theirs!r} has shape {shape}, which does not fit "
                                 f"{CONFIG_FILE}") from None
        raise ModelLoadError(f"{folder}: {exc}") from None
    finally:
        weights.close()
    generation = read_json(folder / GENERATION_FILE) if (folder / GENERATION_FILE).is_file() else {}
    return Checkpoint(model, tokenizer, generation, folder)


def _load_tokenizer(folder: Path):
    if not (folder / "tokenizer.json").is_file():
        raise ModelLoadError(f"{folder}: no tokenizer.json (a fast tokenizer is needed)")
    tokenizer = load_tokenizer(folder)
    if tokenizer.eos_token is None:
        raise ModelLoadError(f"{folder}: the tokenizer has no eos_token")
    if tokenizer.pad_token is None:
        # Llama has no pad token; padding is masked everywhere, so any token will do: EOS.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# --------------------------------------------------------------------------- writing a folder
def export_hf(model, out_dir, *, tokenizer=None, generation: dict | None = None) -> Path:
    """Write ``model`` as a Hugging Face folder ``out_dir`` that transformers, vLLM and converters read.

    ``model`` is a Transformer (then give ``tokenizer``), or a loaded flavor model (anything with
    ``.module`` and ``.tokenizer``, e.g. ``mlflow_tunix.load_model(uri)``). ``generation``: extra
    generation_config.json entries (``max_new_tokens``, ``temperature``...). The folder must not
    exist or be empty.
    """
    import safetensors.numpy

    if hasattr(model, "module"):
        tokenizer = tokenizer or model.tokenizer
        gen = getattr(model, "generation", None)
        if generation is None and dataclasses.is_dataclass(gen):
            generation = {"max_new_tokens": gen.max_new_tokens, "temperature": gen.temperature, "top_k": gen.top_k}
        model = model.module
    if tokenizer is None:
        raise TypeError("export_hf() needs tokenizer= when model is a Transformer")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise ModelLoadError(f"{out}: exists and is not empty")
    out.mkdir(parents=True, exist_ok=True)

    config = model.config
    params = flat_params(model)
    tensors = {}
    for ours, theirs, transposed in tensor_names(config):
        value = params.pop(ours)
        tensors[theirs] = np.ascontiguousarray((value.T if transposed else value).astype(np.float32))
    safetensors.numpy.save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt"})

    ids = _special_ids(tokenizer)
    (out / CONFIG_FILE).write_text(json.dumps(config_to_hf(config, **ids), indent=2) + "\n")
    gen = {**ids, **(generation or {})}
    if "temperature" in gen:
        gen["do_sample"] = gen["temperature"] > 0
        if not gen["do_sample"]:
            gen.pop("temperature")
            gen.pop("top_k", None)
    (out / GENERATION_FILE).write_text(json.dumps(gen, indent=2) + "\n")
    tokenizer.save_pretrained(str(out))
    return out


def _special_ids(tokenizer) -> dict:
    """pad/bos/eos ids; eos also lists ``</answer>`` when it is one token, so other tools stop
    where our generation stops."""
    eos = [tokenizer.eos_token_id]
    answer_end = tokenizer.convert_tokens_to_ids("</answer>") if "</answer>" in tokenizer.get_vocab() else None
    if answer_end is not None and answer_end not in eos:
        eos.append(answer_end)
    return {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": eos if len(eos) > 1 else eos[0],
            "pad_token_id": tokenizer.pad_token_id}
