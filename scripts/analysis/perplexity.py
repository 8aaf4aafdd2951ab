"""Perplexity of a results JSONL (SPEC §4), the original DejaVu convention.

    python scripts/analysis/perplexity.py Decentralized_FM_alpha/c4_val/output_c4_val_llama-3.2-3b.jsonl
    python scripts/analysis/perplexity.py RESULTS --json --output RESULTS.ppl.json

perplexity = exp(-mean of token_logprobs[1:] over all lines); the computation is
Decentralized_FM_alpha/task_datasets/results.py perplexity_of_results.
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from Decentralized_FM_alpha.task_datasets.results import perplexity_of_results  # noqa: E402
from Decentralized_FM_alpha.utils.manifest import base_manifest, now, write_json_atomic  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="Print the perplexity of a results JSONL: exp(-mean of "
                                                 "token_logprobs[1:] over all lines), with token and request counts.")
    parser.add_argument("results", type=Path, help="results JSONL written by the runner for echo requests")
    parser.add_argument("--json", action="store_true",
                        help="print the result as one JSON object instead of a line of text")
    parser.add_argument("--output", type=Path, default=None,
                        help="also write the result as JSON to this file, with <output>.manifest.json")
    args = parser.parse_args(argv)
    manifest = base_manifest(kind="perplexity")
    try:
        result = perplexity_of_results(args.results)
    except (OSError, ValueError) as e:
        parser.exit(1, f"{parser.prog}: error: {e}\n")
    if args.json:
        print(json.dumps(result, sort_keys=True))
    else:
        mismatch = (f"; {result['window_token_count_mismatches']} of {result['requests_with_window_token_count']} "
                    f"windowed requests scored another token count than their window_token_count"
                    if result["requests_with_window_token_count"] else "")
        print(f"perplexity: {result['perplexity']:.6f} over {result['tokens']} tokens in {result['requests']} "
              f"requests ({args.results}){mismatch}")
    if args.output is not None:
        write_json_atomic(args.output, result)
        write_json_atomic(Path(str(args.output) + ".manifest.json"),
                          {**manifest, "output": str(args.output.resolve()), "end_time": now(), "complete": True,
                           "results_file": result["results_file"], "results_sha256": result["results_sha256"]})
        print(f"wrote {args.output} and {args.output}.manifest.json", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
