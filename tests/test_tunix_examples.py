"""The GRPO example (examples/tunix_grpo.py), cut to two steps: its rewards and samples table are in MLflow, and its
model is logged, registered and generates. Needs the `[tunix]` extra (see tests/test_tunix.py)."""

from __future__ import annotations

import json
import sys

import pytest

from conftest import REPO
from test_tunix import tunix_installed  # noqa: F401  (the fixture: skip, or fail in CI, without Tunix)


def test_grpo_example_logs_rewards_samples_and_a_registered_model(tunix_installed, tracking_uri):  # noqa: F811
    import mlflow

    sys.path.insert(0, str(REPO / "examples"))
    try:
        import tunix_grpo
    finally:
        sys.path.remove(str(REPO / "examples"))

    steps, batch, generations = 2, 2, 2
    run_id = tunix_grpo.main(["--warmup-steps", "4", "--steps", str(steps), "--batch-size", str(batch),
                              "--generations", str(generations), "--max-new-tokens", "8",
                              "--registered-model", "grpo-test"])
    client = mlflow.MlflowClient()
    run = client.get_run(run_id)
    assert run.data.params["grpo.num_generations"] == str(generations)
    assert run.data.params["cluster.training_config.actor_optimizer"].startswith("chain(update_fns=[scale_by_adam(")

    rewards = client.get_metric_history(run_id, "rl/rewards/mean")
    assert sorted(m.step for m in rewards) == list(range(steps))
    assert {m.step for m in client.get_metric_history(run_id, "rl/actor/loss")} == set(range(1, steps + 1))
    assert not [k for k in run.data.metrics if "jax" in k]

    for step, reward in sorted((m.step, m.value) for m in rewards):
        path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=f"rl_samples/train/step_{step:06d}.json")
        table = json.loads(open(path).read())
        rows = [dict(zip(table["columns"], row)) for row in table["data"]]
        assert len(rows) == batch * generations
        assert {"prompt", "completion", "reward", "reward/answer_reward", "reward/format_reward"} <= set(rows[0])
        for row in rows:  # the table's rewards are the example's reward functions applied to its completions
            answer = tunix_grpo.answer_reward([row["prompt"]], [row["completion"]], [_sum_of(row["prompt"])])[0]
            fmt = tunix_grpo.format_reward([row["prompt"]], [row["completion"]])[0]
            assert (row["reward/answer_reward"], row["reward/format_reward"], row["reward"]) == (answer, fmt, answer + fmt)
        # Tunix's rewards/mean is the mean over completions of the per-completion mean over reward functions
        assert reward == pytest.approx(sum(r["reward"] for r in rows) / 2 / len(rows))

    version = client.get_model_version("grpo-test", "1")
    assert version.run_id == run_id
    generated = mlflow.pyfunc.load_model("models:/grpo-test/1").predict(["What is 2 + 3?"], params=None)
    assert len(generated) == 1 and isinstance(generated[0], str)


def _sum_of(prompt: str) -> str:
    import re

    a, b = re.search(r"What is (\d+) \+ (\d+)\?", prompt).groups()
    return str(int(a) + int(b))
