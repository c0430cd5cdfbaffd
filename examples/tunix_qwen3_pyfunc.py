"""The MLflow model (from code) of a Tunix Qwen3 trained by the examples: prompts in, greedy completions out."""

import json

import mlflow
from mlflow.pyfunc import PythonModel


class TunixQwen3(PythonModel):
    def load_context(self, context):
        from safetensors.numpy import load_file
        from tunix_common import build_qwen3, load_state_arrays

        from mlflow_tunix.tokenizer import load_tokenizer

        config = json.loads(open(context.artifacts["config"]).read())
        self.model = build_qwen3(config["qwen3"], lora=config["lora"])
        load_state_arrays(self.model, load_file(context.artifacts["weights"]))
        self.tokenizer = load_tokenizer(context.artifacts["tokenizer"])

    def predict(self, context, model_input, params=None):
        from tunix_common import greedy_generate

        if hasattr(model_input, "iloc"):  # a DataFrame: its first column holds the prompts
            model_input = model_input.iloc[:, 0].tolist()
        max_new_tokens = int((params or {}).get("max_new_tokens", 48))
        return greedy_generate(self.model, self.tokenizer, [str(p) for p in model_input], max_new_tokens)


mlflow.models.set_model(TunixQwen3())
