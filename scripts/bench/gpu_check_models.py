"""GPU check of the OPT / Llama paths at real shapes with random weights (issues: OPT path, Llama modules).

Builds a random Hugging Face model at a known shape (Llama-3.2-3B from
tests/fixtures/llama-3.2-3b-config.json, or OPT-1.3b), saves and converts it with our
converter, then measures in one process:
  * log-probs of our runner vs HF on the same weights, in the half dtype, next to the
    HF-half vs HF-fp32 gap (the size of rounding differences at that dtype);
  * tokens/s of plain inference and of collection, peak GPU memory, bytes written per token.
With --pipeline-ranks 2 it also runs the runner as 2 pipeline stages (one GPU each, NCCL)
and compares their log-probs with the 1-GPU run. Writes everything to --out (JSON + logs).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM  # noqa: E402

from Decentralized_FM_alpha import convert_llama_checkpoint, convert_opt_checkpoint, dist_inference_runner  # noqa: E402
from scripts.bench.common import write_c4_requests  # noqa: E402
from tests.helpers_tokenizer import build_test_tokenizer  # noqa: E402

OPT_SHAPES = {"1.3b": dict(hidden_size=2048, ffn_dim=8192, num_hidden_layers=24, num_attention_heads=32),
              "125m": dict(hidden_size=768, ffn_dim=3072, num_hidden_layers=12, num_attention_heads=12)}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def build_hf_model(family: str, shape: str, dtype: torch.dtype, seed: int):
    torch.manual_seed(seed)
    if family == "llama":
        values = json.loads((REPO / "tests/fixtures/llama-3.2-3b-config.json").read_text())
        config, cls = LlamaConfig(**values), LlamaForCausalLM
    else:
        config = OPTConfig(vocab_size=50272, max_position_embeddings=2048, word_embed_proj_dim=OPT_SHAPES[shape]["hidden_size"],
                           pad_token_id=1, bos_token_id=2, eos_token_id=2, **OPT_SHAPES[shape])
        cls = OPTForCausalLM
    with torch.device("cuda"):
        model = cls(config).to(dtype).eval()  # saved in the half dtype, like the released checkpoints
        for name, p in model.named_parameters():  # norms start at 1/0: perturb so mapping errors show
            if "norm" in name:
                p.data.add_(0.1 * torch.randn_like(p))
    return model



def run_runner(args: list[str]) -> dict:
    torch.cuda.reset_peak_memory_stats()
    dist_inference_runner.main(args)
    out = Path(args[args.index("--output-path") + 1])
    manifest = json.loads(Path(str(out) + ".manifest.json").read_text())
    tokens = sum(len(json.loads(l)["result"]["choices"][0]["logprobs"]["token_logprobs"]) for l in open(out))
    return {"seconds": manifest["seconds"], "tokens": tokens, "tokens_per_s": tokens / manifest["seconds"],
            "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30, "perplexity": manifest.get("perplexity")}


def hf_logprobs(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(model(ids).logits[0].double(), -1)[:-1].gather(1, ids[0, 1:, None])[:, 0]


def runner_logprobs(out_path: Path, n: int) -> list[torch.Tensor]:
    return [torch.tensor(json.loads(l)["result"]["choices"][0]["logprobs"]["token_logprobs"][1:], device="cuda",
                         dtype=torch.float64) for l in list(open(out_path))[:n]]


def gap(a: list[torch.Tensor], b: list[torch.Tensor]) -> dict:
    d = torch.cat([x - y for x, y in zip(a, b)]).abs()
    return {"max": d.max().item(), "mean": d.mean().item()}


def logprob_gaps(hf_dir: Path, family: str, dtype: torch.dtype, half_out: Path, fp32_out: Path, tokenizer,
                 n_check: int) -> dict:
    """Our runner vs HF on the same saved weights, in the half dtype and in fp32.

    The HF references are loaded with from_pretrained(dtype=...), as a user would: casting a
    built model with .to(bf16) would also round Llama's rotary inv_freq buffer, which HF keeps in
    float32. Half-precision runs of a deep random model differ by rounding that grows with
    depth, so the half gaps are shown next to HF's own half-vs-fp32 gap; fp32 is the sharp check."""
    cls = LlamaForCausalLM if family == "llama" else OPTForCausalLM
    prompts = [json.loads(l)["request"]["prompt"] for l in list(open(half_out))[:n_check]]
    ids = [torch.tensor([tokenizer(p)["input_ids"]], device="cuda") for p in prompts]
    ours_half, ours_fp32 = runner_logprobs(half_out, n_check), runner_logprobs(fp32_out, n_check)
    refs = {}
    for name, ref_dtype in (("half", dtype), ("fp32", torch.float32)):
        model = cls.from_pretrained(hf_dir, dtype=ref_dtype).cuda().eval()
        refs[name] = [hf_logprobs(model, x) for x in ids]
        del model
        torch.cuda.empty_cache()
    return {"ours_half_vs_hf_half": gap(ours_half, refs["half"]), "ours_half_vs_hf_fp32": gap(ours_half, refs["fp32"]),
            "hf_half_vs_hf_fp32": gap(refs["half"], refs["fp32"]), "ours_fp32_vs_hf_fp32": gap(ours_fp32, refs["fp32"]),
            "tokens": sum(x.numel() for x in ours_half)}


def pipeline_check(common: list[str], model_type: str, reference_out: Path, out_dir: Path, ranks: int) -> dict:
    """The same run as `reference_out` (1 GPU) split into `ranks` pipeline stages, one GPU each, over NCCL."""
    url = "tcp://127.0.0.1:29533"
    env = {**os.environ, "PYTHONPATH": str(REPO), "NCCL_NVLS_ENABLE": "0"}
    out = out_dir / "pipeline_out.jsonl"
    procs = [subprocess.Popen([sys.executable, str(REPO / "Decentralized_FM_alpha/dist_inference_runner.py"),
                               *common, "--model-type", model_type, "--output-path", str(out), "--cuda-id", str(r), "--world-size", str(ranks), "--rank", str(r), "--dist-url", url,
                               "--dist-backend", "nccl"], env=env,
                              stdout=open(out_dir / f"pipeline_rank{r}.log", "w"), stderr=subprocess.STDOUT)
             for r in range(ranks)]
    codes = [p.wait(timeout=500) for p in procs]
    if any(codes):
        return {"error": f"exit codes {codes}; see pipeline_rank*.log"}
    diffs = []
    for a, b in zip(open(reference_out), open(out)):
        la = json.loads(a)["result"]["choices"][0]["logprobs"]["token_logprobs"][1:]
        lb = json.loads(b)["result"]["choices"][0]["logprobs"]["token_logprobs"][1:]
        diffs.append((torch.tensor(la) - torch.tensor(lb)).abs().max().item())
    return {"ranks": ranks, "max_abs_diff_vs_1gpu": max(diffs), "requests": len(diffs),
            "manifest": json.loads(Path(str(out) + ".manifest.json").read_text()).get("seconds")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", choices=("llama", "opt"), required=True)
    p.add_argument("--opt-shape", choices=sorted(OPT_SHAPES), default="1.3b", help="OPT shape (family opt)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--docs", type=int, default=64, help="documents for the inference timing")
    p.add_argument("--max-chars", type=int, default=4000, help="characters kept per document")
    p.add_argument("--collect-rows", type=int, default=50_000, help="rows to collect in the collection timing")
    p.add_argument("--check-docs", type=int, default=4, help="documents compared with HF")
    p.add_argument("--batch", type=int, default=8, help="--token-micro-batch-size")
    p.add_argument("--sparse-timing", action="store_true",
                   help="also time sparse-simulated inference (oracle, random, random-weight predictors) vs dense")
    p.add_argument("--skip-collection", action="store_true", help="skip the collection timing")
    p.add_argument("--pipeline-ranks", type=int, default=1, help="also run this many pipeline stages (GPUs)")
    p.add_argument("--work", default="/tmp/gpu_check", help="scratch directory for checkpoints and data")
    p.add_argument("--out", required=True, help="directory for the JSON summary")
    a = p.parse_args()
    work, out = Path(a.work) / a.family, Path(a.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    dtype = DTYPES[a.dtype]
    report: dict = {"family": a.family, "dtype": a.dtype, "gpu": torch.cuda.get_device_name(),
                    "torch": torch.__version__}
    tok_dir = build_test_tokenizer(work / "tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    model = build_hf_model(a.family, a.opt_shape, dtype, seed=0)
    report["params"] = sum(p.numel() for p in model.parameters())
    hf_dir, converted = work / "hf", work / "converted"
    model.save_pretrained(hf_dir)
    tokenizer.save_pretrained(hf_dir)
    del model
    torch.cuda.empty_cache()
    converter = convert_llama_checkpoint if a.family == "llama" else convert_opt_checkpoint
    t0 = time.time()
    converter.main(["--model-name", str(hf_dir), "--save-path", str(converted)])
    report["convert_seconds"] = time.time() - t0
    req = work / "req.jsonl"
    write_c4_requests(req, a.docs, a.max_chars)
    common = ["--model-name", str(converted), "--dtype", a.dtype, "--infer-data", str(req), "--use-cuda", "true",
              "--token-micro-batch-size", str(a.batch), "--max-seq-len", "2048"]
    dense_out = work / "dense.jsonl"
    run_runner(common + ["--model-type", a.family, "--output-path", str(dense_out)])  # warm-up (kernels, allocator)
    report["inference"] = run_runner(common + ["--model-type", a.family, "--output-path", str(dense_out)])
    fp32_args = common[:]
    fp32_args[fp32_args.index(a.dtype)] = "fp32"
    fp32_out = work / "dense_fp32.jsonl"
    run_runner(fp32_args + ["--model-type", a.family, "--output-path", str(fp32_out), "--num-iters", str(a.check_docs)])
    report["parity"] = logprob_gaps(hf_dir, a.family, dtype, dense_out, fp32_out, tokenizer, a.check_docs)
    shutil.rmtree(hf_dir)  # disk: the converted copy is all the runner needs from here on
    if not a.skip_collection:
        report["collection"] = collection_timing(a, common, req, work)
    if a.sparse_timing:
        report["sparse_timing"] = sparse_timing(a, common, converted, work)
    if a.pipeline_ranks > 1:
        report["pipeline"] = pipeline_check(common, a.family, dense_out, out, a.pipeline_ranks)
    shutil.rmtree(work)
    (out / f"gpu_check_{a.family}.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


def collection_timing(a, common: list[str], req: Path, work: Path) -> dict:
    collect_req = work / "req_collect.jsonl"
    write_c4_requests(collect_req, 1000, 100_000)
    data = work / "collected"
    collect_args = common[:]
    collect_args[collect_args.index(str(req))] = str(collect_req)
    timing = run_runner(collect_args + ["--model-type", f"{a.family}-save", "--output-path", str(work / "collect.jsonl"),
                                        "--data-path", str(data), "--collect-tokens", str(a.collect_rows)])
    m = json.loads((data / "manifest.json").read_text())
    widths = sum(w for _, w in m["files"].values())
    timing.update(rows=m["rows_written"], complete=m["complete"], stopped_reason=m["stopped_reason"],
                  bytes_per_token=widths * 2 + 12,
                  collected_tokens_per_s=m["rows_written"] / timing["seconds"])
    shutil.rmtree(data)  # ~0.8 MB per token at 3B shapes
    return timing


def write_random_predictors(directory: Path, config: dict, rank: int = 1000) -> None:
    """Untrained predictors in the trainer's file format: for timing only, their choices mean nothing."""
    directory.mkdir(parents=True, exist_ok=True)
    d, heads = config["hidden_size"], config["num_attention_heads"]
    ffn = config.get("intermediate_size") or config["ffn_dim"]
    for layer in range(config["num_hidden_layers"]):
        for block, out, src in (("mlp", ffn, layer), ("att", heads, max(layer - 1, 0))):
            torch.save({"0.weight": torch.randn(rank, d) / d ** 0.5, "1.weight": torch.randn(out, rank) / rank ** 0.5},
                       directory / f"{block}_layer{layer}.pt")
            (directory / f"{block}_layer{layer}.json").write_text(json.dumps(
                {"layer": layer, "input": "lookahead", "input_kind": "att_x", "input_layer": src, "label": "untrained"}))


def sparse_timing(a, common: list[str], converted: Path, work: Path) -> dict:
    """tokens/s of the sparse simulation (MLP 25% of neurons, half the heads) next to dense, same requests."""
    config = json.loads((converted / "config.json").read_text())
    write_random_predictors(work / "predictors", config)
    budgets = ["--mlp-topk", "0.25", "--att-topk", str(config["num_attention_heads"] // 2)]
    timings = {"dense": run_runner(common + ["--model-type", a.family, "--output-path", str(work / "s_dense.jsonl")])}
    for mode in ("oracle", "random", "predictor"):
        run = run_runner(common + ["--model-type", f"{a.family}-ml-att-sparse", "--sparse-mode", mode, *budgets,
                                   "--predictor-dir", str(work / "predictors"), "--output-path",
                                   str(work / f"s_{mode}.jsonl")])
        timings[mode] = {**run, "relative_to_dense": run["tokens_per_s"] / timings["dense"]["tokens_per_s"]}
    return timings


if __name__ == "__main__":
    main()
