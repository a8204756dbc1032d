"""Debian's headless Chromium under selenium, both binaries named so that nothing is
downloaded (selenium-manager would fetch a browser and a driver otherwise)."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


def skip_without_browser() -> None:
    if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
        pytest.skip("Debian's chromium and chromium-driver are not installed (scripts/setup.sh)")
    pytest.importorskip("selenium")


@contextmanager
def chromium(home: Path | None = None, log: Path | None = None) -> Iterator[Any]:
    """A headless Chromium; ``home`` its HOME (where it finds ``.pki/nssdb``)."""
    skip_without_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--no-first-run"):
        options.add_argument(arg)
    options.add_argument("--window-size=1400,1000")
    env = dict(os.environ)
    if home is not None:
        env["HOME"] = str(home)
        options.add_argument(f"--user-data-dir={home / 'profile'}")
    service = Service(
        executable_path=CHROMEDRIVER, env=env, log_output=str(log) if log else os.devnull
    )
    driver = webdriver.Chrome(options=options, service=service)
    try:
        yield driver
    finally:
        driver.quit()


def nss_trust(home: Path, ca_pem: Path) -> None:
    """Make ``home``'s NSS database (Chromium's on Linux) trust ``ca_pem`` for servers."""
    certutil = shutil.which("certutil")
    if certutil is None:
        pytest.skip("certutil (libnss3-tools) is not installed")
    db = home / ".pki" / "nssdb"
    db.mkdir(parents=True, exist_ok=True)
    subprocess.run([certutil, "-N", "-d", f"sql:{db}", "--empty-password"], check=True)
    subprocess.run(
        [certutil, "-A", "-d", f"sql:{db}", "-n", "vmmesh mesh CA", "-t", "C,,", "-i", str(ca_pem)],
        check=True,
    )
