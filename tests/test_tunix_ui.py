"""What a Tunix user sees in the MLflow UI: a real PeftTrainer run logged through mlflow_tunix.tunix to a real
`mlflow server`, its metric charts in headless Chromium (the screenshot of docs/tunix.md, written to docs/img/ only
with MLFLOW_TUNIX_UPDATE_SCREENSHOTS=1). Needs the `[tunix]` extra and Chromium (see tests/test_ui.py)."""

from __future__ import annotations


from conftest import mlflow_server_process
from test_tunix import tunix_installed, train_tiny  # noqa: F401
from test_ui import QUIET, _close_assistant, _screenshot, _wait, browser, shots  # noqa: F401

from selenium.webdriver.common.by import By  # noqa: E402  (test_ui skipped the module if selenium is missing)


def test_tunix_metrics_appear_as_charts_of_the_run(tunix_installed, tmp_path, browser, shots, monkeypatch):  # noqa: F811
    import mlflow

    from mlflow_tunix.tunix import log_tunix_config, metrics_logger_options

    with mlflow_server_process(tmp_path, QUIET) as url:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        mlflow.set_tracking_uri(url)
        mlflow.set_experiment("tunix-sft")
        with mlflow.start_run(run_name="qwen3-tiny-sft") as run:
            options = metrics_logger_options()
            trainer = train_tiny(options, steps=30, eval_every=5)
            log_tunix_config(trainer.config)
        try:
            browser.get(f"{url}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}/model-metrics")
            _close_assistant(browser)
            titles = lambda d: {h.get_attribute("title") for h in d.find_elements(By.CSS_SELECTOR, "h4[title]")}  # noqa: E731
            expected = {"train/loss", "train/perplexity", "train/grad_norm", "eval/loss", "eval/perplexity"}
            _wait(browser, lambda d: expected <= titles(d), "a chart for each Tunix metric")
            assert not [t for t in titles(browser) if "jax" in t]
            _wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "path.js-line")) >= len(expected),
                  "the curves drawn")
            _close_assistant(browser)  # it may open itself late
            _screenshot(browser, shots / "tunix-run-metrics.png")
        finally:
            mlflow.set_tracking_uri(None)
