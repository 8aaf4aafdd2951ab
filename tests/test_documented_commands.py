"""Every command the README and docs/*.md tell a user to type exists, and its --help runs."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
COMMAND = re.compile(r"\b(python3?|bash) ((?:[\w.-]+/)*[\w.-]+\.(?:py|sh))\b")
REPO_PATH = re.compile(r"(?<![\w/.-])((?:Decentralized_FM_alpha|sparse_predictor|scripts|tests)/[\w/.-]*\.(?:py|sh))\b")


def documented(pattern: re.Pattern, group: int) -> list[tuple[str, str]]:
    found = {(m.group(group), doc.name) for doc in DOCUMENTS for m in pattern.finditer(doc.read_text())}
    return sorted(found)


COMMANDS = sorted({(m.group(1), m.group(2)) for doc in DOCUMENTS for m in COMMAND.finditer(doc.read_text())})


def test_the_documents_name_commands():
    assert len(COMMANDS) >= 20, COMMANDS  # the README's workflow alone names more; a broken pattern finds none


@pytest.mark.parametrize("path,document", documented(REPO_PATH, 1))
def test_every_path_named_in_the_docs_exists(path, document):
    assert (REPO / path).is_file(), f"{document} names {path}, which does not exist"


@pytest.mark.parametrize("interpreter,path", COMMANDS)
def test_every_documented_command_shows_its_help(interpreter, path):
    assert (REPO / path).is_file(), f"documented command {interpreter} {path} does not exist"
    command = [sys.executable if interpreter.startswith("python") else "bash", path, "--help"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stderr[-2000:]}"
    assert len(done.stdout.strip()) > 40, f"{' '.join(command)} printed no usage: {done.stdout!r}"
