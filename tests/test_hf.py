"""Hugging Face checkpoints in and out (mlflow_tunix.hf), against the tiny fixtures PyTorch made.

tests/fixtures/hf/<family>/ holds a random Llama / Qwen2 / Qwen3 checkpoint written by transformers
(tests/fixtures/hf/make_fixtures.py), with the logits and greedy continuations PyTorch computed.
CI needs no torch; the last test re-checks an exported folder in transformers where torch is installed.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from mlflow_tunix import flavor
from mlflow_tunix.errors import ModelLoadError
from mlflow_tunix.generate import generate_ids
from mlflow_tunix.hf import export_hf, load_checkpoint
from mlflow_tunix.model import flat_params

from conftest import REPO, tiny_model_and_tokenizer

HF = REPO / "tests" / "fixtures" / "hf"
FAMILIES = ["llama", "qwen2", "qwen3"]
OLD_MODEL = REPO / "tests" / "fixtures" / "saved-0.1-tunix-gpt"


@pytest.fixture(scope="module", params=FAMILIES)
def imported(request):
    return request.param, load_checkpoint(HF / request.param)


def test_logits_equal_pytorch(imported):
    family, ckpt = imported
    expected = np.load(HF / family / "expected.npz")
    logits = np.asarray(ckpt.model(expected["ids"]))
    assert ckpt.model.config.family == family
    np.testing.assert_allclose(logits, expected["logits"], atol=1e-4, rtol=0)


def test_greedy_generations_equal_pytorch(imported):
    family, ckpt = imported
    expected = json.loads((HF / family / "expected_generations.json").read_text())
    # Both prompts in one batch: the shorter one is left-padded, which PyTorch's runs were not.
    out = generate_ids(ckpt.model, expected["prompt_ids"], max_new_tokens=len(expected["greedy"][0]),
                       pad_id=ckpt.tokenizer.pad_token_id, stop_ids=[])
    assert out == expected["greedy"]


def test_checkpoint_parts_are_read(imported):
    family, ckpt = imported
    config = ckpt.model.config
    assert (config.n_heads, config.n_kv_heads) == (4, 2)  # grouped-query attention
    assert config.head_dim == (16 if family == "qwen3" else 8)
    assert config.tie_embeddings == (family == "qwen2")
    assert ckpt.tokenizer.eos_token == "<|endoftext|>" and ckpt.tokenizer.pad_token == "<pad>"
    assert ckpt.generation["eos_token_id"] == ckpt.tokenizer.eos_token_id
    assert ckpt.tokenizer.apply_chat_template([{"role": "user", "content": "2+2?"}], tokenize=False,
                                              add_generation_prompt=True) == "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"


def test_export_reimports_to_identical_weights(imported, tmp_path):
    family, ckpt = imported
    export_hf(ckpt.model, tmp_path / "out", tokenizer=ckpt.tokenizer)
    again = load_checkpoint(tmp_path / "out")
    assert again.model.config == ckpt.model.config
    a, b = flat_params(ckpt.model), flat_params(again.model)
    assert sorted(a) == sorted(b) and all(a[k].tobytes() == b[k].tobytes() for k in a)
    hf_config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert hf_config["model_type"] == family and len(hf_config["architectures"]) == 1


def test_bfloat16_import_is_close_to_float32(tmp_path):
    ckpt = load_checkpoint(HF / "qwen3", dtype="bfloat16")
    assert {v.dtype.name for v in flat_params(ckpt.model).values()} == {"bfloat16"}
    expected = np.load(HF / "qwen3" / "expected.npz")
    logits = np.asarray(ckpt.model(expected["ids"]))
    assert np.abs(logits - expected["logits"]).max() < 0.2 * np.abs(expected["logits"]).max()


def test_sharded_checkpoint_loads(tmp_path):
    import safetensors.numpy

    folder = Path(shutil.copytree(HF / "llama", tmp_path / "sharded"))
    tensors = safetensors.numpy.load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    names = sorted(tensors)
    weight_map = {}
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2 :])):
        file = f"model-0000{i + 1}-of-00002.safetensors"
        safetensors.numpy.save_file({n: tensors[n] for n in part}, folder / file)
        weight_map.update({n: file for n in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    expected = np.load(folder / "expected.npz")
    np.testing.assert_allclose(np.asarray(load_checkpoint(folder).model(expected["ids"])), expected["logits"], atol=1e-4)


def _edited(tmp_path, family="llama", config=None, drop=None, reshape=None):
    import safetensors.numpy

    folder = Path(shutil.copytree(HF / family, tmp_path / "edited"))
    if config:
        path = folder / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    if drop or reshape:
        tensors = safetensors.numpy.load_file(folder / "model.safetensors")
        tensors.pop(drop, None)
        if reshape:
            tensors[reshape] = tensors[reshape][:, :-1].copy()
        safetensors.numpy.save_file(tensors, folder / "model.safetensors")
    return folder


@pytest.mark.parametrize("edit, message", [
    ({"config": {"model_type": "gemma3"}}, r"model_type 'gemma3' is not supported"),
    ({"config": {"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5}}}, r"rope scaling 'llama3' is not supported"),
    ({"config": {"rope_scaling": {"type": "linear", "factor": 2.0}}}, r"rope scaling 'linear' is not supported"),
    ({"config": {"attention_bias": True}}, r"attention_bias is not supported for llama"),
    ({"config": {"layer_types": ["full_attention", "sliding_attention"]}}, r"sliding_attention"),
    ({"drop": "model.layers.1.mlp.up_proj.weight"}, r"missing tensor 'model\.layers\.1\.mlp\.up_proj\.weight'"),
    ({"reshape": "model.layers.0.self_attn.k_proj.weight"},
     r"tensor 'model\.layers\.0\.self_attn\.k_proj\.weight' has shape \(16, 31\)"),
])
def test_what_cannot_be_represented_is_refused_in_one_line(tmp_path, edit, message):
    folder = _edited(tmp_path, **edit)
    with pytest.raises(ModelLoadError, match=message) as info:
        load_checkpoint(folder)
    assert "\n" not in str(info.value)


def test_unexpected_tensor_is_refused(tmp_path):
    folder = _edited(tmp_path, family="qwen2", config={"model_type": "llama"})  # llama has no q/k/v biases
    with pytest.raises(ModelLoadError, match=r"unexpected tensor 'model\.layers\.0\.self_attn\.[qkv]_proj\.bias'"):
        load_checkpoint(folder)


def test_a_hub_id_is_refused_with_how_to_download_it():
    with pytest.raises(ModelLoadError, match=r"Qwen/Qwen3-0\.6B: .*download it first \(hf download Qwen/Qwen3-0\.6B"):
        load_checkpoint("Qwen/Qwen3-0.6B")


def test_the_default_model_exports_as_llama(tmp_path):
    model, tokenizer = tiny_model_and_tokenizer()
    out = export_hf(model, tmp_path / "out", tokenizer=tokenizer)
    hf_config = json.loads((out / "config.json").read_text())
    assert hf_config["architectures"] == ["LlamaForCausalLM"] and hf_config["tie_word_embeddings"] is True
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("</answer>")]
    again = load_checkpoint(out)
    a, b = flat_params(model), flat_params(again.model)
    assert all(a[k].tobytes() == b[k].tobytes() for k in a)
    prompt = tokenizer.encode("What is 12+7?\n", add_special_tokens=False)
    kw = dict(max_new_tokens=8, pad_id=tokenizer.pad_token_id, stop_ids=[])
    assert generate_ids(again.model, [prompt], **kw) == generate_ids(model, [prompt], **kw)


def test_a_model_saved_as_tunix_gpt_still_loads():
    """Saved by mlflow-tunix 0.1 (family "tunix-gpt", no n_kv_heads/head_dim): loads as llama, same output."""
    expected = json.loads((OLD_MODEL.parent / (OLD_MODEL.name + "-expected.json")).read_text())
    loaded = flavor.load_model(OLD_MODEL)
    assert loaded.config.family == "llama" and loaded.config.n_kv_heads == loaded.config.n_heads
    assert [r["completion"] for r in loaded.generate(expected["prompts"])] == expected["completions"]


def test_transformers_loads_the_export_with_the_same_logits(tmp_path):
    """Optional: only where torch is installed (never in core CI)."""
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    model, tokenizer = tiny_model_and_tokenizer()
    out = export_hf(model, tmp_path / "out", tokenizer=tokenizer)
    ids = np.random.RandomState(0).randint(0, model.config.vocab_size, (2, 10))
    theirs = AutoModelForCausalLM.from_pretrained(out).eval()(torch.tensor(ids)).logits.detach().numpy()
    np.testing.assert_allclose(np.asarray(model(ids)), theirs, atol=1e-4, rtol=0)
