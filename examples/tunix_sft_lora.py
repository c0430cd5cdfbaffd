"""A Tunix PeftTrainer LoRA fine-tune of a tiny random Qwen3 on our addition data, tracked in MLflow.

    pip install -e '.[tunix]'
    python examples/tunix_sft_lora.py --steps 200          # ~1 min on 2 CPU cores
    mlflow ui --backend-store-uri sqlite:///mlflow.db

One MLflow run holds: the Tunix TrainingConfig as params (optimizer and schedule as readable calls), Tunix's
train/eval loss, perplexity and grad norm as metric histories (mlflow_tunix.tunix's backend), a table of
generated answers on held-out sums, and the LoRA model, registered as `tunix-sft-lora`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import tunix_common as common  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200, help="training steps (default 200)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank")
    parser.add_argument("--eval-every", type=int, default=50, help="eval loss every N steps")
    parser.add_argument("--n-eval", type=int, default=8, help="held-out sums answered by generation at the end")
    parser.add_argument("--registered-model", default="tunix-sft-lora")
    parser.add_argument("--experiment", default="tunix-examples")
    args = parser.parse_args(argv)

    import mlflow
    import optax
    from tunix.sft import peft_trainer

    from mlflow_tunix.data import answers_match, parse_answer
    from mlflow_tunix.tunix import describe, log_tunix_config, metrics_logger_options

    train = common.addition_examples(args.steps * args.batch_size // 2 + args.batch_size, seed=0)
    held_out = common.addition_examples(args.n_eval + 64, seed=1)[-args.n_eval - 32 :]
    tokenizer = common.build_tokenizer(train)
    seq_len = 96
    train_batches = common.sft_batches(train, tokenizer, args.batch_size, seq_len)
    eval_batches = common.sft_batches(held_out[: 32], tokenizer, args.batch_size, seq_len)

    config = common.qwen3_config(len(tokenizer))
    lora = {"rank": args.rank, "alpha": float(2 * args.rank)}
    model = common.build_qwen3(config, seed=0, lora=lora)

    mlflow.set_experiment(args.experiment)
    with mlflow.start_run(run_name="tunix-sft-lora") as run:
        schedule = optax.warmup_cosine_decay_schedule(0.0, 3e-3, max(1, args.steps // 10), args.steps)
        training_config = peft_trainer.TrainingConfig(
            eval_every_n_steps=args.eval_every, max_steps=args.steps,
            metrics_logging_options=metrics_logger_options(),  # <- MLflow (1/3)
        )
        log_tunix_config(training_config)  # <- (2/3)
        optimizer = optax.adamw(schedule, weight_decay=0.01)
        mlflow.log_params({"optimizer": describe(optimizer)[:6000],
                           "model": "tunix Qwen3 " + ", ".join(f"{k}={v}" for k, v in config.items()),
                           "lora.rank": lora["rank"], "lora.alpha": lora["alpha"],
                           "data": f"addition 1-2 digits, {len(train_batches) * args.batch_size} examples"})
        trainer = peft_trainer.PeftTrainer(model, optimizer, training_config)
        trainer = trainer.with_gen_model_input_fn(common.model_inputs) or trainer
        trainer.train(train_batches * (1 + args.steps // max(1, len(train_batches))), eval_batches)

        prompts = [p for p, _, _ in held_out[-args.n_eval :]]
        answers = common.greedy_generate(model, tokenizer, prompts)
        right = [answers_match(parse_answer(a), e) for a, (_, _, e) in zip(answers, held_out[-args.n_eval :])]
        mlflow.log_table({"prompt": prompts, "completion": answers, "expected": [e for *_, e in held_out[-args.n_eval :]],
                          "correct": right}, artifact_file="eval/predictions.json")
        mlflow.log_metric("answer_accuracy", sum(right) / len(right))
        info = common.log_qwen3_model(model, tokenizer, config, lora=lora, name="model",
                                      registered_model_name=args.registered_model, input_example=prompts[:1])
        print(f"run {run.info.run_id}: answer_accuracy {sum(right) / len(right):.3f}; "
              f"model {info.model_uri} registered as {args.registered_model} v{info.registered_model_version}")
    return run.info.run_id


if __name__ == "__main__":
    main()
