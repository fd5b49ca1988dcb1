"""The documentation site builds with --strict, its generated reference covers every key, and no page or help
text names a folder of the developers' machines."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from configs.schema import SCHEMAS
from data_prep.runs.config import load_config
from data_prep.runs.config_reference import config_reference_markdown, stage_keys

ROOT = Path(__file__).resolve().parents[1]
MACHINE_PATHS = re.compile(r"(?:^|[\s`'\"(=])/(?:work|root|home/\w+)/|/tmp/fresh")
"""Folders of the machines the project is developed on: never in what a user reads."""


def _leaves(tree: dict, prefix: str = "") -> set[str]:
    out = set()
    for key, value in tree.items():
        if isinstance(value, dict) and not prefix:
            out |= _leaves(value, f"{key}.")
        else:
            out.add(f"{prefix}{key}")
    return out


def test_site_builds_strict_and_offline(tmp_path):
    pytest.importorskip("mkdocs")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"),
                          "-d", str(tmp_path / "site")], cwd=ROOT, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    page = (tmp_path / "site" / "configuration" / "index.html").read_text(encoding="utf-8")
    assert "model.calibration" in page and "<!-- config-reference -->" not in page
    # nothing on the pages is fetched from the network when they are opened (fonts, scripts, styles)
    for html in (tmp_path / "site").rglob("*.html"):
        fetched = re.findall(r'(?:src|<link[^>]+href)="(https?://[^"]+)"', html.read_text(encoding="utf-8"))
        assert not fetched, (html, fetched)


@pytest.mark.parametrize("stage", sorted(SCHEMAS))
def test_reference_lists_every_key_of_every_stage(stage):
    documented = {f"{d.section}.{d.key}" for d in stage_keys(stage)}
    assert documented == _leaves(load_config(stage).to_dict())
    assert all(d.meaning for d in stage_keys(stage)), "every key has its meaning on its YAML line"


def test_reference_shows_what_the_schema_accepts():
    text = config_reference_markdown(["aggregation", "detector"])
    row = next(line for line in text.splitlines() if line.startswith("| `model.calibration`"))
    assert "`sigmoid`" in row and "`isotonic`" in row and "`none`" in row
    row = next(line for line in text.splitlines() if line.startswith("| `train.epochs`"))
    assert ">= 1" in row


def test_no_machine_paths_in_what_users_read():
    files = [ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "configs").glob("*.yaml"),
             *(ROOT / "benchmarks").glob("*.py")]
    found = [f"{p.relative_to(ROOT)}:{n}: {line.strip()}" for p in files
             for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), start=1)
             if MACHINE_PATHS.search(line)]
    assert not found, "\n".join(found)
