"""The README and docs/ pages: every relative link resolves, and the results summary lists every result file."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _relative_links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.DOTALL)  # links inside code blocks are not links
    return [t for t in LINK.findall(text) if not re.match(r"[a-z]+://|mailto:|#", t)]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    missing = [t for t in _relative_links(page) if not (page.parent / t.split("#")[0]).exists()]
    assert not missing, f"{page.relative_to(ROOT)} links to missing files: {missing}"


def test_results_summary_lists_every_result_file():
    results = ROOT / "docs" / "results"
    summary = (results / "README.md").read_text().split("## Details")[0]
    listed = {t for t in _relative_links(results / "README.md") if t in summary}
    files = {p.name for p in results.glob("*.md") if p.name != "README.md"}
    assert files - listed == set(), f"docs/results/README.md's summary misses {sorted(files - listed)}"


def test_readme_stays_a_front_door():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 220, f"README.md has {len(lines)} lines; move detail to docs/ (it is the front door)"
    text = "\n".join(lines)
    assert "make demo" in text and "make test" in text  # the two set-up commands
