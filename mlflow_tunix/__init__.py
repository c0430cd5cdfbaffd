"""mlflow-tunix: MLflow as the home of JAX reasoning-model experiments.

The package reads as the pipeline, one module per stage: ``data`` -> ``tokenizer`` -> ``model`` ->
``train`` -> ``generate`` -> ``evaluate`` -> ``flavor`` -> ``registry``; ``pipeline`` runs them in
one MLflow run and ``cli`` is the ``mlflow-tunix`` command.

The MLflow flavor is re-exported here, so it reads like MLflow's own::

    import mlflow_tunix
    info = mlflow_tunix.log_model(model, name="adder", tokenizer=tok)
    loaded = mlflow_tunix.load_model(info.model_uri)
"""

__version__ = "0.1.0"

_FLAVOR_API = ("save_model", "log_model", "load_model", "FLAVOR_NAME")
_HF_API = ("export_hf", "load_checkpoint")


def __getattr__(name):
    # Lazy, so `import mlflow_tunix` (and `mlflow-tunix --help`) does not import jax and mlflow.
    if name in _FLAVOR_API:
        from mlflow_tunix import flavor

        return getattr(flavor, name)
    if name in _HF_API:  # Hugging Face checkpoints in and out
        from mlflow_tunix import hf

        return getattr(hf, name)
    raise AttributeError(f"module 'mlflow_tunix' has no attribute {name!r}")
