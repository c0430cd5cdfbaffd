"""What LoRA adapters cost against their model: the share of parameters at rank 8, and the size of a
model directory saved as adapters + base reference against the merged save.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_lora_save.py

1. The adapter share (rank 8, all seven projections) for the test fixtures, the d=256 model of
   tests/test_lora.py, the default addition project's model, and three public checkpoints' shapes
   (their config.json values typed in below; nothing is downloaded, no weights are built). A square
   d x d projection gets r * (d + d) adapter numbers, a share of 2r/d: 50 % at d=32, 6 % at d=256.
2. Directory sizes: a random model of each shape that fits here is exported as a Hugging Face folder
   (the base), LoRA-trained for 2 steps, and saved by the flavor both ways; `du` of each directory.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import tempfile
from pathlib import Path

import numpy as np

from mlflow_tunix import flavor
from mlflow_tunix.hf import config_from_hf, export_hf, load_checkpoint, read_json
from mlflow_tunix.lora import TARGETS, LoraConfig
from mlflow_tunix.model import ModelConfig, build_model, param_shapes
from mlflow_tunix.train import TokenizedData, TrainConfig, train

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures" / "hf"
RANK = 8

# Public checkpoints' config.json values (shapes only).
PUBLIC = {
    "SmolLM2-135M": dict(family="llama", vocab_size=49152, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3, d_ff=1536),
    "Qwen2.5-0.5B": dict(family="qwen2", vocab_size=151936, d_model=896, n_layers=24, n_heads=14, n_kv_heads=2, d_ff=4864),
    "Qwen3-0.6B": dict(family="qwen3", vocab_size=151936, d_model=1024, n_layers=28, n_heads=16, n_kv_heads=8,
                       head_dim=128, d_ff=3072),
}


def adapter_share(config: ModelConfig, rank: int = RANK) -> tuple[int, int]:
    """(adapter parameters, model parameters) of rank-``rank`` adapters on every projection."""
    shapes = param_shapes(config)
    total = sum(math.prod(s) for s in shapes.values())
    adapters = sum(rank * (s[0] + s[1]) for name, s in shapes.items() if name.endswith(tuple(TARGETS.values())))
    return adapters, total


def configs() -> dict[str, ModelConfig]:
    out = {f"fixture {f.name}": config_from_hf(read_json(f / "config.json")) for f in sorted(FIXTURES.iterdir()) if f.is_dir()}
    out["tests/test_lora.py d=256"] = ModelConfig(vocab_size=300, d_model=256, n_layers=2, n_heads=4, n_kv_heads=2,
                                                  d_ff=768, max_seq_len=64)
    out["addition project (d=128)"] = ModelConfig(vocab_size=512, d_model=128, n_layers=2, n_heads=4, d_ff=384,
                                                  max_seq_len=128)
    out.update({name: ModelConfig(max_seq_len=128, tie_embeddings=True, **values) for name, values in PUBLIC.items()})
    return out


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def sizes(name: str, config: ModelConfig, tmp: Path, base: Path | None = None) -> tuple[int, int]:
    """(merged dir bytes, adapters dir bytes) for ``base`` (default: a random model of ``config``)."""
    if base is None:
        base = tmp / f"{name}-base"
        export_hf(build_model(config, seed=0), base, tokenizer=load_checkpoint(FIXTURES / "llama").tokenizer)
    ckpt = load_checkpoint(base, max_seq_len=config.max_seq_len)
    rng = np.random.RandomState(0)
    data = TokenizedData(rng.randint(0, 128, (8, 16)).astype(np.int32), np.ones((8, 16), np.float32))
    result = train(ckpt.model, data, TrainConfig(steps=2, batch_size=4, warmup_steps=1, checkpoint_every=0,
                                                 lora=LoraConfig(rank=RANK)), progress=False)
    merged, adapters = tmp / f"{name}-merged", tmp / f"{name}-adapters"
    flavor.save_model(result.model, merged, tokenizer=ckpt.tokenizer)
    flavor.save_model(result.model, adapters, tokenizer=ckpt.tokenizer, adapters=result.adapters, base=str(base))
    return du(merged), du(adapters)


def main() -> None:
    print(f"| model | d_model | parameters | rank-{RANK} adapters | share | merged dir | adapters dir |")
    print("|---|---|---|---|---|---|---|")
    tmp = Path(tempfile.mkdtemp())
    try:
        for name, config in configs().items():
            n_adapters, total = adapter_share(config)
            dirs = "| (not built) | |"
            if name.startswith("fixture"):
                folder = FIXTURES / name.split()[1]
                merged, adapters = sizes(folder.name, dataclasses.replace(config, max_seq_len=64), tmp, folder)
                dirs = f"| {merged / 1e3:.0f} KB | {adapters / 1e3:.0f} KB ({adapters / merged:.0%}) |"
            elif total < 20_000_000:
                merged, adapters = sizes(name.split()[0].replace("/", "_"), config, tmp)
                dirs = f"| {merged / 1e6:.2f} MB | {adapters / 1e6:.3f} MB ({adapters / merged:.0%}) |"
            print(f"| {name} | {config.d_model} | {total:,} | {n_adapters:,} | {n_adapters / total:.1%} {dirs}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
