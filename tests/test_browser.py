"""report.html in a real headless browser: it renders, every image decodes, the table is there.

Needs Chromium (`make browser` installs Debian's); skipped where none is found.
"""

import json
import re
import shutil
import subprocess

import pytest
from typer.testing import CliRunner

from bnexp.cli import app

BROWSER = next((b for b in ("chromium", "chromium-browser", "google-chrome")
                if shutil.which(b)), None)
pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(BROWSER is None, reason="no Chromium (make browser)")]

# Appended to a copy of the page (the report itself carries no script): once everything has
# loaded, it writes what it found into the DOM, which --dump-dom prints.
PROBE = """<script>
window.addEventListener("load", () => {
  const images = [...document.images];
  const table = document.querySelector("table#comparison");
  const out = document.createElement("pre");
  out.id = "probe";
  out.textContent = JSON.stringify({
    images: images.length,
    decoded: images.filter(i => i.complete && i.naturalWidth > 0).length,
    captions: document.querySelectorAll("figure figcaption").length,
    rows: table ? table.tBodies[0].rows.length : -1,
    header: table ? [...table.tHead.rows[0].cells].map(c => c.textContent) : [],
  });
  document.body.appendChild(out);
});
</script>"""


def chromium(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([BROWSER, "--headless", "--no-sandbox", "--disable-gpu",
                           "--disable-dev-shm-usage", "--hide-scrollbars", *args],
                          capture_output=True, text=True, timeout=120)


def test_report_renders_in_a_browser(tiny_mnist, tmp_path):
    path = tmp_path / "g.yaml"
    path.write_text("name: g\nsteps: 40\neval_every: 20\ndevice: cpu\ngrid:\n"
                    "  lr: [0.05, 0.5]\n")
    out = tmp_path / "results"
    runner = CliRunner()
    assert runner.invoke(app, ["sweep", str(path), "--seeds", "2", "--out", str(out),
                               "--data-dir", str(tiny_mnist)]).exit_code == 0
    assert runner.invoke(app, ["report", str(out / "g")]).exit_code == 0
    page = out / "g" / "report.html"

    shot = tmp_path / "report.png"
    result = chromium(f"--screenshot={shot}", "--window-size=1280,2400", page.as_uri())
    assert shot.is_file(), result.stderr
    from PIL import Image

    with Image.open(shot) as image:
        image.load()
        assert image.size == (1280, 2400)
        colours = image.convert("L").getextrema()
    assert colours[0] < 100 < colours[1], "the screenshot shows text and figures, not a blank"

    probed = tmp_path / "probed.html"
    probed.write_text(page.read_text().replace("</body>", PROBE + "</body>"))
    dom = chromium("--virtual-time-budget=10000", "--dump-dom", probed.as_uri()).stdout
    found = json.loads(re.search(r'<pre id="probe">(.*?)</pre>', dom, re.S).group(1)
                       .replace("&quot;", '"').replace("&amp;", "&"))
    assert found["images"] == 4 == found["decoded"] == found["captions"]
    assert found["rows"] == 2
    assert found["header"][0] == "cell" and "BN − plain (pts) [95% CI]" in found["header"]
