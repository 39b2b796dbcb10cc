"""The README is a newcomer's page: short, code first, and every docs page reachable from it."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_readme_is_short_and_starts_with_code():
    lines = README.splitlines()
    assert len(lines) <= 250
    start = lines.index("## Quickstart")
    assert start < 80
    fence = lines.index("```python", start)
    end = lines.index("```", fence + 1)
    assert end < 80 and end - fence - 1 <= 25


def test_every_docs_page_is_linked_from_the_readme_and_every_link_resolves():
    linked = set(re.findall(r"\]\(([^)#]+\.md)\)", README))
    pages = {str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md")}
    assert pages <= linked, f"not linked from the README: {sorted(pages - linked)}"
    for page in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]:
        for target in re.findall(r"\]\(([^)#:]+\.md)\)", page.read_text()):
            assert (page.parent / target).exists(), f"{page.name} links to missing {target}"


def test_readme_python_names_exist():
    """What the README tells a user to import exists where it says."""
    import markovscale_dspy

    for name in re.findall(r"from markovscale_dspy import ([\w, ]+)", README):
        for part in name.split(","):
            assert hasattr(markovscale_dspy, part.strip()), part
    for name in ("build_lm", "LocalModel", "load_task", "RefineAccount", "MarkovScale"):
        assert hasattr(markovscale_dspy, name), name
