"""The leaderboard as a user sees it: headless Chromium clicking through the MLflow UI of a real
`mlflow server`, after three real pipeline runs and two promotions.

It checks what issue #4 promises the UI shows -- the registered model's page carries the ranked
leaderboard (the description) and the stages, the link `main` prints opens the runs table sorted by
answer_accuracy, every run drawn in its own tagged colour -- and takes the screenshots of
docs/leaderboard.md. They are written to docs/img/ only with MLFLOW_TUNIX_UPDATE_SCREENSHOTS=1
(elsewhere to tmp_path: a test run must not dirty the repository).

Needs Debian's `chromium` and `chromium-driver` and the `selenium` package; it skips without them,
unless MLFLOW_TUNIX_REQUIRE_UI_TESTS=1 (CI) turns the skip into a failure.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from conftest import REPO, TINY, mlflow_server_process

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
UPDATE_SCREENSHOTS = os.environ.get("MLFLOW_TUNIX_UPDATE_SCREENSHOTS") == "1"
MODEL = "tunix-tiny"
# Two layers and a higher learning rate than the tiny project's own, so that 100 / 800 / 1200 steps
# reach clearly different answer accuracies and the ranking means something. The figures differ
# between CPUs (the step count also sets the cosine schedule): on an AVX-512 machine 0.0 / 0.525 /
# 0.725 of 40, where 600 steps gave 0.0 (on an AVX2 machine 600 steps gave 0.1).
RUN_STEPS = (100, 800, 1200)
OVERRIDES = {"model.n_layers": 2, "train.learning_rate": 0.01}
WAIT = 90  # seconds: generous page-load waits on a shared 2-core machine (a wait, not a speed assert)


def _missing() -> str | None:
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not os.access(path, os.X_OK):
            return f"{path} not found (apt-get install {package})"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "the selenium package is not installed (pip install selenium)"
    return None


if (_reason := _missing()) is not None:
    if os.environ.get("MLFLOW_TUNIX_REQUIRE_UI_TESTS") == "1":
        raise RuntimeError(f"MLFLOW_TUNIX_REQUIRE_UI_TESTS=1 but {_reason}")
    pytest.skip(_reason, allow_module_level=True)

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions as EC  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

# MLflow's server and client would phone home; nothing here may leave 127.0.0.1.
QUIET = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true", "MLFLOW_TUNIX_SYSTEM_METRICS": "0"}


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real `mlflow server` (sqlite store, proxied artifacts) on a free 127.0.0.1 port."""
    with mlflow_server_process(tmp_path_factory.mktemp("ui-server"), QUIET) as url:
        yield url


@pytest.fixture(scope="module")
def leaderboard_runs(server, tmp_path_factory):
    """Three pipeline runs over HTTP, then: promote the runner-up, promote --best, a refused promotion.

    Returns the runs, the final leaderboard and the refusal, as the UI tests see them.
    """
    import mlflow

    from mlflow_tunix import registry
    from mlflow_tunix.config import load_project
    from mlflow_tunix.errors import TunixError
    from mlflow_tunix.pipeline import run_main

    with pytest.MonkeyPatch.context() as mp:
        for var in [v for v in os.environ if v.startswith("MLFLOW_")]:
            mp.delenv(var)
        for var, value in {**QUIET, "MLFLOW_TRACKING_URI": server, "MLFLOW_REGISTRY_URI": server}.items():
            mp.setenv(var, value)
        # The registry's promotion lock file goes to the temp dir: keep it out of the shared /tmp.
        mp.setattr(tempfile, "tempdir", str(tmp_path_factory.mktemp("locks")))
        mlflow.set_tracking_uri(server)
        mlflow.set_registry_uri(server)
        # Checkpoints too stay in this test's temp dir (the default is ~/.cache/mlflow-tunix).
        checkpoints = str(tmp_path_factory.mktemp("checkpoints"))
        try:
            runs = [run_main(load_project(str(TINY), {**OVERRIDES, "train.steps": steps,
                                                      "train.checkpoint_dir": checkpoints}), progress=False)
                    for steps in RUN_STEPS]
            ranked = registry.leaderboard(MODEL)
            accuracies = [r["metrics"]["answer_accuracy"] for r in ranked]
            assert accuracies[0] > accuracies[1] > accuracies[2], (
                f"the three runs need three different answer accuracies to rank; got {accuracies}")
            registry.promote(MODEL, version=ranked[1]["version"])  # the first champion...
            best = registry.promote(MODEL, best=True)  # ...archived by the best
            with pytest.raises(TunixError, match="^refused: ") as refused:
                registry.promote(MODEL, version=ranked[2]["version"])
            yield {"runs": runs, "best": best, "refused": str(refused.value), "rows": registry.leaderboard(MODEL)}
        finally:
            while mlflow.active_run():
                mlflow.end_run()
            mlflow.set_tracking_uri(None)
            mlflow.set_registry_uri(None)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tmp_path_factory.mktemp("chromium-profile")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={profile}", "--window-size=1400,1000"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def shots(tmp_path):
    """Where screenshots go: docs/img/ when updating the docs, else this test's tmp_path."""
    folder = REPO / "docs" / "img" if UPDATE_SCREENSHOTS else tmp_path
    folder.mkdir(parents=True, exist_ok=True)
    return folder


# --------------------------------------------------------------------------- helpers
def _wait(driver, condition, what: str):
    return WebDriverWait(driver, WAIT).until(condition, message=f"waiting for {what}")


def _click(driver, css: str, what: str):
    element = _wait(driver, EC.element_to_be_clickable((By.CSS_SELECTOR, css)), what)
    element.click()
    return element


def _click_xpath(driver, xpath: str, what: str):
    element = _wait(driver, EC.element_to_be_clickable((By.XPATH, xpath)), what)
    element.click()
    return element


def _close_assistant(driver):
    """The MLflow Assistant side panel opens itself on a first visit; it would cover half the page."""
    for button in driver.find_elements(By.CSS_SELECTOR, 'button[data-component-id="mlflow.assistant.chat_panel.close"]'):
        if button.is_displayed():
            button.click()


def _screenshot(driver, path: Path) -> Path:
    driver.save_screenshot(str(path))
    size = path.stat().st_size
    assert size > 10_000, f"{path} looks empty"
    if UPDATE_SCREENSHOTS:  # docs images stay small enough to keep in git
        assert size < 300_000, f"{path} is {size:,} bytes"
    return path


def _table_cells(table) -> list[list[str]]:
    return [[td.text.strip() for td in tr.find_elements(By.TAG_NAME, "td")]
            for tr in table.find_elements(By.CSS_SELECTOR, "tbody tr")]


# --------------------------------------------------------------------------- tests
def test_registry_page_shows_the_leaderboard_and_stages(server, leaderboard_runs, browser, shots):
    """/#/models/<name>: the description is the ranked table (champion first, Production, @champion),
    and the classic versions table shows Production / Archived / Staging."""
    rows = leaderboard_runs["rows"]
    top = rows[0]
    assert top["version"] == leaderboard_runs["best"].version and top["stage"] == "Production"
    assert top["aliases"] == ["champion"]

    browser.get(f"{server}/#/models/{MODEL}")
    table = _wait(browser, EC.visibility_of_element_located(
        (By.CSS_SELECTOR, '[data-testid="note-editor-preview-content"] table')), "the leaderboard description")
    _close_assistant(browser)
    header = [th.text.strip() for th in table.find_elements(By.CSS_SELECTOR, "thead th")]
    assert header[:5] == ["rank", "version", "stage", "aliases", "answer_accuracy"]
    cells = _table_cells(table)
    # The rendered table is registry.leaderboard(): same versions in the same order, same stages.
    assert [(c[0], c[1], c[2], c[3]) for c in cells] == [
        (str(r["rank"]), r["version"], r["stage"], " ".join("@" + a for a in r["aliases"])) for r in rows]
    assert cells[0][2] == "Production" and cells[0][3] == "@champion"
    assert sorted(c[2] for c in cells) == ["Archived", "Production", "Staging"]
    assert cells[0][-1] == top["run_id"]
    # The worst version was refused against the champion (what `mlflow-tunix promote` prints).
    assert leaderboard_runs["refused"].startswith(
        f"refused: {MODEL} v{rows[-1]['version']} answer_accuracy {cells[-1][4]} is ")
    assert f"below champion v{top['version']} " in leaderboard_runs["refused"]

    # MLflow 3.17's default ("new") versions table has no stage column: switch to the classic one.
    toggle = _wait(browser, EC.presence_of_element_located(
        (By.CSS_SELECTOR, 'button[aria-label="New model registry UI"]')), "the registry UI switch")
    if toggle.get_attribute("aria-checked") == "true":
        toggle.click()
        _click_xpath(browser, "//button[normalize-space()='Disable']", "the Disable button of the confirmation")
        _wait(browser, lambda d: not any(e.is_displayed() for e in d.find_elements(
            By.CSS_SELECTOR, ".du-bois-light-modal-wrap, .du-bois-light-modal-mask")), "the confirmation to close")
    table = _wait(browser, EC.visibility_of_element_located(
        (By.XPATH, "//div[@role='table'][.//span[@title='Stage']]")), "the versions table with a Stage column")
    stages = {}
    for row in table.find_elements(By.XPATH, ".//div[@role='row'][not(contains(@class, 'table-isHeader'))]"):
        words = row.text.split()
        if "Version" in words:
            version = words[words.index("Version") + 1]
            stages[version] = next((w for w in words if w in ("None", "Staging", "Production", "Archived")), None)
    assert stages == {r["version"]: r["stage"] for r in rows}
    # The Tags section opens itself when the model has tags; folded, the versions fit in the picture.
    for header in browser.find_elements(By.CSS_SELECTOR, '[data-testid="tags-section"] [role=button][aria-expanded="true"]'):
        header.click()
    _screenshot(browser, shots / "registry-leaderboard.png")


def test_printed_link_opens_the_runs_sorted_by_accuracy(server, leaderboard_runs, browser, shots):
    """`runs.ui_link` (printed at the end of main) opens the runs table sorted by answer_accuracy,
    best first, each run in the colour its mlflow.runColor tag names."""
    from mlflow import MlflowClient

    from mlflow_tunix.runs import ui_link

    runs = leaderboard_runs["runs"]
    experiment_id = runs[0].experiment_id
    link = ui_link(experiment_id)
    assert link.startswith(server + "/#/experiments/")  # the server the runs went to, not localhost:5000

    client = MlflowClient(server)
    accuracy = {r.run_id: client.get_run(r.run_id).data.metrics["answer_accuracy"] for r in runs}
    colors = {r.run_id: client.get_run(r.run_id).data.tags["mlflow.runColor"] for r in runs}

    browser.get(link)
    _wait(browser, lambda d: len(_displayed_runs(d)) == len(runs), "the three runs in the runs table")
    _close_assistant(browser)
    sort_button = _wait(browser, EC.visibility_of_element_located(
        (By.XPATH, "//button[contains(normalize-space(), 'Sort:')]")), "the sort selector")
    assert "answer_accuracy" in sort_button.text
    shown = _displayed_runs(browser)
    assert [accuracy[run_id] for run_id, _ in shown] == sorted(accuracy.values(), reverse=True)
    assert {run_id: color for run_id, color in shown} == colors

    # Show the sorted-by column too (picking it in the sort menu adds it; the order stays descending).
    sort_button.click()
    _click(browser, '[data-testid="sort-select-answer_accuracy"]', "answer_accuracy in the sort menu")
    header = _wait(browser, EC.visibility_of_element_located(
        (By.CSS_SELECTOR, '[data-testid="sort-header-answer_accuracy"]')), "the answer_accuracy column")
    browser.find_element(By.TAG_NAME, "body").click()  # close the menu before the screenshot
    assert header.text == "answer_accuracy"
    # The new column is the grid's last and too narrow for its name: scroll the grid sideways and
    # widen the column by its resize handle, as a user would, so it shows whole in the picture.
    cell = header.find_element(By.XPATH, "./ancestor::div[contains(@class, 'ag-header-cell ')][1]")
    for _ in range(8):
        browser.execute_script("const s = document.querySelector('.ag-body-horizontal-scroll-viewport');"
                               "s.scrollLeft = s.scrollWidth;")
        if cell.size["width"] >= 150:
            break
        handle = cell.find_element(By.CSS_SELECTOR, ".ag-header-cell-resize")
        ActionChains(browser).click_and_hold(handle).move_by_offset(30, 0).release().perform()
    assert [run_id for run_id, _ in _displayed_runs(browser)] == [run_id for run_id, _ in shown]
    _screenshot(browser, shots / "runs-sorted.png")


def _displayed_runs(driver) -> list[tuple[str, str]]:
    """(run id, colour) of the runs table's rows, top to bottom (ag-grid positions rows absolutely,
    so DOM order is not display order: row-index is)."""
    rows = driver.find_elements(By.CSS_SELECTOR, ".ag-pinned-left-cols-container [role=row][row-id]")
    shown = []
    for row in sorted(rows, key=lambda r: int(r.get_attribute("row-index"))):
        swatch = row.find_elements(By.CSS_SELECTOR, '[data-testid="experiment-view-table-run-color"] input')
        shown.append((row.get_attribute("row-id"), swatch[0].get_attribute("value") if swatch else None))
    return shown


def test_chart_view_draws_one_loss_curve_per_run(server, leaderboard_runs, browser, shots):
    """The chart view of the same link: the `loss` chart, full screen, has one curve per run,
    labelled with its run name and drawn in its own colour."""
    from mlflow import MlflowClient

    from mlflow_tunix.runs import ui_link

    runs = leaderboard_runs["runs"]
    client = MlflowClient(server)
    names = [client.get_run(r.run_id).info.run_name for r in runs]
    assert names == [f"tiny-{steps}steps-seed0" for steps in RUN_STEPS]

    browser.get(ui_link(runs[0].experiment_id))
    _wait(browser, lambda d: len(_displayed_runs(d)) == len(runs), "the three runs in the runs table")
    _close_assistant(browser)
    # The view switch is a radio group whose inputs are hidden behind their labels.
    _click_xpath(browser, "//input[@name='runs-view-mode'][@value='CHART']/ancestor::label[1]", "the chart view")
    search = _wait(browser, EC.visibility_of_element_located(
        (By.CSS_SELECTOR, 'input[placeholder="Search metric charts"]')), "the chart search box")
    search.send_keys("loss")
    _click_xpath(browser, "//div[@data-testid='experiment-view-compare-runs-card'][.//h4[@title='loss']]"
                          "//button[@data-component-id='fullscreen_button_chartcard']", "the loss chart's full-screen button")
    dialog = _wait(browser, EC.visibility_of_element_located(
        (By.XPATH, "//div[@role='dialog'][.//*[normalize-space()='Step']]")), "the full-screen loss chart")
    _wait(browser, lambda d: all(f"{name} (loss)" in dialog.text for name in names), "a legend entry per run")
    # Each curve is drawn in its run's mlflow.runColor, and no two runs share one (issue #4: the
    # curves must be told apart).
    strokes = {line.value_of_css_property("stroke") for line in dialog.find_elements(By.CSS_SELECTOR, "path.js-line")}
    colors = {name: client.get_run(r.run_id).data.tags["mlflow.runColor"] for name, r in zip(names, runs)}
    for color in colors.values():
        assert _rgb(color) in strokes, (color, strokes)
    assert len(set(colors.values())) == len(runs), f"runs share a colour: {colors}"
    _screenshot(browser, shots / "compare-loss.png")


def _rgb(hex_color: str) -> str:
    """'#1f77b4' -> 'rgb(31, 119, 180)', as the browser reports a computed stroke."""
    r, g, b = (int(hex_color.lstrip("#")[i : i + 2], 16) for i in (0, 2, 4))
    return f"rgb({r}, {g}, {b})"



def test_printed_link_shows_the_metric_columns(server, leaderboard_runs, browser):
    """`runs.table_link` (printed at the end of main): sorted by answer_accuracy, with the metric
    columns already shown (MLflow's URL holds no columns: the link names a shared view)."""
    from mlflow_tunix.runs import TABLE_COLUMNS, table_link

    runs = leaderboard_runs["runs"]
    link = table_link(runs[0].experiment_id)
    assert "viewStateShareKey=" in link and table_link(runs[0].experiment_id) == link  # same view, same key
    browser.get(link)
    _wait(browser, lambda d: len(_displayed_runs(d)) == len(runs), "the three runs in the runs table")
    _close_assistant(browser)
    for metric in TABLE_COLUMNS:
        _wait(browser, EC.presence_of_element_located((By.CSS_SELECTOR, f'[data-testid="sort-header-{metric}"]')),
              f"the {metric} column")


def test_compare_page_opens_in_the_artifact_viewer(server, leaderboard_runs, browser, shots):
    """`mlflow-tunix compare`'s HTML page, logged to the newest run, shows in the run's Artifacts tab."""
    import mlflow

    from mlflow_tunix.compare import compare_runs, log_html

    runs = leaderboard_runs["runs"]
    mlflow.set_tracking_uri(server)
    try:
        result = compare_runs([r.run_id for r in runs])
        target, path = log_html(result)
    finally:
        mlflow.set_tracking_uri(None)
    assert target == runs[-1].run_id
    browser.get(f"{server}/#/experiments/{runs[0].experiment_id}/runs/{target}/artifacts/{path}")
    _close_assistant(browser)
    frame = _wait(browser, EC.presence_of_element_located((By.CSS_SELECTOR, "iframe")), "the HTML artifact's frame")
    browser.switch_to.frame(frame)
    try:
        heading = _wait(browser, EC.presence_of_element_located((By.XPATH, "//h3[contains(., 'items where the runs disagree')]")),
                        "the disagreement heading")
        assert heading.text.startswith(f"{len(result.disagreeing)} of {len(result.items)} items")
    finally:
        browser.switch_to.default_content()
    _screenshot(browser, shots / "compare-html.png")


def test_leaderboard_run_ids_link_to_their_runs(server, leaderboard_runs, browser):
    """The run ids in the registered model's markdown leaderboard are links that open the run."""
    top = leaderboard_runs["rows"][0]
    browser.get(f"{server}/#/models/{MODEL}")
    link = _wait(browser, EC.element_to_be_clickable(
        (By.CSS_SELECTOR, f'[data-testid="note-editor-preview-content"] table a[href$="#/runs/{top["run_id"]}"]')),
        "the champion's run link")
    _close_assistant(browser)
    assert link.text == top["run_id"]
    home = browser.current_window_handle
    link.click()  # the description's links open in a new tab
    _wait(browser, lambda d: len(d.window_handles) == 2, "the run's tab")
    browser.switch_to.window(next(h for h in browser.window_handles if h != home))
    try:  # MLflow's /runs/<id> route finds the run's experiment
        _wait(browser, lambda d: f"/experiments/{leaderboard_runs['runs'][0].experiment_id}/runs/{top['run_id']}"
              in d.current_url, "the run's page")
    finally:
        browser.close()
        browser.switch_to.window(home)
