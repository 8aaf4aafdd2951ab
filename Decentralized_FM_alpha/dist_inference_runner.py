"""One process per pipeline rank: score or complete the requests of --infer-data with a converted model.

Examples (world size 1, the common case):
  python Decentralized_FM_alpha/dist_inference_runner.py --model-name pretrained_models/opt-125m \
      --model-type opt --infer-data c4_val.jsonl --output-path out/c4_val_opt-125m.jsonl --use-cuda true --fp16
  # collect DejaVu's training data:
  ... --model-type opt-save --data-path data/opt-125m_c4 --collect-tokens 400000
Two ranks: start the command twice with --world-size 2 --rank 0/1 and the same --dist-url.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from transformers.activations import ACT2FN  # noqa: E402

from Decentralized_FM_alpha.comm.comm_utils import BACKENDS, init_comm  # noqa: E402
from Decentralized_FM_alpha.modules.sparse_decode import DECODE_CHOICES  # noqa: E402
from Decentralized_FM_alpha.modules.sparsity import (DEFAULT_DENSE_LAYERS, MODES, SparsityController,  # noqa: E402
                                                     plan_from_args)
from Decentralized_FM_alpha.pipeline_parallel.dist_pipeline_inference_mask_sample import (  # noqa: E402
    MODEL_TYPES, DistInferenceMaskTokenPipeSync)
from Decentralized_FM_alpha.task_datasets.inference_data import read_requests  # noqa: E402
from Decentralized_FM_alpha.utils.activation_store import DEFAULT_CAPACITY, ActivationWriter  # noqa: E402
from Decentralized_FM_alpha.utils.manifest import (base_manifest, file_sha256, now, weights_provenance,  # noqa: E402
                                                   write_json_atomic)
from Decentralized_FM_alpha.utils.row_files import DEFAULT_BUFFER_BYTES, ROW_FILE_WRITERS  # noqa: E402

PP_MODES = ("pipe_sync_sample_mask_token_pipe",)


def str2bool(value: str) -> bool:
    if str(value).lower() in ("true", "1", "yes"):
        return True
    if str(value).lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def layer_range(text: str) -> list[int]:
    """'A-B' or 'A' -> [first, last] (inclusive)."""
    first, _, last = text.partition("-")
    try:
        return [int(first), int(last or first)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a layer or an inclusive range A-B, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-name", required=True, help="converted checkpoint directory (SPEC section 3)")
    p.add_argument("--model-type", required=True, choices=sorted(MODEL_TYPES),
                   help="module family and variant: plain, -save (collect activations), -ml-att-sparse; the llama "
                        "family runs Llama and Qwen2 checkpoints")
    p.add_argument("--infer-data", required=True, help="request JSONL (SPEC section 4)")
    p.add_argument("--output-path", default=None, help="result JSONL (default: <infer-data stem>_output.jsonl)")
    p.add_argument("--seed", type=int, default=42, help="seed for sampling and random sparsity")
    p.add_argument("--fp16", action="store_true", help="same as --dtype fp16 (original flag)")
    p.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), default=None, help="compute dtype (default fp32)")
    p.add_argument("--num-layers", type=int, default=None,
                   help="layers per pipeline rank (default: ceil(max-layers / world size))")
    p.add_argument("--max-layers", type=int, default=None, help="run only the first N layers (default: all)")
    p.add_argument("--max-seq-len", type=int, default=None,
                   help="longest sequence; longer prompts are truncated from the left (default: the model's)")
    p.add_argument("--budget", type=int, default=65536, help="most padded tokens in one forward batch")
    p.add_argument("--num-iters", type=int, default=None, help="process only the first N requests (default: all)")
    p.add_argument("--token-micro-batch-size", type=int, default=4, help="most requests in one forward batch")
    p.add_argument("--sort-requests", choices=("length", "file"), default="length",
                   help="order in which scoring requests are batched: longest first, so that padding stays small "
                        "(results are still written in file order), or file order. Collection always runs in file "
                        "order (default %(default)s)")
    p.add_argument("--world-size", type=int, default=1, help="number of pipeline ranks")
    p.add_argument("--pipeline-group-size", type=int, default=None, help="pipeline ranks (must equal world size)")
    p.add_argument("--data-group-size", type=int, default=1, help="data-parallel groups (only 1 is supported)")
    p.add_argument("--pp-mode", default=PP_MODES[0], choices=PP_MODES, help="pipeline schedule")
    p.add_argument("--rank", type=int, default=0, help="this process's pipeline rank")
    p.add_argument("--dist-url", default="tcp://127.0.0.1:9031", help="rendezvous address for world size > 1")
    p.add_argument("--dist-backend", choices=BACKENDS, default=None, help="default: nccl on GPU, gloo on CPU")
    p.add_argument("--use-cuda", type=str2bool, default=torch.cuda.is_available(), help="true or false")
    p.add_argument("--cuda-id", type=int, default=0, help="GPU index of this rank")
    collect = p.add_argument_group("collection (model types *-save)")
    collect.add_argument("--data-path", default=None, help="output directory for activations (SPEC section 6)")
    collect.add_argument("--collect-tokens", type=int, default=DEFAULT_CAPACITY, help="capacity: rows to collect")
    collect.add_argument("--collect-mlp-gate", action="store_true", help="also store mlp_gate (llama family, optional)")
    collect.add_argument("--collect-layers", type=layer_range, default=None, metavar="A-B",
                         help="store only layers A..B, inclusive (the manifest's collected_layers; opening another "
                              "layer of the collection is an error); the rows and their values are those of a full "
                              "collection, also with --max-layers B+1, which stops the forward pass after layer B "
                              "(its result file then scores a truncated model) (default: all layers)")
    collect.add_argument("--collect-kinds", default=None,
                         help="comma list of the kinds to store, of the model's collected kinds and, with "
                              "--collect-mlp-gate, mlp_gate (default: all of them)")
    collect.add_argument("--collect-writer", choices=ROW_FILE_WRITERS, default="async",
                         help="async: device -> pinned host copies and file writes in background threads, so the "
                              "forward pass does not wait on the disk; sync: copy and write each layer's rows in "
                              "turn, flush every batch (the original). Same files, same commits (default %(default)s)")
    collect.add_argument("--collect-buffer-gb", type=float, default=DEFAULT_BUFFER_BYTES / 2**30,
                         help="async writer: host RAM (pinned on GPU) for rows on their way to the disk; the forward "
                              "pass waits when it is full (default %(default)s)")
    sparse = p.add_argument_group("sparse inference (model types *-ml-att-sparse; SPEC section 8)")
    sparse.add_argument("--sparse-mode", choices=MODES, default=None,
                        help="what ranks neurons/heads: trained predictors (default), oracle = true |activation|, "
                             "random, static (the units most often in the training top-K, the same for every token: "
                             "static_{block}_layer{L}.json in --predictor-dir), gate (MLP only, Llama: top-K of "
                             "|SiLU(g)| with the exact gate), structured (MLP only: the MLP's own form at low rank, "
                             "structured_mlp_layer{L}.pt in --predictor-dir), or dense")
    sparse.add_argument("--predictor-dir", default=None,
                        help="directory of mlp_layer{L}.pt / att_layer{L}.pt and their JSONs (alias: $SPRARSE_PATH)")
    sparse.add_argument("--mlp-topk", default=None,
                        help="MLP neurons kept per token: an integer count or a fraction < 1 (alias: $TOPK); "
                             "omitted = dense MLP")
    sparse.add_argument("--att-topk", default=None,
                        help="attention heads kept per token: count or fraction (alias: $ATTN_TOPK_1 with "
                             "$SPARSE_ATT=1); omitted = dense attention")
    sparse.add_argument("--sparse-layers", default=None, help="layers made sparse: a comma list of layers and inclusive ranges, e.g. 0,7,15-22 (default: all)")
    sparse.add_argument("--gqa-groups", action="store_true",
                        help="llama family: keep whole key/value groups (scores summed over each group's query heads); a "
                             "fractional --att-topk then counts groups")
    sparse.add_argument("--dense-layers", default=DEFAULT_DENSE_LAYERS,
                        help="layers kept dense in every sparse mode, a layer list or 'none' (default %(default)s: "
                             "layer 0 has no earlier input for DejaVu's lookahead, as the original kept its first "
                             "layers dense)")
    sparse.add_argument("--predictor-input", default="lookahead",
                        help="the input wiring the loaded predictors must have been trained on: lookahead (DejaVu's, "
                             "default), same or from:J; a predictor trained otherwise is an error")
    sparse.add_argument("--allow-predictor-mismatch", action="store_true",
                        help="run predictor or static files made for another input or budget (a top-K label trained "
                             "for another K) anyway; the manifest lists every difference")
    sparse.add_argument("--sparse-decode", choices=DECODE_CHOICES, default="simulate",
                        help="decode steps (generation, one new token on a cache): simulate = mask after the dense "
                             "projections; kernels = compute only the kept neurons and heads (modules/sparse_decode.py), "
                             "same masks, same results within rounding; modes dense, predictor, random, static only "
                             "(default %(default)s)")
    return p


def resolve_args(argv=None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    args.dtype = args.dtype or ("fp16" if args.fp16 else "fp32")
    if args.fp16 and args.dtype != "fp16":
        raise SystemExit("--fp16 contradicts --dtype " + args.dtype)
    if args.pipeline_group_size not in (None, args.world_size) or args.data_group_size != 1:
        raise SystemExit("only pure pipeline parallelism is supported: --pipeline-group-size = --world-size, "
                         "--data-group-size 1")
    if not 0 <= args.rank < args.world_size:
        raise SystemExit(f"--rank {args.rank} outside 0..{args.world_size - 1}")
    if args.dist_backend is None:
        args.dist_backend = "nccl" if args.use_cuda else "gloo"
    if args.use_cuda and not torch.cuda.is_available():
        raise SystemExit("--use-cuda true but no CUDA device is visible")
    if args.output_path is None:
        args.output_path = str(Path(args.infer_data).with_name(Path(args.infer_data).stem + "_output.jsonl"))
    is_save = args.model_type.endswith("-save")
    if is_save and not args.data_path:
        raise SystemExit(f"--model-type {args.model_type} collects activations: give --data-path")
    return args


def make_writer(args, pipe: DistInferenceMaskTokenPipeSync) -> ActivationWriter:
    module = pipe.module
    kinds = module.COLLECTED_KINDS + (module.OPTIONAL_KINDS if args.collect_mlp_gate else ())
    if args.collect_mlp_gate and not module.OPTIONAL_KINDS:
        raise SystemExit(f"--collect-mlp-gate: {args.model_type} has no gate")
    if args.collect_layers and args.collect_layers[1] >= pipe.max_layers:
        raise SystemExit(f"--collect-layers {args.collect_layers[0]}-{args.collect_layers[1]}: --max-layers "
                         f"{pipe.max_layers} runs layers 0..{pipe.max_layers - 1} only")
    if args.collect_kinds is not None:
        chosen = tuple(k.strip() for k in args.collect_kinds.split(","))
        if unknown := sorted(set(chosen) - set(kinds)):
            raise SystemExit(f"--collect-kinds: {unknown} not among the kinds this run collects {kinds}")
        kinds = tuple(k for k in kinds if k in chosen)
    return ActivationWriter(args.data_path, module.collection_dims(pipe.config), pipe.layers, kinds,
                            capacity=args.collect_tokens, rank=pipe.rank, world_size=pipe.world_size,
                            writer=args.collect_writer, buffer_bytes=int(args.collect_buffer_gb * 2**30),
                            collected=range(args.collect_layers[0], args.collect_layers[1] + 1)
                            if args.collect_layers else None,
                            manifest_fields={"model_name": args.model_name, "model_type": args.model_type,
                                             "dtype": args.dtype, "max_seq_len": pipe.max_seq_len,
                                             "label_definitions": module.label_definitions(pipe.config),
                                             "tokenizer": pipe.bos, "weights": weights_provenance(args.model_name),
                                             "source_data": {"path": str(Path(args.infer_data).resolve()),
                                                             "sha256": file_sha256(args.infer_data)}})


def collect(args, pipe: DistInferenceMaskTokenPipeSync, requests: list, output_path: Path) -> None:
    """Run the requests through a *-save model, resuming where an earlier run stopped."""
    writer = pipe.blocks[0].writer
    remaining = requests[writer.docs_done:]
    if writer.docs_done and not writer.full:
        print(f"rank {pipe.rank}: resuming after {writer.docs_done} documents, {writer.rows_written} rows")
        if pipe.is_last:
            keep_first_lines(output_path, writer.docs_done)

    def before_forward(batch, ids, valid):
        writer.begin_batch([e.request.index for e in batch], ids, valid)

    crash_after = int(os.environ.get("DEJAVU_TEST_CRASH_AFTER_BATCHES", "0"))  # fault injection for the resume test
    crash_hard = os.environ.get("DEJAVU_TEST_CRASH_HARD") == "1"  # SIGKILL: no chance to finish background commits
    batches = [0]

    def after_batch() -> bool:
        batches[0] += 1
        if crash_after and batches[0] > crash_after:  # rows of this batch are written but not committed
            if crash_hard:
                os.kill(os.getpid(), signal.SIGKILL)
            raise SystemExit(f"simulated crash after {crash_after} committed batches")
        writer.end_batch()
        return writer.full

    try:
        if not writer.full and remaining:
            pipe.run(remaining, output_path, before_forward=before_forward, after_batch=after_batch,
                     append=writer.docs_done > 0)
    finally:
        writer.close()  # an async writer commits every batch end_batch accepted, even when the run stops early
    stop = "capacity reached" if writer.full else "all requests processed"
    pipe.comm.barrier()
    writer.finish(stop)
    if pipe.rank == 0:
        partial = writer.partial_document
        first, last = writer.manifest["collected_layers"]
        print(f"collected {writer.rows_written} rows ({stop}) x {len(writer.kinds)} kinds x layers {first}..{last} "
              f"-> {args.data_path}: {writer.docs_done} whole documents"
              + (f", document {partial['document']} cut after {partial['rows']} of its {partial['tokens']} tokens"
                 if partial else ""))


def keep_first_lines(path: Path, n: int) -> None:
    """Drop result lines past the last committed document (written just before a crash)."""
    if path.is_file():
        lines = path.read_text().splitlines(keepends=True)[:n]
        path.write_text("".join(lines))


def build_pipeline(args: argparse.Namespace) -> DistInferenceMaskTokenPipeSync:
    """This rank's model from resolved flags: device, seed, communication, strictly loaded pieces and what the
    variant attaches (a collection writer or a sparsity controller). The one construction the runner and the
    lm-evaluation-harness model (lm_eval_model.py) share."""
    device = torch.device(f"cuda:{args.cuda_id}" if args.use_cuda else "cpu")
    if args.use_cuda:
        torch.cuda.set_device(device)
    torch.manual_seed(args.seed)
    comm = init_comm(args.dist_backend, args.dist_url, args.rank, args.world_size, device)
    return DistInferenceMaskTokenPipeSync(args, comm, device, block_kwargs=block_kwargs_for(args))


def main(argv=None) -> None:
    args = resolve_args(argv)
    pipe = build_pipeline(args)
    score(args, pipe)
    pipe.comm.close()


def score(args: argparse.Namespace, pipe: DistInferenceMaskTokenPipeSync) -> None:
    """Run --infer-data through a loaded pipeline (collect, or score and complete) and write the results with their
    manifest. The sparse sweep calls it again on the same pipeline with another sparsity controller
    (attach_sparsity), so every counter a run reports starts afresh here."""
    requests = read_requests(args.infer_data)[: args.num_iters]
    manifest = base_manifest(settings=vars(args), request_file_sha256=file_sha256(args.infer_data),
                             weights=weights_provenance(args.model_name))
    manifest["tokenizer"] = pipe.bos
    pipe.reset_run_counters(args.seed)
    output_path = Path(args.output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    started = time.time()
    if args.model_type.endswith("-save"):
        collect(args, pipe, requests, output_path)
    else:
        pipe.run(requests, output_path)
    pipe.comm.barrier()
    if pipe.is_last:
        if args.model_type.endswith("-ml-att-sparse"):
            manifest["sparsity"] = pipe.blocks[0].sparsity.describe()
        finish_manifest(manifest, output_path, pipe, time.time() - started)


def block_kwargs_for(args):
    """What the variant's GPTBlocks need besides config and layer: a writer (*-save) or a sparsity controller."""
    if args.model_type.endswith("-save"):
        return lambda pipe: {"writer": make_writer(args, pipe)}
    if args.model_type.endswith("-ml-att-sparse"):
        return lambda pipe: {"sparsity": sparsity_controller(args, pipe), "decode": args.sparse_decode}
    return None


def sparsity_controller(args: argparse.Namespace, pipe: DistInferenceMaskTokenPipeSync) -> SparsityController:
    plan = plan_from_args(args, pipe.config.num_hidden_layers)
    dims = pipe.module.model_dims(pipe.config)
    gate = ACT2FN[pipe.config.hidden_act] if pipe.family == "llama" else None  # OPT's MLP has no gate
    return SparsityController(plan, dims, pipe.layers, pipe.device, gate_activation=gate)


def attach_sparsity(args: argparse.Namespace, pipe: DistInferenceMaskTokenPipeSync) -> None:
    """Give every block of a loaded *-ml-att-sparse pipeline a fresh controller for `args` (mode, budgets, files):
    the sparse sweep loads the model once and runs each setting on it."""
    controller = sparsity_controller(args, pipe)
    for block in pipe.blocks:
        block.sparsity = controller


def finish_manifest(manifest: dict, output_path: Path, pipe: DistInferenceMaskTokenPipeSync, seconds: float) -> None:
    from Decentralized_FM_alpha.task_datasets.results import perplexity_of_results

    manifest.update(end_time=now(), seconds=seconds, truncated_prompts=pipe.truncated_prompts,
                    batch_positions=pipe.batch_positions, output_path=str(output_path))
    if output_path.is_file() and output_path.stat().st_size > 0:
        manifest["perplexity"] = perplexity_of_results(output_path)
    write_json_atomic(str(output_path) + ".manifest.json", manifest)
    summary = manifest.get("perplexity", {})
    print(f"wrote {output_path}" + (f"; perplexity {summary['perplexity']:.4f} over {summary['tokens']} tokens"
                                    if "perplexity" in summary else ""))


if __name__ == "__main__":
    main()
