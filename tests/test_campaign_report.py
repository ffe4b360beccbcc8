"""The campaign report in headless Chromium (Debian's `chromium`, installed by .ci/run): every figure loads, no
script or resource error, nothing wider than the page at a desktop width and at an A4 page's width."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from oppass.campaign import CampaignConfig, run_campaign

REPO_ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# An A4 page is 794 CSS pixels wide at 96 dpi.
WIDTHS = (1280, 794)
CHECK = """<script>
window.oppassErrors = [];
window.addEventListener("error", (e) => window.oppassErrors.push(String(e.message || (e.target && e.target.src)
  || "error").slice(0, 80)), true);
window.addEventListener("load", () => {
  const width = document.documentElement.clientWidth;
  const wide = [...document.body.querySelectorAll("*")].filter((e) => e.getBoundingClientRect().right > width + 0.5);
  const images = [...document.images];
  const result = {errors: window.oppassErrors, images: images.length,
    broken: images.filter((i) => !i.complete || i.naturalWidth === 0).length,
    overflow: document.documentElement.scrollWidth - width, wide: wide.map((e) => e.tagName).slice(0, 5)};
  const out = document.createElement("pre");
  out.id = "oppass-check";
  out.textContent = JSON.stringify(result);
  document.body.appendChild(out);
});
</script>"""

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium)")]


@pytest.fixture(autouse=True)
def library(custom_op_library: str) -> str:
    return custom_op_library


def test_the_report_loads_without_errors_and_fits_the_page(tmp_path: Path) -> None:
    out = tmp_path / "campaign"
    run_campaign(CampaignConfig(
        model=REPO_ROOT / "oppass" / "examples" / "digits_cnn.onnx", data="digits", out=out, formats=("fp32", "int8"),
        protections=("none", "weight", "64", "256"), ecc=True, bit_positions=True, batch_study=True,
        ber_min=1e-4, ber_max=1e-2, points_per_decade=1, experiments=2, batch_size=50, scheduler="serial", seed=2,
        command="oppass campaign oppass/examples/digits_cnn.onnx --data digits --out " + "a-long-path/" * 20,
    ), log=None)
    report = (out / "report.html").read_text()
    for heading in ("Command", "Data", "Definitions", "Table II", "Per condition", "Bit-position study",
                    "Batch-size study", "Figures"):
        assert f"<h2>{heading}</h2>" in report
    assert "BERZAD 0: the lowest BER of the grid is already lossy" in report
    checked = tmp_path / "checked.html"
    checked.write_text(report.replace("<head>", "<head>" + CHECK, 1))
    for width in WIDTHS:
        result = _render(checked, width, tmp_path / f"report_{width}.png")
        assert result["errors"] == [] and result["broken"] == 0 and result["images"] == 4, result
        assert result["overflow"] <= 0 and result["wide"] == [], result


def _render(page: Path, width: int, screenshot: Path) -> dict:
    """The check script's verdict on `page` at `width` CSS pixels (and a screenshot of its top)."""
    base = [str(CHROMIUM), "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
            f"--window-size={width},2000", "--virtual-time-budget=10000"]
    dom = subprocess.run([*base, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120,
                         check=True).stdout
    subprocess.run([*base, f"--screenshot={screenshot}", page.as_uri()], capture_output=True, timeout=120, check=True)
    match = re.search(r'<pre id="oppass-check">(.*?)</pre>', dom, re.S)
    assert match, "the check script did not run"
    return json.loads(match[1].replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">"))
