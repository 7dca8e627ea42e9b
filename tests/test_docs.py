"""The docs match the code: every config key is in docs/config.md with its default; README links resolve."""

import re
from pathlib import Path

import ml_collections

from colax import config

ROOT = Path(__file__).parents[1]


def key_paths(cfg, prefix=""):
    """{"section.key": default} of every leaf of a ConfigDict."""
    out = {}
    for key, value in cfg.items():
        if isinstance(value, ml_collections.ConfigDict):
            out.update(key_paths(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def test_every_config_key_is_documented_with_its_default():
    text = (ROOT / "docs" / "config.md").read_text()
    rows = dict(re.findall(r"^\| `([\w.]+)` \| `([^`]*)` \|", text, re.MULTILINE))
    defaults = key_paths(config.defaults())
    assert sorted(set(defaults) - set(rows)) == [], "keys of config.defaults() missing from docs/config.md"
    assert sorted(set(rows) - set(defaults)) == [], "docs/config.md documents keys config.defaults() lacks"
    for key, value in defaults.items():
        assert rows[key] == (f'"{value}"' if isinstance(value, str) else repr(value)), f"default of {key}"


def test_readme_links_resolve():
    links = re.findall(r"\]\(([^)#]+)\)", (ROOT / "README.md").read_text())
    local = [link for link in links if "://" not in link]
    assert {"docs/architecture.md", "docs/config.md", "notebooks/"} <= set(local)
    assert [link for link in local if not (ROOT / link).exists()] == []


def test_links_between_docs_resolve():
    for doc in (ROOT / "docs").glob("*.md"):
        for link in re.findall(r"\]\(([^)#]+)\)", doc.read_text()):
            if "://" not in link:
                assert (doc.parent / link).exists(), f"{doc.name} links to {link}"
