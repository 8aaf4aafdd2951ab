"""Provenance for every output: the command, the git commit and the package versions."""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
_TRACKED_PACKAGES = ("torch", "transformers", "numpy", "tokenizers", "datasets", "accelerate", "tqdm")


# `git archive` writes the commit into this file (export-subst in .gitattributes); in a checkout it holds the
# placeholder. It names the commit of a tree exported without .git (e.g. copied to a GPU node).
EXPORTED_COMMIT = Path(__file__).with_name("EXPORTED_COMMIT")


def git_commit() -> str:
    """The commit of this checkout, with '-dirty' when tracked files differ from it; for a tree exported by
    `git archive`, the commit it was exported from."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        exported = EXPORTED_COMMIT.read_text().strip() if EXPORTED_COMMIT.is_file() else ""
        if len(exported) == 40 and all(c in "0123456789abcdef" for c in exported):
            return f"{exported} (git archive export)"
        return "unknown (not a git checkout)"
    return commit + ("-dirty" if dirty else "")


def package_versions() -> dict[str, str]:
    versions = {"python": sys.version.split()[0]}
    for name in _TRACKED_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def peak_rss_bytes() -> int:
    """This process's peak resident memory: VmHWM on Linux. ru_maxrss is not used there: across fork + exec it
    keeps the parent's peak (seen: 9.4 GiB reported for a child whose VmHWM was 1.5 GiB)."""
    hwm = rss_breakdown().get("VmHWM")
    if hwm:
        return int(hwm.split()[0]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # macOS: bytes would need no *1024; Linux KiB


def rss_breakdown() -> dict[str, str]:
    """Where resident memory sits now (anonymous, file-backed, shared), from /proc/self/status on Linux."""
    status = Path("/proc/self/status")
    if not status.is_file():
        return {}
    keep = ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem", "VmPin")
    return {line.split(":")[0]: line.split(":")[1].strip() for line in status.read_text().splitlines()
            if line.split(":")[0] in keep}


def base_manifest(**fields: Any) -> dict[str, Any]:
    """The provenance every manifest starts with; callers add their own fields."""
    return {"command": " ".join(sys.argv), "argv": list(sys.argv), "cwd": os.getcwd(),
            "git_commit": git_commit(), "versions": package_versions(), "start_time": now(), **fields}


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON so that a crash leaves either the old file or the new one, never half of one."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"missing file: {path}")
    with open(path) as f:
        return json.load(f)


CONVERSION_MANIFEST = "conversion_manifest.json"


def weights_provenance(model_dir: str | os.PathLike) -> dict[str, Any]:
    """Where a converted checkpoint's weights came from (its conversion manifest), carried by every later manifest:
    above all whether they were dequantized from a quantized GGUF file."""
    path = Path(model_dir) / CONVERSION_MANIFEST
    if not path.is_file():
        return {"conversion_manifest": None, "note": f"no {CONVERSION_MANIFEST} in {model_dir}: origin unknown"}
    m = read_json(path)
    return {"conversion_manifest": str(path.resolve()), "source": m.get("source"), "dtype": m.get("dtype"),
            "gguf": m.get("gguf"), "note": m.get("weights_note", "converted from a Hugging Face checkpoint")}
