"""Useful (completion) tokens/s of padded, per-batch-padded, length-grouped and packed batches, side by side.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_packing.py [--rounds 5] [--steps 30] [--json out.json]

For each project (dev-reasoning on ../shared/fixtures/tunix-rt/dev-reasoning-v2.jsonl, skipped when
missing, and the default addition project) the real data is prepared as a run prepares it, and the
project's model is trained with the same jitted ``train.train_step`` on the batches of the first
``--steps`` steps, built four ways:

* ``padded``: today's batches (``packing: false``), every row padded to the data's width;
* ``per-batch``: the same examples, each batch cut to its own longest row (rounded up to 32);
* ``grouped``: ``group_by_length: true`` (batches of similar lengths, each cut to its longest row);
* ``packed-full``: the same examples as ``padded`` packed into few rows of the data's width;
* ``packed``: ``packing: true``: the same, in rows as wide as the step's longest example.

Every shape is compiled before timing. Rounds alternate the modes (a busy neighbour slows all alike);
prints per mode the median (min-max) completion tokens/s over the rounds, the positions per step, and
the ratio to ``padded``, and what ``packing: auto`` chooses for the project.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import statistics
import time
from pathlib import Path

import jax
import numpy as np

from mlflow_tunix.config import load_project
from mlflow_tunix.model import build_model
from mlflow_tunix.pipeline import prepare
from mlflow_tunix.train import (BatchSampler, _lengths, choose_packing, init_state, make_batch, make_optimizer,
                                packed_batch, padded_width, train_step)

REPO = Path(__file__).resolve().parent.parent
FIXTURE = REPO.parent / "shared" / "fixtures" / "tunix-rt" / "dev-reasoning-v2.jsonl"
MODES = ("padded", "per-batch", "grouped", "packed-full", "packed")


def batches(mode: str, data, config, steps: int) -> list[dict]:
    lengths = _lengths(data)
    grouped = mode == "grouped"
    cfg = dataclasses.replace(config, group_by_length=grouped, packing=mode == "packed")
    sampler = BatchSampler(len(data.tokens), cfg.batch_size, cfg.seed, lengths if grouped else None)
    out = []
    for step in range(steps):
        idx = sampler.indices(step)
        if mode == "packed-full":
            out.append(packed_batch(data, idx, lengths, cfg.batch_size, width=data.tokens.shape[1]))
        elif mode == "per-batch":
            width = padded_width(data, idx, lengths)
            out.append({"tokens": data.tokens[idx, :width], "loss_mask": data.loss_mask[idx, :width]})
        else:
            out.append(make_batch(data, idx, lengths, cfg, cfg.packing))
    return out


def bench_project(name: str, cfg, rounds: int, steps: int) -> dict:
    t0 = time.perf_counter()
    prep = prepare(cfg)
    data, train_cfg = prep.train_tok, cfg.train
    print(f"\n{name}: {len(data.tokens)} examples, width {data.tokens.shape[1]}, batch {train_cfg.batch_size} "
          f"(prepared in {time.perf_counter() - t0:.0f} s)", flush=True)
    auto = choose_packing(dataclasses.replace(train_cfg, packing="auto"),
                          BatchSampler(len(data.tokens), train_cfg.batch_size, train_cfg.seed), data, _lengths(data))
    tx, _ = make_optimizer(train_cfg)
    graphdef, state0 = init_state(build_model(prep.model_cfg, seed=0), tx)
    step_fn = jax.jit(functools.partial(train_step, graphdef, tx))
    sides = {}
    for mode in MODES:
        bs = [jax.device_put(b) for b in batches(mode, data, train_cfg, steps)]
        useful = sum(float(b["loss_mask"][:, 1:].sum()) for b in bs)
        positions = sum(b["tokens"].size for b in bs)
        shapes = sorted({tuple(b["tokens"].shape) for b in bs})
        state = state0
        for b in bs:  # compile every shape, warm up
            state, metrics = step_fn(state, b)
        jax.block_until_ready(metrics["loss"])
        print(f"  {mode}: compiled {len(shapes)} shapes", flush=True)
        sides[mode] = {"batches": bs, "state": state, "useful": useful, "positions": positions, "shapes": shapes,
                       "times": []}
    for r in range(rounds):
        order = MODES if r % 2 == 0 else MODES[::-1]
        for mode in order:
            side = sides[mode]
            t = time.perf_counter()
            state = side["state"]
            for b in side["batches"]:
                state, metrics = step_fn(state, b)
            jax.block_until_ready(metrics["loss"])
            side["times"].append(time.perf_counter() - t)
            side["state"] = state
        print(f"  round {r + 1}/{rounds}: " + ", ".join(f"{m} {sides[m]['times'][-1]:.1f} s" for m in MODES), flush=True)
    base = statistics.median(sides["padded"]["useful"] / t for t in sides["padded"]["times"])
    result = {"examples": len(data.tokens), "width": int(data.tokens.shape[1]), "batch_size": train_cfg.batch_size,
              "auto_packs": bool(auto), "modes": {}}
    print(f"  {'mode':<12} {'completion tok/s (min-max)':>30} {'positions/step':>15} {'padding':>8} {'shapes':>7} "
          f"{'ratio':>6}")
    for mode in MODES:
        side = sides[mode]
        rates = [side["useful"] / t for t in side["times"]]
        med = statistics.median(rates)
        real = sum(float((b["segment_ids"] > 0).sum()) if "segment_ids" in b else float(_lengths_of(b))
                   for b in side["batches"])
        padding = 1 - real / side["positions"]
        result["modes"][mode] = {"completion_tokens_per_sec": {"min": min(rates), "median": med, "max": max(rates)},
                                 "positions_per_step": side["positions"] / steps, "padding": padding,
                                 "shapes": len(side["shapes"]), "ratio": med / base}
        print(f"  {mode:<12} {med:>12,.0f} ({min(rates):>7,.0f}-{max(rates):>7,.0f}) {side['positions'] / steps:>15,.0f} "
              f"{padding:>7.1%} {len(side['shapes']):>7} {med / base:>5.2f}x")
    print(f"  packing: auto packs: {auto}")
    return result


def _lengths_of(batch) -> int:
    mask = np.asarray(batch["loss_mask"]) > 0
    has = mask.any(axis=1)
    return int(np.where(has, mask.shape[1] - np.argmax(mask[:, ::-1], axis=1), 0).sum())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=30, help="train steps per round and mode")
    parser.add_argument("--projects", default="dev-reasoning,addition")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    print(f"jax {jax.__version__}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}")
    results = {}
    for name in args.projects.split(","):
        if name == "dev-reasoning":
            if not FIXTURE.is_file():
                print(f"\ndev-reasoning: skipped ({FIXTURE} is missing)")
                continue
            cfg = load_project(name, train_data=str(FIXTURE))
        else:
            cfg = load_project(name)
        results[name] = bench_project(name, cfg, args.rounds, args.steps)
    print(f"load average at the end {os.getloadavg()[0]:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
