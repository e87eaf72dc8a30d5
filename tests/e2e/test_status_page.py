"""The worker's status page in a real headless Chromium: what a person opening it sees.

The page is static HTML that fills itself from `/status.json`; Chromium runs its script,
and the test reads both the rendered DOM and, through OCR, the screenshot.
"""

from __future__ import annotations

import json
import re
import secrets
import shutil
import subprocess
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from streams.settings import AccordSettings
from streams.sources import postgres
from streams.stack.install import install_debian_packages
from streams.stack.process import wait_until
from streams.workers import WorkerProcess
from tests.support import isolated, running_worker

pytestmark = pytest.mark.e2e
BROWSER_PACKAGES = ["chromium", "tesseract-ocr", "fonts-dejavu-core"]


@pytest.fixture(scope="session")
def chromium(stack: AccordSettings) -> str:
    """Debian's chromium (and tesseract for reading screenshots), installed on first use."""
    if not (shutil.which("chromium") and shutil.which("tesseract")):
        log = stack.stack.state_dir / "logs" / "browser-install.log"
        install_debian_packages(BROWSER_PACKAGES, log, print)
    path = shutil.which("chromium")
    assert path, "chromium did not install"
    return path


TOKEN = secrets.token_urlsafe(32)


@pytest.fixture
def worker(connectors: AccordSettings) -> Iterator[tuple[AccordSettings, WorkerProcess]]:
    """A worker with a web token, whose board refreshes every second and reconciles every
    3 seconds."""
    settings = isolated(connectors)
    settings = settings.model_copy(
        update={
            "worker": settings.worker.model_copy(
                update={
                    "status_interval_s": 1.0,
                    "reconcile_interval_s": 3.0,
                    "web_token": SecretStr(TOKEN),
                }
            )
        }
    )
    with running_worker(settings) as process:
        yield settings, process


def status(settings: AccordSettings) -> dict[str, Any]:
    url = f"http://{settings.worker.web_host}:{settings.worker.web_port}/status.json"
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.load(response)


def metric_values(settings: AccordSettings) -> dict[str, float]:
    url = f"http://{settings.worker.web_host}:{settings.worker.web_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }


def headless(chromium: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            chromium,
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--hide-scrollbars",
            "--window-size=1500,1300",
            # Lets the page's script fetch /status.json and render before the capture.
            "--virtual-time-budget=4000",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )


def table(html: str, table_id: str) -> str:
    found = re.search(rf'<table id="{table_id}">(.*?)</table>', html, re.S)
    assert found, f"no table {table_id} in {html}"
    return found.group(1)


def test_the_status_page_shows_lag_throughput_dlq_drift_and_latency(
    chromium: str, worker: tuple[AccordSettings, WorkerProcess], tmp_path: Path
) -> None:
    settings, _ = worker
    email = f"status-{uuid.uuid4().hex[:8]}@example.com"
    with postgres(settings, "crm") as conn:
        conn.execute(
            "INSERT INTO customers (first_name, last_name, email, country) "
            "VALUES ('Ada', 'Lovelace', %s, 'GB')",
            (email,),
        )

    def applied_and_reconciled() -> bool:
        board = status(settings)
        latency = board["latency"].get("support", {})
        return bool(latency.get("count")) and board["drift"] is not None and board["snapshot"]

    # The support applier creates the user (one latency observation), and the scheduled
    # reconcile has run at least once.
    assert wait_until(applied_and_reconciled, 120)
    board = status(settings)
    assert {card["target"] for card in board["drift"]["cards"]} == {"billing", "crm", "support"}

    # The same figures for Prometheus.
    metrics = metric_values(settings)
    app = settings.worker.app_id
    assert metrics['accord_end_to_end_latency_seconds_count{target="support"}'] >= 1
    lag = [v for k, v in metrics.items() if k.startswith(f'accord_consumer_lag{{group="{app}-')]
    assert lag and all(v >= 0 for v in lag)
    assert metrics['accord_reconcile_rows{state="in_accord",target="crm"}'] >= 1
    assert metrics["accord_dlq_messages"] == 0

    # As a person would: the token once in the URL; the cookie it sets carries the
    # redirected page and its own requests for /status.json.
    url = f"http://{settings.worker.web_host}:{settings.worker.web_port}/status?token={TOKEN}"
    dom = headless(chromium, "--dump-dom", url)
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    assert f'<span id="app">{settings.worker.app_id}</span>' in html, html
    latency, drift, lag = table(html, "latency"), table(html, "drift"), table(html, "lag")
    assert re.search(
        r"<td>support</td><td[^>]*>[\d,]+</td>(<td[^>]*>[\d,]+ ms</td>){3}", latency
    ), latency
    for target in ("billing", "crm", "support"):
        assert f"<td>{target}</td>" in drift, drift
    assert f"<td>{settings.worker.app_id}-sink-support</td>" in lag, lag
    assert re.search(r'<div id="dlq">[\d,]+ entries', html)
    assert '<span id="error"></span>' in html  # the page reached its worker
    assert '<div id="hidden" class="meta"></div>' in html  # with the token: nothing hidden

    screenshot = tmp_path / "status.png"
    shot = headless(chromium, f"--screenshot={screenshot}", url)
    assert shot.returncode == 0 and screenshot.stat().st_size > 10_000, shot.stderr[-2000:]
    ocr = subprocess.run(
        ["tesseract", str(screenshot), "-", "--psm", "3"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ocr.returncode == 0, ocr.stderr
    seen = "".join(ocr.stdout.split()).lower()  # OCR's spacing is not reliable
    for heading in (
        "accord status",
        "consumer lag",
        "throughput",
        "dead letters",
        "latency, source commit to applied",
        "drift",
        "in accord",
        "support",
    ):
        assert heading.replace(" ", "") in seen, f"{heading!r} not in the screenshot: {seen}"
