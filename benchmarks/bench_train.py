"""Our jitted train step against a PyTorch twin of the same model, every thread configuration, side by side.

    python benchmarks/bench_train.py [--rounds 5] [--steps 10] [--json out.json]

torch is benchmark-only (never a dependency of mlflow-tunix). Run this with a Python that has both
the package and a CPU build of torch, e.g.::

    python3 -m venv /work/torchvenv && /work/torchvenv/bin/pip install torch==2.13.0 -e .
    /work/torchvenv/bin/python benchmarks/bench_train.py

Without torch, the twin is skipped with a message and only our side is measured.

What is compared. The default project (projects/addition): its data, its trained tokenizer, its
model config, its train config (AdamW with warm-up/cosine schedule, global-norm clipping) and the
real batches its sampler draws, (seed, step) -> rows. Our side is ``train.train_step`` jitted, exactly
as ``train.train`` runs it. The twin (``TorchTwin`` below) is the same network written for PyTorch:
the same weights (copied from ours), RMSNorm, rotate-half RoPE, masked softmax (``eager``) or
``scaled_dot_product_attention`` (``sdpa``), SwiGLU, tied embeddings, completion-masked cross-entropy,
clipping, AdamW (``fused``). Before timing, five steps from the same weights on the same batches are
run on both sides and their losses, gradient norms and parameter updates compared (printed).

Thread configurations, each in its own worker process (so a library's thread pool is set once,
before it starts): ``1t`` one thread pinned to one core, ``Nt`` all cores in one process, and
``per-core`` one process per core, each pinned to its core and running at the same time (the
data-parallel way to use a CPU; its throughput is the sum). Rounds are interleaved: in each round
every configuration runs ``--steps`` steps in turn (the order rotates), so a busy neighbour slows all
alike. Reported: min/median/max tokens/s over rounds (all positions B x T, as the training loop logs
them, and completion tokens, those that carry loss), our ratio to each torch configuration, the
achieved GFLOP/s (model FLOPs, the same count for both sides: 3x the forward's matmul FLOPs) and MFU
against the machine's float32 matmul peak as measured here: the best 1024^3 matmul rate of any
one-core worker (either library) times the cores a configuration uses.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
PROJECT = "addition"
N_BATCHES = 64  # distinct real batches the workers cycle through
CHECK_STEPS = 5


# --------------------------------------------------------------------------- data and weights, once
def prepare(workdir: Path, project: str) -> dict:
    """The project's real batches, initial weights and learning rates, saved for the workers."""
    from mlflow_tunix import pipeline
    from mlflow_tunix.config import load_project
    from mlflow_tunix.model import build_model, flat_params
    from mlflow_tunix.train import BatchSampler, make_optimizer

    cfg = load_project(project)
    prep = pipeline.prepare(cfg)
    tok = prep.train_tok
    sampler = BatchSampler(len(tok.tokens), cfg.train.batch_size, cfg.train.seed)
    idx = [sampler.indices(s) for s in range(N_BATCHES)]
    np.savez(workdir / "batches.npz", tokens=np.stack([tok.tokens[i] for i in idx]),
             loss_mask=np.stack([tok.loss_mask[i] for i in idx]))
    np.savez(workdir / "params.npz", **flat_params(build_model(prep.model_cfg, seed=cfg.train.seed)))
    _, schedule = make_optimizer(cfg.train)
    np.save(workdir / "lr.npy", np.array([float(schedule(s)) for s in range(N_BATCHES * 64)], np.float64))
    m, t = prep.model_cfg, cfg.train
    meta = {"model": {k: getattr(m, k) for k in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads",
                                                  "head_dim", "d_ff", "max_seq_len", "rope_theta", "norm_eps")},
            "train": {k: getattr(t, k) for k in ("batch_size", "learning_rate", "warmup_steps", "weight_decay",
                                                  "b1", "b2", "grad_clip", "steps", "seed")},
            "batch_shape": list(tok.tokens[idx[0]].shape),
            "completion_tokens": [float(tok.loss_mask[i][:, 1:].sum()) for i in idx]}
    (workdir / "meta.json").write_text(json.dumps(meta))
    return meta


def model_flops(meta: dict) -> float:
    """FLOPs of one train step: forward matmuls (projections, attention scores and mix over all T keys,
    the tied head) x3 for forward + backward. Independent of how either side computes it."""
    m = meta["model"]
    B, L = meta["batch_shape"]
    T = L - 1  # the model reads tokens[:, :-1]
    d, H, K, Dh, f, V = m["d_model"], m["n_heads"], m["n_kv_heads"], m["head_dim"], m["d_ff"], m["vocab_size"]
    per_token_layer = 2 * (d * H * Dh + 2 * d * K * Dh + H * Dh * d + 3 * d * f) + 2 * 2 * T * H * Dh
    forward = B * T * (m["n_layers"] * per_token_layer + 2 * d * V)
    return 3.0 * forward


# --------------------------------------------------------------------------- our side
class JaxSide:
    def __init__(self, workdir: Path):
        import jax

        from mlflow_tunix.model import ModelConfig, build_model
        from mlflow_tunix.train import TrainConfig, init_state, make_optimizer, train_step

        meta = json.loads((workdir / "meta.json").read_text())
        params = dict(np.load(workdir / "params.npz"))
        model = build_model(ModelConfig(**meta["model"]), params=params)
        tx, _ = make_optimizer(TrainConfig(**meta["train"]))
        self.graphdef, self.state = init_state(model, tx)
        import functools

        # As train.train jits it.
        self.step_fn = jax.jit(functools.partial(train_step, self.graphdef, tx), donate_argnums=0)
        data = np.load(workdir / "batches.npz")
        self.batches = [{"tokens": data["tokens"][i], "loss_mask": data["loss_mask"][i]}
                        for i in range(len(data["tokens"]))]
        self.i = 0
        self.jax = jax

    def step(self):
        batch = self.batches[self.i % len(self.batches)]
        self.i += 1
        self.state, metrics = self.step_fn(self.state, batch)
        return metrics

    def run(self, n: int) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            metrics = self.step()
        self.jax.block_until_ready(metrics["loss"])
        return time.perf_counter() - t0

    def check(self, n: int) -> dict:
        out = [self.step() for _ in range(n)]
        got = self.jax.device_get(out)
        from mlflow_tunix.model import _dotted
        from flax import nnx

        params = {_dotted(p): np.asarray(v[...]) for p, v in nnx.to_flat_state(self.state.params)}
        return {"loss": [float(m["loss"]) for m in got], "grad_norm": [float(m["grad_norm"]) for m in got],
                "params": params}

    def matmul_peak(self) -> float:
        import jax.numpy as jnp

        n = 1024
        a = jnp.ones((n, n), jnp.float32)
        f = self.jax.jit(lambda a, b: a @ b)
        f(a, a).block_until_ready()
        best = 0.0
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(5):
                r = f(a, a)
            r.block_until_ready()
            best = max(best, 5 * 2 * n**3 / (time.perf_counter() - t0))
        return best


# --------------------------------------------------------------------------- the PyTorch twin
class TorchTwin:
    """The same model and step in PyTorch: weights named and laid out as ours ([in, out] matrices)."""

    def __init__(self, workdir: Path, attention: str):
        import torch

        self.torch = torch
        meta = json.loads((workdir / "meta.json").read_text())
        self.m, self.t = meta["model"], meta["train"]
        self.attention = attention
        self.params = {k: torch.tensor(v).requires_grad_() for k, v in np.load(workdir / "params.npz").items()}
        self.names = sorted(self.params)
        self.opt = torch.optim.AdamW([self.params[k] for k in self.names], lr=0.0, betas=(self.t["b1"], self.t["b2"]),
                                     eps=1e-8, weight_decay=self.t["weight_decay"], fused=True)
        self.lr = np.load(workdir / "lr.npy")
        data = np.load(workdir / "batches.npz")
        self.batches = [(torch.tensor(data["tokens"][i]).long(), torch.tensor(data["loss_mask"][i]))
                        for i in range(len(data["tokens"]))]
        L = self.batches[0][0].shape[1] - 1
        Dh = self.m["head_dim"]
        inv_freq = self.m["rope_theta"] ** (-torch.arange(0, Dh, 2, dtype=torch.float32) / Dh)
        angles = torch.arange(L, dtype=torch.float32)[:, None] * inv_freq  # [T, Dh/2]
        self.sin, self.cos = torch.sin(angles)[:, None, :], torch.cos(angles)[:, None, :]  # [T, 1, Dh/2]
        self.causal = torch.tril(torch.ones(L, L, dtype=torch.bool))
        self.i = 0

    def rms(self, x, scale):
        return x * torch_rsqrt(x.pow(2).mean(-1, keepdim=True) + self.m["norm_eps"]) * scale

    def rope(self, x):
        x1, x2 = x.chunk(2, dim=-1)
        return self.torch.cat([x1 * self.cos - x2 * self.sin, x2 * self.cos + x1 * self.sin], dim=-1)

    def loss(self, tokens, loss_mask):
        torch, F = self.torch, self.torch.nn.functional
        p, m = self.params, self.m
        inp, target = tokens[:, :-1], tokens[:, 1:]
        B, T = inp.shape
        H, K, Dh = m["n_heads"], m["n_kv_heads"], m["head_dim"]
        x = p["embed"][inp.reshape(-1)]  # [B*T, d], 2-D like ours
        for i in range(m["n_layers"]):
            w = lambda name: p[f"blocks.{i}.{name}"]  # noqa: E731
            h = self.rms(x, w("attn_norm.scale"))
            q = self.rope((h @ w("attn.wq")).view(B, T, H, Dh)).transpose(1, 2)
            k = self.rope((h @ w("attn.wk")).view(B, T, K, Dh)).transpose(1, 2)
            v = (h @ w("attn.wv")).view(B, T, K, Dh).transpose(1, 2)
            if K != H:
                k, v = k.repeat_interleave(H // K, dim=1), v.repeat_interleave(H // K, dim=1)
            if self.attention == "sdpa":
                a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            else:
                scores = (q @ k.transpose(-1, -2)) / Dh**0.5
                scores = scores.masked_fill(~self.causal, torch.finfo(torch.float32).min)
                a = scores.softmax(-1) @ v
            x = x + a.transpose(1, 2).reshape(B * T, H * Dh) @ w("attn.wo")
            h = self.rms(x, w("mlp_norm.scale"))
            x = x + (F.silu(h @ w("mlp.w1")) * (h @ w("mlp.w3"))) @ w("mlp.w2")
        logits = self.rms(x, p["final_norm.scale"]) @ p["embed"].t()
        ce = F.cross_entropy(logits, target.reshape(-1), reduction="none")
        mask = loss_mask[:, 1:].reshape(-1)
        return (ce * mask).sum() / mask.sum().clamp(min=1.0)

    def step(self):
        torch = self.torch
        tokens, loss_mask = self.batches[self.i % len(self.batches)]
        for g in self.opt.param_groups:
            g["lr"] = float(self.lr[self.i])  # the project's warm-up/cosine schedule at this step
        self.i += 1
        self.opt.zero_grad(set_to_none=True)
        loss = self.loss(tokens, loss_mask)
        loss.backward()
        # optax.clip_by_global_norm: scale by max_norm / norm when norm > max_norm (no epsilon).
        grads = [self.params[k].grad for k in self.names]
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        torch._foreach_mul_(grads, torch.clamp(self.t["grad_clip"] / norm, max=1.0))
        self.opt.step()
        return loss.detach(), norm

    def run(self, n: int) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            self.step()
        return time.perf_counter() - t0

    def check(self, n: int) -> dict:
        out = [self.step() for _ in range(n)]
        return {"loss": [float(l) for l, _ in out], "grad_norm": [float(g) for _, g in out],
                "params": {k: v.detach().numpy().copy() for k, v in self.params.items()}}

    def matmul_peak(self) -> float:
        torch = self.torch
        n = 1024
        a = torch.ones(n, n)
        a @ a
        best = 0.0
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(5):
                a @ a
            best = max(best, 5 * 2 * n**3 / (time.perf_counter() - t0))
        return best


def torch_rsqrt(x):
    import torch

    return torch.rsqrt(x)


def have_torch() -> str | None:
    """None when torch can be imported, else why not."""
    try:
        import torch  # noqa: F401
    except ImportError as e:
        return str(e)
    return None


# --------------------------------------------------------------------------- the worker process
def worker(args) -> None:
    """One side in one thread configuration: build, warm up, then answer 'run N' lines with seconds."""
    cpus = [int(c) for c in args.cpus.split(",")]
    os.sched_setaffinity(0, cpus)
    if args.worker == "jax":
        side = JaxSide(Path(args.data))
    else:
        import torch

        torch.set_num_threads(len(cpus))
        torch.set_num_interop_threads(1)
        side = TorchTwin(Path(args.data), args.worker.split("-", 1)[1])
    peak = side.matmul_peak()
    t0 = time.perf_counter()
    side.run(1)
    first = time.perf_counter() - t0
    side.run(3)  # warm-up
    print(json.dumps({"ready": True, "peak": peak, "first_step_s": first}), flush=True)
    for line in sys.stdin:
        cmd, n = line.split()
        if cmd == "run":
            print(json.dumps({"seconds": side.run(int(n)), "steps": int(n)}), flush=True)


# --------------------------------------------------------------------------- the parent
def check_twin(workdir: Path) -> dict:
    """Five steps on both sides from the same weights and batches: losses, grad norms, updates."""
    ours, twin = JaxSide(workdir).check(CHECK_STEPS), TorchTwin(workdir, "eager").check(CHECK_STEPS)
    p0 = dict(np.load(workdir / "params.npz"))
    moved = sum(float(np.sum((ours["params"][k] - p0[k]) ** 2)) for k in p0) ** 0.5
    diff = sum(float(np.sum((ours["params"][k] - twin["params"][k]) ** 2)) for k in p0) ** 0.5
    rel = lambda a, b: abs(a - b) / max(abs(a), 1e-30)  # noqa: E731
    return {"ours": {k: ours[k] for k in ("loss", "grad_norm")}, "torch": {k: twin[k] for k in ("loss", "grad_norm")},
            "max_rel_loss": max(rel(a, b) for a, b in zip(ours["loss"], twin["loss"])),
            "max_rel_grad_norm": max(rel(a, b) for a, b in zip(ours["grad_norm"], twin["grad_norm"])),
            "update_rel_diff": diff / max(moved, 1e-30)}


class Config:
    """A thread configuration of one side: one or more worker processes run at the same time."""

    def __init__(self, name: str, side: str, cpu_sets: list[list[int]], workdir: Path, tuned_malloc: bool = False):
        from mlflow_tunix.cli import malloc_environment

        self.name, self.side, self.times, self.procs = name + ("+m" if tuned_malloc else ""), side, [], []
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        env.pop("GLIBC_TUNABLES", None)  # each configuration says its own malloc
        if tuned_malloc:  # glibc's malloc as `mlflow-tunix` runs itself (cli.entry), for both sides alike
            env = malloc_environment(env) or env
        for cpus in cpu_sets:
            self.procs.append(subprocess.Popen(
                [sys.executable, __file__, "--worker", side, "--cpus", ",".join(map(str, cpus)), "--data", str(workdir)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
                env=env))
        self.ready = [json.loads(p.stdout.readline()) for p in self.procs]

    def run(self, steps: int) -> None:
        for p in self.procs:  # all at once: per-core workers share the machine as data-parallel ones would
            p.stdin.write(f"run {steps}\n")
        results = [json.loads(p.stdout.readline()) for p in self.procs]
        # Throughput of the whole configuration: every process's steps over the slowest one's time.
        self.times.append(max(r["seconds"] for r in results) / len(results))

    def close(self) -> None:
        for p in self.procs:
            p.stdin.close()
            p.wait()


def main():
    parser = argparse.ArgumentParser(
        description="Train-step tokens/s of our jitted step vs a PyTorch twin, every thread configuration.")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument("--steps", type=int, default=10, help="train steps per configuration per round (default 10)")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON to PATH ('-' for stdout)")
    parser.add_argument("--no-torch", action="store_true", help="measure our side only")
    parser.add_argument("--configs", default="1t,Nt,per-core", help="thread configurations (default 1t,Nt,per-core)")
    parser.add_argument("--malloc", choices=("default", "tuned", "both"), default="both",
                        help="glibc malloc of the workers, the same for both sides: 'default' (glibc's defaults), "
                             "'tuned' (the GLIBC_TUNABLES `mlflow-tunix` runs itself with: one arena, big blocks kept, "
                             "huge pages) or 'both' (every configuration twice, '+m' names the tuned one; the default)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--cpus", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    cores = sorted(os.sched_getaffinity(0))
    workdir = Path(tempfile.mkdtemp(prefix="bench_train_"))
    print(f"preparing the {PROJECT} project's data and weights ...", flush=True)
    meta = prepare(workdir, PROJECT)
    B, L = meta["batch_shape"]
    flops = model_flops(meta)
    print(f"batch {B} x {L}, model FLOPs per step {flops / 1e9:.2f} G, {len(cores)} cores, load {os.getloadavg()}")

    why = "--no-torch given" if args.no_torch else have_torch()
    sides = ["jax"] + ([] if why else ["torch-eager", "torch-sdpa"])
    result = {"batch_shape": [B, L], "model_gflop_per_step": flops / 1e9, "cores": len(cores),
              "load_before": os.getloadavg(), "rounds": args.rounds, "steps_per_round": args.steps, "malloc": args.malloc, "configs": {}}
    if why:
        print(f"PyTorch twin skipped: {why} (install a CPU torch, e.g. `pip install torch==2.13.0`, to compare)")
    else:
        check = check_twin(workdir)
        result["check"] = check
        print(f"twin check over {CHECK_STEPS} steps from the same weights and batches:")
        for i in range(CHECK_STEPS):
            print(f"  step {i}: loss ours {check['ours']['loss'][i]:.7f} torch {check['torch']['loss'][i]:.7f}   "
                  f"grad_norm ours {check['ours']['grad_norm'][i]:.7f} torch {check['torch']['grad_norm'][i]:.7f}")
        print(f"  max relative difference: loss {check['max_rel_loss']:.1e}, grad norm {check['max_rel_grad_norm']:.1e}; "
              f"|params_torch - params_ours| / |params_ours - params_0| = {check['update_rel_diff']:.1e}")

    cpu_sets = {"1t": [[cores[0]]], "Nt": [cores], "per-core": [[c] for c in cores]}
    configs = []
    for side in sides:
        for name in args.configs.split(","):
            print(f"starting {side} {name} ...", flush=True)
            for tuned in {"default": [False], "tuned": [True], "both": [False, True]}[args.malloc]:
                configs.append(Config(name, side, cpu_sets[name], workdir, tuned))
    for r in range(args.rounds):
        order = configs[r % len(configs):] + configs[: r % len(configs)]  # who goes first rotates
        for c in order:
            c.run(args.steps)
        print(f"round {r + 1}/{args.rounds} done", flush=True)
    for c in configs:
        c.close()

    completion = statistics.mean(meta["completion_tokens"])
    print(f"\n{'side':<12} {'threads':<9} {'tokens/s min / median / max':>30} {'completion tok/s':>17} "
          f"{'GFLOP/s':>8} {'peak':>6} {'MFU':>6} {'1st step s':>10}")
    for c in configs:
        per_step = sorted(c.times)
        rates = [B * L * args.steps / t for t in per_step]
        med = statistics.median(rates)
        # The machine's peak: the best one-core matmul any single-core worker measured, times the
        # cores this configuration uses (a two-thread matmul on a shared machine measures low).
        peak = max(x["peak"] for d in configs if d.name in ("1t", "per-core") for x in d.ready) * (
            1 if c.name == "1t" else len(cores)) if any(d.name in ("1t", "per-core") for d in configs) else (
            max(x["peak"] for x in c.ready))
        gflops = flops * med / (B * L) / 1e9
        entry = {"tokens_per_sec": {"min": min(rates), "median": med, "max": max(rates)},
                 "completion_tokens_per_sec": med * completion / (B * L), "gflop_per_sec": gflops,
                 "peak_gflop_per_sec": peak / 1e9, "mfu": gflops * 1e9 / peak,
                 "first_step_s": max(x["first_step_s"] for x in c.ready), "processes": len(c.procs)}
        result["configs"][f"{c.side}/{c.name}"] = entry
        print(f"{c.side:<12} {c.name:<9} {min(rates):>9,.0f} / {med:>8,.0f} / {max(rates):>7,.0f} "
              f"{entry['completion_tokens_per_sec']:>17,.0f} {gflops:>8.1f} {peak / 1e9:>6.0f} "
              f"{entry['mfu']:>6.1%} {entry['first_step_s']:>10.2f}")
    ours = {k.split("/")[1]: v["tokens_per_sec"]["median"] for k, v in result["configs"].items() if k.startswith("jax/")}
    best_ours = max(ours.values())
    ratios = {}
    for key, v in result["configs"].items():
        if not key.startswith("torch"):
            continue
        name = key.split("/")[1]
        ratios[key] = {"same_config": ours[name] / v["tokens_per_sec"]["median"],
                       "best_ours": best_ours / v["tokens_per_sec"]["median"]}
    if ratios:
        best_torch = max(ratios, key=lambda k: result["configs"][k]["tokens_per_sec"]["median"])
        print("\nours / torch (medians):")
        for key, r in ratios.items():
            print(f"  {key:<22} same threads {r['same_config']:.3f}   our best {r['best_ours']:.3f}")
        print(f"our best ({max(ours, key=ours.get)}) / best torch ({best_torch}): {ratios[best_torch]['best_ours']:.3f}")
        result["ratios"] = ratios
        result["best_ratio"] = ratios[best_torch]["best_ours"]
    result["load_after"] = os.getloadavg()
    print(f"load average after: {result['load_after']}")
    if args.json:
        text = json.dumps(result, indent=2)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text)


if __name__ == "__main__":
    main()
