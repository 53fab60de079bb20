"""Headless Chromium for tests: Debian's ``chromium`` (``.ci/run`` installs it), driven by Playwright."""

from __future__ import annotations

import shutil

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on this machine (Debian: apt-get install chromium; .ci/run installs it)")


def launch(playwright):
    """A headless Chromium of the system, offline-friendly (no sandbox, GPU, QUIC or background traffic)."""
    return playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
        "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"])
