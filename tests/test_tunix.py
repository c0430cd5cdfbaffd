"""Tunix users log to MLflow (mlflow_tunix.tunix): real Tunix PeftTrainer runs on a tiny Qwen3, a real sqlite store,
a real `mlflow server` killed for the server-down case.

The Tunix tests need the `[tunix]` extra (google-tunix). They skip without it, unless
MLFLOW_TUNIX_REQUIRE_TUNIX_TESTS=1 (CI's second venv) turns the skip into a failure. The first tests need no Tunix:
they check what the core venv must hold (the event-name mapping; the core package never imports Tunix).
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys

import pytest

from conftest import REPO, start_mlflow_server, stop_process_group


def _tunix_missing() -> str | None:
    try:
        import tunix.sft.peft_trainer  # noqa: F401
    except ImportError as exc:
        return f"google-tunix is not installed ({exc}); pip install -e '.[dev,tunix]'"
    return None


@pytest.fixture(scope="module")
def tunix_installed():
    reason = _tunix_missing()
    if reason:
        if os.environ.get("MLFLOW_TUNIX_REQUIRE_TUNIX_TESTS") == "1":
            pytest.fail(f"MLFLOW_TUNIX_REQUIRE_TUNIX_TESTS=1 but {reason}")
        pytest.skip(reason)


# --------------------------------------------------------------------------- no Tunix needed
def test_event_names_become_readable_keys_and_jax_events_none():
    from mlflow_tunix.tunix import metric_key

    assert metric_key("/train/loss") == "train/loss"
    assert metric_key("/eval/perplexity") == "eval/perplexity"
    assert metric_key("/train/learning_rate") == "train/learning_rate"
    assert metric_key("rewards/train/mean") == "rl/rewards/mean"
    assert metric_key("rewards/train/score/mean") == "rl/rewards/score/mean"
    assert metric_key("rewards/eval/mean") == "rl/eval/rewards/mean"
    assert metric_key("actor/train/kl") == "rl/actor/kl"
    assert metric_key("global/train/test_metric") == "rl/test_metric"
    assert metric_key("sft/train/loss") == "sft/train/loss"  # a user's own metrics_prefix stays
    for foreign in ("/jax/core/compile/backend_compile_duration", "/jax/train/x", "loss", "/train", "a/b/c"):
        assert metric_key(foreign) is None, foreign


def test_the_core_package_never_imports_tunix():
    code = ("import sys, mlflow_tunix.pipeline, mlflow_tunix.cli, mlflow_tunix.flavor, mlflow_tunix.tunix;"
            "print(sorted(m for m in sys.modules if m == 'tunix' or m.startswith('tunix.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


def test_optax_schedules_and_nested_configs_become_flat_readable_params():
    import dataclasses

    import optax

    from mlflow_tunix.tunix import config_params

    @dataclasses.dataclass
    class Inner:
        learning_rate: object
        steps: int = 3

    @dataclasses.dataclass
    class Outer:
        inner: Inner
        rollout: dict
        name: str = "x"

    schedule = optax.warmup_cosine_decay_schedule(0.0, 1e-3, 10, 100)
    params = config_params(Outer(Inner(schedule), {"train": Inner(2e-4, 5)}))
    assert params["inner.steps"] == "3" and params["name"] == "x"
    assert params["rollout.train.learning_rate"] == "0.0002" and params["rollout.train.steps"] == "5"
    lr = params["inner.learning_rate"]
    assert lr.startswith("join_schedules(boundaries=[10], schedules=[polynomial_schedule(")
    assert "cosine_decay_schedule(" in lr and "0.001" in lr
    adamw = config_params(Inner(optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))))["learning_rate"]
    assert adamw.startswith("chain(") and "clip_by_global_norm(max_norm=1.0)" in adamw


def test_points_buffered_at_exit_are_sent_and_calls_after_close_are_ignored(tracking_uri, tmp_path):
    """No Tunix needed: the backend is driven as Tunix drives it (jax.monitoring listeners)."""
    import mlflow

    run_id = mlflow.MlflowClient().create_run("0").info.run_id
    # A script that never closes its backend (a trainer that crashed, a notebook): the points go out at exit.
    script = (
        "import jax, sys\n"
        "from mlflow_tunix.tunix import mlflow_backend\n"
        f"backend = mlflow_backend(run_id={run_id!r})\n"
        "jax.monitoring.register_scalar_listener(backend.log_scalar)\n"
        "for step in range(1, 8):\n"
        "    jax.monitoring.record_scalar('/train/loss', 1.0 / step, step=step)\n"
        "jax.monitoring.record_scalar('/jax/core/compile/backend_compile_duration', 0.5, fun_name='f')\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": tracking_uri})
    assert out.returncode == 0, out.stderr[-2000:]
    assert mlflow_history(run_id, "train/loss") == [(s, pytest.approx(1.0 / s)) for s in range(1, 8)]
    assert set(mlflow.get_run(run_id).data.metrics) == {"train/loss"}

    from mlflow_tunix.tunix import mlflow_backend

    spill = tmp_path / "unsent.jsonl"
    backend = mlflow_backend(run_id, spill_path=spill)
    backend.log_scalar("/eval/loss", 2.0, step=0)
    backend.close()
    backend.log_scalar("/eval/loss", 3.0, step=5)  # JAX keeps calling a closed backend: ignored, not spilled
    backend.close()
    assert mlflow_history(run_id, "eval/loss") == [(0, 2.0)]
    assert not spill.exists()


# --------------------------------------------------------------------------- a tiny Tunix SFT run
VOCAB, SEQ, BATCH = 32, 16, 4


def tiny_qwen3(seed: int = 0, vocab: int = VOCAB):
    from flax import nnx
    from tunix.models.qwen3 import model as qwen3

    config = qwen3.ModelConfig(num_layers=2, vocab_size=vocab, embed_dim=32, hidden_dim=64, num_heads=2,
                               head_dim=16, num_kv_heads=1, rope_theta=10_000, norm_eps=1e-6,
                               use_tied_embedding=False)
    return qwen3.Qwen3(config, rngs=nnx.Rngs(seed))


def batches(n: int, seed: int):
    import numpy as np
    from tunix.sft import peft_trainer

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        start = rng.integers(1, VOCAB - 1, size=(BATCH, 1))
        tokens = (start + np.arange(SEQ)) % (VOCAB - 1) + 1  # counting sequences: learnable, so the loss falls
        out.append(peft_trainer.TrainingInput(input_tokens=tokens.astype(np.int32),
                                              input_mask=np.ones((BATCH, SEQ), np.int32)))
    return out


def model_inputs(x):
    from tunix.sft import utils

    positions = utils.build_positions_from_mask(x.input_mask)
    return {"input_tokens": x.input_tokens, "input_mask": x.input_mask, "positions": positions,
            "attention_mask": utils.make_causal_attn_mask(x.input_mask)}


def train_tiny(options, *, steps: int = 6, eval_every: int = 3, seed: int = 0, logger=None, model=None):
    """A real PeftTrainer on a tiny Qwen3: `steps` steps, eval at step 0 and every `eval_every` steps."""
    import optax
    from tunix.sft import peft_trainer

    config = peft_trainer.TrainingConfig(eval_every_n_steps=eval_every, max_steps=steps,
                                         metrics_logging_options=options, pbar_description=None)
    trainer = peft_trainer.PeftTrainer(model or tiny_qwen3(seed), optax.adamw(3e-3), config, metrics_logger=logger)
    trainer = trainer.with_gen_model_input_fn(model_inputs) or trainer
    trainer.train(batches(steps, seed), batches(2, 99))
    return trainer


def tunix_history(trainer, mode: str, name: str) -> list[float]:
    """What Tunix's own logger kept, in order."""
    return [float(v) for v in trainer.metrics_logger.get_metric_history("", name, mode)]


def mlflow_history(run_id: str, key: str) -> list[tuple[int, float]]:
    import mlflow

    points = mlflow.MlflowClient().get_metric_history(run_id, key)
    return sorted((m.step, m.value) for m in points)


def tensorboard_history(log_dir, tag: str) -> list[tuple[int, float]]:
    """The points Tunix's own TensorBoard backend (metrax, tensorboardX) wrote to its event files.

    An event file is TFRecords (length, crc, Event proto, crc); tensorboardX ships the proto but no reader.
    """
    import glob
    import struct

    from tensorboardX.proto import event_pb2

    points = []
    for path in glob.glob(str(log_dir / "**" / "events.out.tfevents.*"), recursive=True):
        data, at = open(path, "rb").read(), 0
        while at < len(data):
            (length,) = struct.unpack("<Q", data[at : at + 8])
            event = event_pb2.Event.FromString(data[at + 12 : at + 12 + length])
            at += 12 + length + 4
            for value in event.summary.value:
                if value.tag.strip("/") == tag.strip("/"):
                    points.append((event.step, value.simple_value))
    return sorted(points)


def assert_same_points(ours, theirs):
    assert [s for s, _ in ours] == [s for s, _ in theirs]
    assert [v for _, v in ours] == pytest.approx([v for _, v in theirs], rel=1e-6)


def test_peft_trainer_logs_tunix_histories_to_the_users_run(tunix_installed, tracking_uri, tmp_path):
    import jax
    import mlflow

    from mlflow_tunix.tunix import metrics_logger_options

    seen_jax = []
    jax.monitoring.register_scalar_listener(
        lambda event, value, **kw: seen_jax.append(event) if event.startswith("/jax/") else None)
    with mlflow.start_run() as run:
        options = metrics_logger_options(str(tmp_path / "tb"), tensorboard=True)
        trainer = train_tiny(options, steps=6, eval_every=3)
        assert mlflow.active_run().info.run_id == run.info.run_id  # the user's run stays theirs
    run_id = run.info.run_id

    train_loss = mlflow_history(run_id, "train/loss")
    assert [s for s, _ in train_loss] == [1, 2, 3, 4, 5, 6]
    assert [v for _, v in train_loss] == pytest.approx(tunix_history(trainer, "train", "loss"), rel=1e-6)
    assert train_loss[-1][1] < train_loss[0][1]  # it learned: a real run, not constants
    eval_loss = mlflow_history(run_id, "eval/loss")
    assert [s for s, _ in eval_loss] == [0, 3, 6]
    assert [v for _, v in eval_loss] == pytest.approx(tunix_history(trainer, "eval", "loss"), rel=1e-6)
    # ... and the same steps and values as Tunix's TensorBoard backend wrote beside ours.
    assert_same_points(train_loss, tensorboard_history(tmp_path / "tb", "/train/loss"))
    assert_same_points(eval_loss, tensorboard_history(tmp_path / "tb", "/eval/loss"))
    assert_same_points(mlflow_history(run_id, "train/perplexity"),
                       tensorboard_history(tmp_path / "tb", "/train/perplexity"))

    keys = set(mlflow.get_run(run_id).data.metrics)
    assert keys == {"train/loss", "train/perplexity", "train/grad_norm", "eval/loss", "eval/perplexity"}
    assert seen_jax, "JAX sent no events of its own: the test would not show they are filtered"


def test_a_run_the_backend_starts_and_a_second_trainer_after_close(tunix_installed, tracking_uri, tmp_path):
    import mlflow
    from tunix.sft import metrics_logger

    from mlflow_tunix.tunix import mlflow_backend

    assert mlflow.active_run() is None
    options = metrics_logger.MetricsLoggerOptions(log_dir=str(tmp_path / "a"),
                                                  backend_kwargs={"custom_backend": [mlflow_backend]})
    first = train_tiny(options, steps=4, eval_every=2)
    run = mlflow.last_active_run()
    assert run is not None and mlflow.active_run() is None
    assert run.info.status == "FINISHED"
    assert [v for _, v in mlflow_history(run.info.run_id, "train/loss")] == pytest.approx(
        tunix_history(first, "train", "loss"), rel=1e-6)
    assert [s for s, _ in mlflow_history(run.info.run_id, "eval/loss")] == [0, 2, 4]

    # Tunix closed the first logger, but JAX keeps calling its backend (clear_event_listeners misses the
    # scalar listeners): a second trainer with a new MetricsLogger logs to its own run, and only there.
    other = mlflow.MlflowClient().create_run(run.info.experiment_id).info.run_id
    options = metrics_logger.MetricsLoggerOptions(
        log_dir=str(tmp_path / "b"), backend_kwargs={"custom_backend": [functools.partial(mlflow_backend, run_id=other)]})
    second = train_tiny(options, steps=5, eval_every=5, seed=1)
    assert [s for s, _ in mlflow_history(other, "train/loss")] == [1, 2, 3, 4, 5]
    assert [v for _, v in mlflow_history(other, "train/loss")] == pytest.approx(
        tunix_history(second, "train", "loss"), rel=1e-6)
    assert len(mlflow_history(run.info.run_id, "train/loss")) == 4  # the closed backend logged nothing more
    assert mlflow.get_run(other).info.status == "RUNNING"  # a run it did not start, it does not end


def test_a_tracking_server_that_is_down_does_not_stop_training(tunix_installed, tmp_path, monkeypatch):
    """A real `mlflow server` killed before training: training runs to its end, every point is kept in the spill
    file with Tunix's values and steps (re-sending it later is tested in test_fault_tolerance.py)."""
    import json

    import mlflow

    from mlflow_tunix.tunix import metrics_logger_options

    url, proc = start_mlflow_server(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    mlflow.set_tracking_uri(url)
    try:
        run_id = mlflow.MlflowClient().create_run("0").info.run_id
    finally:
        stop_process_group(proc, grace=0)  # as a crash would

    spill = tmp_path / "unsent.jsonl"
    options = metrics_logger_options(str(tmp_path / "tb"), run_id=run_id, backend_kwargs={"spill_path": spill})
    trainer = train_tiny(options, steps=4, eval_every=2)
    assert trainer.train_steps == 4
    kept = [json.loads(line) for line in spill.read_text().splitlines()]
    assert len(kept) == 4 * 3 + 3 * 2  # loss, perplexity, grad_norm per train step; loss, perplexity per eval
    train_loss = sorted((p["step"], p["value"]) for p in kept if p["key"] == "train/loss")
    assert [s for s, _ in train_loss] == [1, 2, 3, 4]
    assert [v for _, v in train_loss] == pytest.approx(tunix_history(trainer, "train", "loss"), rel=1e-6)
    assert sorted(p["step"] for p in kept if p["key"] == "eval/loss") == [0, 2, 4]


def test_rl_samples_become_a_table_and_reward_histories(tunix_installed, tracking_uri):
    """RLCluster's metrics buffer (the shape Tunix 0.1.7's reward manager fills) -> a samples table per step."""
    import json

    import mlflow
    import numpy as np
    from tunix.perf.metrics import MetricsBuffer

    from mlflow_tunix.tunix import log_rl_samples

    def buffer(step, rewards):
        rewards = np.asarray(rewards, dtype=np.float64)  # (completions, reward functions)
        return MetricsBuffer(step, metrics={
            "prompts": ([["2+2?", "2+2?", "3+1?", "3+1?"]], None),
            "completions": ([[f"<answer>{4 + step}</answer>", "4", "<answer>4</answer>", "five"]], None),
            "rewards/sum": ([rewards.sum(axis=1)], np.mean),
            "rewards/mean": ([rewards.mean(axis=1)], np.mean),
            "rewards/max": ([rewards.max(axis=1)], np.max),
            "rewards/answer": ([rewards[:, 0]], np.mean),
            "rewards/format": ([rewards[:, 1]], np.mean),
        }, mode="train")

    with mlflow.start_run() as run:
        logger = log_rl_samples()
        logger(buffer(1, [[1, 1], [1, 0], [1, 1], [0, 0]]))
        logger(buffer(2, [[0, 1], [1, 0], [1, 1], [0, 0]]))
    assert logger.tables == ["rl_samples/train/step_000001.json", "rl_samples/train/step_000002.json"]
    assert mlflow_history(run.info.run_id, "rl/rewards/sum") == [(1, 1.25), (2, 1.0)]
    assert mlflow_history(run.info.run_id, "rl/rewards/max") == [(1, 1.0), (2, 1.0)]
    assert mlflow_history(run.info.run_id, "rl/rewards/format") == [(1, 0.5), (2, 0.5)]
    table = json.loads(open(mlflow.artifacts.download_artifacts(
        run_id=run.info.run_id, artifact_path="rl_samples/train/step_000002.json")).read())
    rows = [dict(zip(table["columns"], row)) for row in table["data"]]
    assert rows[0] == {"step": 2, "mode": "train", "prompt": "2+2?", "completion": "<answer>6</answer>",
                       "reward": 1.0, "reward/answer": 0.0, "reward/format": 1.0}
    assert [r["reward"] for r in rows] == [1.0, 1.0, 2.0, 0.0]


def test_a_trained_tunix_qwen3_logged_with_our_flavor_gives_its_logits(tunix_installed, tracking_uri):
    """Tunix's Qwen3 (GQA, q/k norm, untied head) after a few PeftTrainer steps -> our flavor -> loaded back: the
    same logits as the Tunix model, and it generates."""
    import jax.numpy as jnp
    import numpy as np

    from mlflow_tunix.tunix import has_qwen3_family, log_tunix_model

    if not has_qwen3_family():
        pytest.skip("our model has no qwen3 family yet (issue 9's model families)")
    import mlflow_tunix

    from conftest import tiny_model_and_tokenizer

    _, tokenizer = tiny_model_and_tokenizer()
    tunix_model = train_tiny(None, steps=3, eval_every=10**6, model=tiny_qwen3(0, vocab=len(tokenizer))).model
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, len(tokenizer), size=(2, 12)), jnp.int32)
    n = tokens.shape[1]
    expected, _ = tunix_model(tokens, jnp.broadcast_to(jnp.arange(n), (2, n)), None,
                              jnp.broadcast_to(jnp.tril(jnp.ones((n, n), bool)), (2, n, n)))

    info = log_tunix_model(tunix_model, "qwen3", tokenizer=tokenizer, max_seq_len=64)
    loaded = mlflow_tunix.load_model(info.model_uri)
    assert loaded.config.family == "qwen3" and loaded.config.n_kv_heads == 1 and not loaded.config.tie_embeddings
    np.testing.assert_allclose(np.asarray(loaded.module(tokens)), np.asarray(expected), rtol=1e-4, atol=1e-4)
    assert isinstance(loaded.generate(["What is 1+2?"], max_new_tokens=4)[0]["completion"], str)
