"""The documentation stays true to the code: the API reference is regenerated from the docstrings, and every link
between the docs points at an existing file."""

import re
import runpy

from .conftest import REPO_ROOT

DOCS = REPO_ROOT / "docs"


def test_api_reference_is_up_to_date():
    build = runpy.run_path(str(DOCS / "build_api_reference.py"))["build"]
    assert (DOCS / "api.md").read_text() == build(), "docs/api.md is stale: run `python docs/build_api_reference.py`"


def test_every_public_name_is_documented():
    import diffusers_magi

    reference = (DOCS / "api.md").read_text()
    for name in diffusers_magi.__all__:
        assert f"### `{name}`" in reference, name


def test_links_between_docs_resolve():
    for page in [REPO_ROOT / "README.md", *DOCS.glob("*.md")]:
        for target in re.findall(r"\]\(([^)#:]+\.md)\)", page.read_text()):
            assert (page.parent / target).is_file(), f"{page.name} links to missing {target}"
        for target in re.findall(r"`(docs/[\w./-]+\.md)`", page.read_text()):
            assert (REPO_ROOT / target).is_file(), f"{page.name} names missing {target}"
