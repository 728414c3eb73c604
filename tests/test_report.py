"""The report from a real (tiny) multi-seed sweep: tables, figures, a self-contained page."""

from html.parser import HTMLParser

import pytest
from typer.testing import CliRunner

from bnexp.cli import app


@pytest.fixture(scope="module")
def experiment(tiny_mnist, tmp_path_factory):
    folder = tmp_path_factory.mktemp("report")
    path = folder / "g.yaml"
    path.write_text("name: g\nsteps: 60\neval_every: 20\ndevice: cpu\n"
                    "grid:\n  lr: [0.05, 0.5]\n")
    result = CliRunner().invoke(app, ["sweep", str(path), "--seeds", "3", "--out",
                                      str(folder / "results"), "--data-dir", str(tiny_mnist)])
    assert result.exit_code == 0, result.output
    return folder / "results" / "g"


class Collector(HTMLParser):
    def __init__(self):
        super().__init__()
        self.stack, self.urls, self.tags = [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag not in ("img", "meta", "br", "hr", "link", "input"):
            self.stack.append(tag)
        for name, value in attrs:
            if name in ("src", "href", "srcset", "data", "action") and value:
                self.urls.append(value)

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, f"unbalanced </{tag}>"
        self.stack.pop()


def test_report_files_and_table(experiment):
    result = CliRunner().invoke(app, ["report", str(experiment)])
    assert result.exit_code == 0, result.output
    md = (experiment / "report.md").read_text()
    assert "| relu lr=0.05 init=0.05 | 3 |" in md and "| relu lr=0.5 init=0.05 | 3 |" in md
    assert "95% CI" in md and "plots/overview.png" in md
    assert (experiment / "plots" / "overview.png").read_bytes()[:4] == b"\x89PNG"
    assert len(list((experiment / "plots").glob("curves-*.png"))) == 2
    assert '"torch"' in md


def test_html_is_valid_and_self_contained(experiment):
    CliRunner().invoke(app, ["report", str(experiment)])
    page = (experiment / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>")
    parser = Collector()
    parser.feed(page)
    parser.close()
    assert parser.stack == [], "every element is closed"
    assert parser.tags.count("img") == 3
    assert parser.urls and all(u.startswith("data:image/png;base64,") for u in parser.urls)
    assert "http://" not in page and "https://" not in page and "<script" not in page


def test_report_without_runs_is_a_clean_error(tmp_path):
    result = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 2 and "no finished runs" in result.stderr
