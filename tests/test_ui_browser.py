"""The MLflow UI, in a real headless Chromium, over a store with a finished train and predict run.

`lstm-pipeline ui` serves the session's trained store on a free loopback port; Selenium drives
Debian's /usr/bin/chromium through /usr/bin/chromedriver (`.ci/run` installs both when absent;
nothing is downloaded here). Screenshots of every page go to test-artifacts/ui/.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from conftest import REPO, cli_env, free_port
from pipeline import report, tracking

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver")
SHOTS = REPO / "test-artifacts" / "ui"

pytestmark = pytest.mark.skipif(
    not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)),
    reason=f"no Chromium at {CHROMIUM} / ChromeDriver at {CHROMEDRIVER}: "
           "`apt-get install chromium chromium-driver` (.ci/run does)")


@pytest.fixture(scope="module")
def ui_url(trained):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "jobs.cli", "ui", "--tracking-uri", trained["result"].tracking_uri,
         "--port", str(port)],
        cwd=trained["store"], env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while True:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                os.killpg(proc.pid, signal.SIGKILL)
                pytest.fail(f"lstm-pipeline ui did not come up: {proc.stdout.read()[-2000:]}")
            time.sleep(0.5)
    yield url
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # No sandbox as root; no background connections (this machine's network is closed).
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-quic", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--window-size=1600,1000",
                f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    shutil.rmtree(SHOTS, ignore_errors=True)
    SHOTS.mkdir(parents=True)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def predict_run(ray_session, trained, tmp_path_factory):
    """A finished predict run with labels in the trained store (one from test_predict if any)."""
    from pipeline.config import PredictJobConfig, load_config
    from pipeline.predict import run_prediction

    mlc = tracking.client(trained["result"].tracking_uri)
    exp = mlc.get_experiment_by_name("lstm-pipeline-predict")
    runs = mlc.search_runs([exp.experiment_id], "attributes.status = 'FINISHED' and "
                           "metrics.accuracy > 0") if exp else []
    if runs:
        return runs[0]
    out = tmp_path_factory.mktemp("ui-predict") / "out"
    res = run_prediction(load_config(PredictJobConfig, None, [
        "predict.model=models:/lstm-classifier@current",
        f"predict.input_path={trained['data'] / 'val'}", f"predict.output_path={out}",
        f"tracking.tracking_uri={trained['result'].tracking_uri}"]), console=lambda line: None)
    return mlc.get_run(res.run_id)


def _open(driver, url: str, expect: str, shot: str, timeout: float = 120) -> str:
    """Load `url`, wait until the page shows `expect`, screenshot it; returns the page text."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url)
    try:
        WebDriverWait(driver, timeout).until(
            lambda d: expect in d.find_element(By.TAG_NAME, "body").text)
    finally:
        driver.save_screenshot(str(SHOTS / f"{shot}.png"))
    return driver.find_element(By.TAG_NAME, "body").text


def test_the_ui_shows_the_runs_their_metrics_artifacts_and_the_model(ui_url, browser, trained,
                                                                      predict_run):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    res = trained["result"]
    mlc = tracking.client(res.tracking_uri)
    run = mlc.get_run(res.run_id)
    name = run.info.run_name
    exp = f"{ui_url}/#/experiments/{res.experiment_id}"

    # The experiment's run table: the run by name, with the datasets it trained on.
    page = _open(browser, f"{exp}/runs", name, "1-experiment-runs")
    train_digest = report.data_digest(sorted(str(p) for p in (trained["data"] / "train").glob("*.parquet")))
    assert f"({train_digest})" in page

    # The run page: name, the command in its description, metric values as logged.
    page = _open(browser, f"{exp}/runs/{res.run_id}", "best_val_accuracy", "2-run-overview")
    assert name in page and "pytest trained fixture" in page
    assert repr(run.data.metrics["best_val_accuracy"]) in page
    assert "system/cpu_utilization_percentage" in page

    # Its metric charts: one plot per epoch metric.
    _open(browser, f"{exp}/runs/{res.run_id}/model-metrics", "val_loss", "3-run-metrics")
    WebDriverWait(browser, 120).until(
        lambda d: len(d.find_elements(By.CSS_SELECTOR, ".js-plotly-plot")) >= 4)

    # Its artifacts: the learning curves open as an image.
    page = _open(browser, f"{exp}/runs/{res.run_id}/artifacts", "learning_curves.png", "4-run-artifacts")
    assert {"confusion_matrix.png", "per_class_metrics.json", "config.yaml"} <= set(page.split())
    browser.find_element(By.XPATH, "//*[text()='learning_curves.png']").click()
    WebDriverWait(browser, 120).until(lambda d: any(
        int(img.get_attribute("naturalWidth") or 0) >= 500 for img in d.find_elements(By.TAG_NAME, "img")))
    browser.save_screenshot(str(SHOTS / "5-learning-curves.png"))

    # The registered model version: alias, source run, the description with its metrics.
    page = _open(browser, f"{ui_url}/#/models/{res.registered_name}/versions/{res.version}",
                 f"Version {res.version}", "6-model-version")
    assert "current" in page and name in page
    assert f"val_accuracy {run.data.metrics['best_val_accuracy']:.4f}" in page

    # The predict run: its name and accuracy.
    pexp = predict_run.info.experiment_id
    page = _open(browser, f"{ui_url}/#/experiments/{pexp}/runs/{predict_run.info.run_id}",
                 predict_run.info.run_name, "7-predict-run")
    assert repr(predict_run.data.metrics["accuracy"]) in page
