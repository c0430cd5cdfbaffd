"""What the mlflow_tunix flavor costs: save/load time and size, and serving latency.

For a ~10M-parameter model:

* save and load with the flavor, next to a plain ``safetensors.numpy`` save/load of the same
  arrays (the yardstick: the flavor adds the tokenizer, configs, sha256 manifest, MLmodel and
  requirements, an atomic rename, and on load the integrity check and model build);
* ``mlflow models serve`` latency at batch 1 for 16 new tokens (a real server on 127.0.0.1,
  30 requests after a warm-up), next to ``pyfunc.predict`` in-process on the same request.

Median of 5 for save/load. Run from the repo root::

    PYTHONPATH=. /work/venv/bin/python benchmarks/bench_flavor.py
"""

from __future__ import annotations

import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
REPEATS = 5
REQUESTS = 30
NEW_TOKENS = 16
PROMPT = "What is 37+48?"


def median_seconds(fn, repeats=REPEATS):
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))]


def build():
    from mlflow_tunix.model import ModelConfig, build_model, param_count
    from mlflow_tunix.tokenizer import TokenizerConfig, train_tokenizer

    rng = random.Random(0)
    texts = []
    for _ in range(2000):
        a, b = rng.randint(0, 9999), rng.randint(0, 9999)
        texts.append(f"What is {a}+{b}?\n<reasoning>{a}+{b}={a + b}</reasoning><answer>{a + b}</answer>")
    tokenizer = train_tokenizer(texts, TokenizerConfig(vocab_size=512))
    config = ModelConfig(vocab_size=512, d_model=384, n_layers=6, n_heads=6, d_ff=1024, max_seq_len=256)
    model = build_model(config, seed=0)
    return model, tokenizer, param_count(model)


def bench_save_load(model, tokenizer, tmp: Path) -> list[tuple[str, float, float | None]]:
    import safetensors.numpy

    from mlflow_tunix import flavor
    from mlflow_tunix.generate import GenerationConfig
    from mlflow_tunix.model import build_model, flat_params

    generation = GenerationConfig(max_new_tokens=NEW_TOKENS)
    rows = []

    save_flavor = median_seconds(
        lambda i: flavor.save_model(model, tmp / f"flavor-{i}", tokenizer=tokenizer, generation_config=generation)
    )
    save_plain = median_seconds(
        lambda i: safetensors.numpy.save_file(flat_params(model), str(tmp / f"plain-{i}.safetensors"))
    )
    load_flavor = median_seconds(lambda i: flavor.load_model(tmp / f"flavor-{i}"))
    load_plain = median_seconds(lambda i: safetensors.numpy.load_file(str(tmp / f"plain-{i}.safetensors")))
    load_plain_build = median_seconds(
        lambda i: build_model(model.config, params=safetensors.numpy.load_file(str(tmp / f"plain-{i}.safetensors")))
    )
    flavor_mb = dir_bytes(tmp / "flavor-0") / 1e6
    plain_mb = (tmp / "plain-0.safetensors").stat().st_size / 1e6
    rows.append(("save: mlflow_tunix.save_model", save_flavor, flavor_mb))
    rows.append(("save: safetensors save_file (yardstick)", save_plain, plain_mb))
    rows.append(("load: mlflow_tunix.load_model", load_flavor, None))
    rows.append(("load: safetensors load_file (yardstick)", load_plain, None))
    rows.append(("load: load_file + build_model", load_plain_build, None))
    return rows


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench_serve(model, tokenizer, tmp: Path) -> dict:
    import mlflow
    import requests

    from mlflow_tunix import flavor
    from mlflow_tunix.generate import GenerationConfig

    uri = f"sqlite:///{tmp}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(experiment_id=mlflow.create_experiment("bench", artifact_location=(tmp / "artifacts").as_uri()))
    with mlflow.start_run():
        info = flavor.log_model(model, name="bench", tokenizer=tokenizer, registered_model_name="bench",
                                generation_config=GenerationConfig(max_new_tokens=NEW_TOKENS))
    model_uri = f"models:/bench/{info.registered_model_version}"

    payload = {"inputs": [PROMPT], "params": {"max_new_tokens": NEW_TOKENS}}
    in_process = mlflow.pyfunc.load_model(model_uri)
    in_process.predict([PROMPT], params=payload["params"])  # compile
    local = []
    for _ in range(REQUESTS):
        start = time.perf_counter()
        out = in_process.predict([PROMPT], params=payload["params"])
        local.append(time.perf_counter() - start)
    new_tokens = len(tokenizer(out["completion"][0], add_special_tokens=False)["input_ids"])

    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
           "PATH": os.pathsep.join([str(bin_dir), os.environ.get("PATH", "")])}
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(tmp / "server.log", "wb")
    started = time.perf_counter()
    proc = subprocess.Popen(
        [str(bin_dir / "mlflow"), "models", "serve", "-m", model_uri, "--env-manager", "local",
         "-p", str(port), "-h", "127.0.0.1"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"server exited:\n{(tmp / 'server.log').read_text()[-3000:]}")
            try:
                if requests.get(f"{url}/ping", timeout=5).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(0.25)
        ready = time.perf_counter() - started
        for _ in range(2):  # warm-up: the first request compiles
            requests.post(f"{url}/invocations", json=payload, timeout=600).raise_for_status()
        served = []
        for _ in range(REQUESTS):
            start = time.perf_counter()
            response = requests.post(f"{url}/invocations", json=payload, timeout=600)
            served.append(time.perf_counter() - start)
            response.raise_for_status()
        assert response.json()["predictions"] == out.to_dict("records")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait()
        log.close()
    return {"ready": ready, "served": served, "local": local, "new_tokens": new_tokens}


def main():
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    import logging

    import mlflow  # noqa: F401  (configures its loggers on import; quiet them afterwards)

    # The "mlflow-tunix is not installed" warning of a source checkout, repeated at every save.
    logging.getLogger("mlflow").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model, tokenizer, n_params = build()
        print(f"model: {n_params / 1e6:.1f}M parameters, float32; median of {REPEATS}")
        rows = bench_save_load(model, tokenizer, tmp)
        serve = bench_serve(model, tokenizer, tmp)

    print(f"\n{'':42} {'median s':>9} {'size MB':>8}")
    for label, seconds, mb in rows:
        print(f"{label:42} {seconds:9.3f} {'' if mb is None else f'{mb:8.2f}':>8}")
    ms = lambda xs, q: 1000 * percentile(xs, q)  # noqa: E731
    print(f"\nserving, batch 1, {NEW_TOKENS} new tokens (got {serve['new_tokens']}), {REQUESTS} requests after warm-up")
    print(f"{'':42} {'p50 ms':>9} {'p95 ms':>8}")
    print(f"{'mlflow models serve (HTTP, 127.0.0.1)':42} {ms(serve['served'], 50):9.1f} {ms(serve['served'], 95):8.1f}")
    print(f"{'pyfunc predict in-process (yardstick)':42} {ms(serve['local'], 50):9.1f} {ms(serve['local'], 95):8.1f}")
    print(f"server start to first /ping: {serve['ready']:.1f} s")
    print(f"load average during the run: {', '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
