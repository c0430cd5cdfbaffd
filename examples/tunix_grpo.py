"""A Tunix GRPOLearner run with a verifiable reward (the right answer, and the <reasoning>/<answer> format) on a
small Qwen3, tracked in MLflow.

    pip install -e '.[tunix]'
    python examples/tunix_grpo.py                      # a few minutes on 2 CPU cores
    mlflow ui --backend-store-uri sqlite:///mlflow.db

A short supervised warm-up (Tunix PeftTrainer) first teaches the random model the answer format, so GRPO's
rewards are not all zero. One MLflow run holds: the RL and GRPO configs as params, Tunix's RL metrics as
histories (``rl/rewards/mean``, ``rl/rewards/answer_reward``, ``rl/actor/loss``, ``rl/actor/kl``, completion
lengths...), every step's prompts, completions and rewards as a table (``rl_samples/train/step_*.json``), and the
policy, registered as `tunix-grpo`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import tunix_common as common  # noqa: E402


def answer_reward(prompts, completions, answer, **kwargs):
    """1 when the <answer> is the right sum (verified, not judged)."""
    from mlflow_tunix.data import answers_match, parse_answer

    return [1.0 if answers_match(parse_answer(c), a) else 0.0 for c, a in zip(completions, answer)]


def format_reward(prompts, completions, **kwargs):
    """0.5 for a well-formed <reasoning>...</reasoning><answer>...</answer> completion."""
    from mlflow_tunix.data import is_well_formed

    return [0.5 if is_well_formed(c) else 0.0 for c in completions]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--warmup-steps", type=int, default=150, help="supervised warm-up steps (default 150)")
    parser.add_argument("--steps", type=int, default=10, help="GRPO steps (default 10)")
    parser.add_argument("--batch-size", type=int, default=2, help="prompts per GRPO step")
    parser.add_argument("--generations", type=int, default=4, help="completions per prompt (GRPO's G)")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--registered-model", default="tunix-grpo")
    parser.add_argument("--experiment", default="tunix-examples")
    args = parser.parse_args(argv)

    import grain.python as grain
    import jax
    import mlflow
    import numpy as np
    import optax
    from tunix.rl import rl_cluster as rl_cluster_lib
    from tunix.rl.grpo import grpo_learner
    from tunix.rl.rollout import base_rollout
    from tunix.sft import peft_trainer

    from mlflow_tunix.tunix import log_rl_samples, log_tunix_config, metrics_logger_options

    # 1-digit sums: small enough for a tiny model to get some right after the warm-up.
    examples = common.addition_examples(100, seed=0, digits=(1, 1))
    tokenizer = common.build_tokenizer(examples)
    config = common.qwen3_config(len(tokenizer))

    mlflow.set_experiment(args.experiment)
    with mlflow.start_run(run_name="tunix-grpo") as run:
        # Warm-up: PeftTrainer on full weights, logged as train/loss (metrics_prefix "warmup" keeps it apart).
        policy = common.build_qwen3(config, seed=0)
        warmup_config = peft_trainer.TrainingConfig(eval_every_n_steps=10**9, max_steps=args.warmup_steps,
                                                    metrics_prefix="warmup",
                                                    metrics_logging_options=metrics_logger_options())
        batches = common.sft_batches(examples, tokenizer, batch_size=16, seq_len=64)
        warmup = peft_trainer.PeftTrainer(policy, optax.adamw(3e-3), warmup_config)
        warmup = warmup.with_gen_model_input_fn(common.model_inputs) or warmup
        warmup.train(batches * (1 + args.warmup_steps // len(batches)))

        reference = common.build_qwen3(config, seed=0)
        common.load_state_arrays(reference, common.state_arrays(policy))
        # One CPU device; Tunix's Qwen3 names its shardings by the axes "fsdp" and "tp".
        mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("fsdp", "tp"))
        training_config = rl_cluster_lib.RLTrainingConfig(
            actor_optimizer=optax.adamw(1e-3), eval_every_n_steps=10**9, max_steps=args.steps,
            metrics_logging_options=metrics_logger_options(),
        )
        cluster_config = rl_cluster_lib.ClusterConfig(
            role_to_mesh={rl_cluster_lib.Role.ACTOR: mesh, rl_cluster_lib.Role.REFERENCE: mesh,
                          rl_cluster_lib.Role.ROLLOUT: mesh},
            rollout_engine="vanilla", offload_to_cpu=False, training_config=training_config,
            rollout_config=base_rollout.RolloutConfig(max_tokens_to_generate=args.max_new_tokens,
                                                      max_prompt_length=32, kv_cache_size=128, temperature=0.9,
                                                      eos_tokens=[tokenizer.eos_token_id]),
        )
        grpo_config = grpo_learner.GRPOConfig(num_generations=args.generations, num_iterations=1, beta=0.04)
        log_tunix_config(cluster_config, prefix="cluster")
        log_tunix_config(grpo_config, prefix="grpo")

        cluster = rl_cluster_lib.RLCluster(actor=policy, reference=reference, tokenizer=tokenizer,
                                           cluster_config=cluster_config)
        samples = log_rl_samples()
        cluster.with_external_metrics_logger(samples)
        learner = grpo_learner.GRPOLearner(rl_cluster=cluster, reward_fns=[answer_reward, format_reward],
                                           algo_config=grpo_config)
        prompts = [{"prompts": p, "answer": a} for p, _, a in examples]
        # Batches as numpy arrays (grain's batch): Tunix repeats each field G times with np.repeat.
        train_ds = grain.MapDataset.source(prompts).batch(args.batch_size)
        learner.train(train_ds)

        info = common.log_qwen3_model(policy, tokenizer, config, lora=None, name="model",
                                      registered_model_name=args.registered_model,
                                      input_example=[examples[0][0]])
        rewards = mlflow.MlflowClient().get_metric_history(run.info.run_id, "rl/rewards/mean")
        print(f"run {run.info.run_id}: {len(rewards)} GRPO steps, mean reward "
              f"{np.mean([m.value for m in rewards]) if rewards else float('nan'):.3f}, {len(samples.tables)} sample "
              f"tables; model registered as {args.registered_model} v{info.registered_model_version}")
    return run.info.run_id


if __name__ == "__main__":
    main()
