"""Peak memory and time of importing a ~500M-parameter Hugging Face checkpoint (mlflow_tunix.hf).

    PYTHONPATH=. .venv/bin/python benchmarks/bench_import.py [--layers 28] [--dtype float32]

Writes a synthetic Llama checkpoint (random float32 weights, numpy + safetensors, one shard per
layer and a model.safetensors.index.json; the tokenizer of tests/fixtures/hf/llama) to a temp dir,
then imports it in a fresh subprocess and reports that process's peak RSS (ru_maxrss) against the
weights' size: in total, and above the process's RSS before the import (python + jax + mlflow_tunix).
The temp dir is deleted afterwards.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
TOKENIZER = REPO / "tests" / "fixtures" / "hf" / "llama"

CHILD = r"""
import json, resource, sys, time
import jax, numpy as np
from mlflow_tunix.hf import load_checkpoint
def rss_mb():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
before = rss_mb()
t0 = time.perf_counter()
ckpt = load_checkpoint(sys.argv[1], dtype=sys.argv[2])
jax.block_until_ready(jax.tree.leaves(__import__("flax").nnx.state(ckpt.model)))
seconds = time.perf_counter() - t0
print(json.dumps({"before_mb": before, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "after_mb": rss_mb(), "seconds": seconds}))
"""


def write_checkpoint(folder: Path, layers: int, vocab=32000, d=1024, heads=16, kv_heads=4, ff=4096) -> int:
    import safetensors.numpy

    rng = np.random.default_rng(0)
    dh = d // heads

    def w(*shape):
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02)

    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab, "hidden_size": d,
              "intermediate_size": ff, "num_hidden_layers": layers, "num_attention_heads": heads,
              "num_key_value_heads": kv_heads, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
              "rope_theta": 10000.0, "tie_word_embeddings": False, "hidden_act": "silu"}
    (folder / "config.json").write_text(json.dumps(config))
    weight_map, total = {}, 0
    shards = [{"model.embed_tokens.weight": w(vocab, d), "lm_head.weight": w(vocab, d), "model.norm.weight": np.ones(d, np.float32)}]
    for i in range(layers):
        p = f"model.layers.{i}."
        shards.append({p + "input_layernorm.weight": np.ones(d, np.float32),
                       p + "post_attention_layernorm.weight": np.ones(d, np.float32),
                       p + "self_attn.q_proj.weight": w(heads * dh, d), p + "self_attn.k_proj.weight": w(kv_heads * dh, d),
                       p + "self_attn.v_proj.weight": w(kv_heads * dh, d), p + "self_attn.o_proj.weight": w(d, heads * dh),
                       p + "mlp.gate_proj.weight": w(ff, d), p + "mlp.up_proj.weight": w(ff, d),
                       p + "mlp.down_proj.weight": w(d, ff)})
    for n, shard in enumerate(shards):
        file = f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors"
        safetensors.numpy.save_file(shard, str(folder / file))
        weight_map.update({name: file for name in shard})
        total += sum(a.size for a in shard.values())
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TOKENIZER / name, folder / name)
    return total


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=28, help="28 layers: ~490M parameters")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        n_params = write_checkpoint(Path(tmp), args.layers)
        size_mb = n_params * (4 if args.dtype == "float32" else 2) / 2**20
        out = subprocess.run([sys.executable, "-c", CHILD, tmp, args.dtype], capture_output=True, text=True,
                             env={"PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"})
        if out.returncode:
            sys.exit(out.stderr[-3000:])
        r = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"{n_params / 1e6:.0f}M parameters, {size_mb:,.0f} MB as {args.dtype}; imported in {r['seconds']:.1f} s")
    print(f"peak RSS {r['peak_mb']:,.0f} MB = {r['peak_mb'] / size_mb:.2f}x the model "
          f"({r['before_mb']:,.0f} MB before the import; peak above that {(r['peak_mb'] - r['before_mb']) / size_mb:.2f}x)")


if __name__ == "__main__":
    main()
