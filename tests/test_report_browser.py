"""The report page in a real browser: headless Chromium (Debian's `chromium` package)
renders report.html offline and the screenshot shows tables and figures.

Skipped where Chromium is not installed (CI); run it where it is: `apt-get install chromium`.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest
from test_report import study  # noqa: F401  (the fixture study folder)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed")
def test_report_renders_in_headless_chromium(study, tmp_path):  # noqa: F811
    import matplotlib.image as mpimg

    from emguard.report import build_report

    report = build_report(study, compare_paper=True)
    shot = tmp_path / "report.png"
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    "--window-size=1280,2400", f"--screenshot={shot}",
                    report.html.resolve().as_uri()], check=True, capture_output=True, timeout=120)
    img = mpimg.imread(shot)
    assert img.shape[0] == 2400 and img.shape[1] == 1280
    # not a blank page: text, table borders and the plots make many distinct rows
    rows = img[:, :, :3].mean(axis=(1, 2))
    assert (rows < 0.97).sum() > 600
    shutil.copy(shot, report.out / "screenshot.png")
