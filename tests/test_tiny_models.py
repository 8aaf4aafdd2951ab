"""scripts/assets/train_tiny_models.py: a matched OPT / Llama / Llama-ReLU trio trained on the bundled C4 sample."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM, OPTForCausalLM

from Decentralized_FM_alpha import convert_llama_checkpoint, convert_opt_checkpoint
from scripts.assets import train_tiny_models as ttm

TINY_ARGS = ["--device", "cpu", "--steps", "20", "--batch-size", "8", "--lr", "3e-3", "--warmup-steps", "2",
             "--d-model", "32", "--n-layers", "2", "--n-heads", "4", "--n-kv-heads", "2", "--vocab-size", "300",
             "--seq-len", "32", "--train-docs", "40", "--val-docs", "4", "--log-every", "5", "--eval-every", "10"]


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """Tiny matrices: extra threads only add synchronisation, which on a shared CPU costs seconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """(output directory, training summary) of one tiny CPU run of the script."""
    out = tmp_path_factory.mktemp("tiny_models")
    return out, ttm.main(TINY_ARGS + ["--out", str(out)])


def test_default_trio_has_matched_parameter_counts_and_fits_the_size_budget():
    ids = {"pad_token_id": 1, "bos_token_id": 2, "eos_token_id": 2}
    args = ttm.parse_args([])
    shape = ttm.Shape(args.vocab_size, args.d_model, args.n_layers, args.n_heads, args.n_kv_heads, args.opt_ffn_dim,
                      args.seq_len)
    configs = ttm.model_configs(shape, None, ids)
    counts = {name: ttm.meta_parameter_count(cls, cfg) for name, (cls, cfg) in configs.items()}
    ttm.check_matched_sizes(counts, 0.10)
    assert all(abs(c - counts["tiny-opt"]) <= 0.02 * counts["tiny-opt"] for c in counts.values())
    ttm.check_size_budget(counts, torch.float16, 25.0)
    assert configs["tiny-opt"][1].ffn_dim == 4 * args.d_model
    assert configs["tiny-llama"][1].intermediate_size == configs["tiny-llama-relu"][1].intermediate_size


def test_mismatched_sizes_and_oversized_models_are_refused_before_training():
    with pytest.raises(ValueError, match="more than 10%"):
        ttm.check_matched_sizes({"tiny-opt": 1000, "tiny-llama": 1200}, 0.10)
    with pytest.raises(ValueError, match="over --max-total-mb"):
        ttm.check_size_budget({"tiny-opt": 5_000_000, "tiny-llama": 5_000_000, "tiny-llama-relu": 5_000_000},
                              torch.float16, 25.0)


def test_trained_trio_parameter_counts_are_within_ten_percent(trained):
    _, summary = trained
    counts = {name: m["parameters"] for name, m in summary["models"].items()}
    assert set(counts) == set(ttm.MODEL_NAMES)
    assert all(abs(c - counts["tiny-opt"]) <= 0.10 * counts["tiny-opt"] for c in counts.values())
    for name, model_class in [("tiny-opt", OPTForCausalLM), ("tiny-llama", LlamaForCausalLM)]:
        assert ttm.count_parameters(model_class.from_pretrained(summary["models"][name]["dir"])) == counts[name]


def test_training_loss_decreases_over_20_steps(trained):
    out, _ = trained
    curves = json.loads((out / ttm.SUMMARY_DIR / "loss_curves.json").read_text())
    for name in ttm.MODEL_NAMES:
        losses = curves[name]["train_loss"]
        assert len(losses) == 20
        assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3, (name, losses)
        val = [v["val_loss"] for v in curves[name]["val_curve"]]
        assert [v["step"] for v in curves[name]["val_curve"]] == [10, 20] and val[1] < val[0]


def test_saved_models_load_with_from_pretrained_and_keep_their_architecture(trained):
    out, _ = trained
    opt = OPTForCausalLM.from_pretrained(out / "tiny-opt")
    llama = LlamaForCausalLM.from_pretrained(out / "tiny-llama")
    relu = LlamaForCausalLM.from_pretrained(out / "tiny-llama-relu")
    assert opt.config.activation_function == "relu" and opt.config.do_layer_norm_before
    assert opt.config.word_embed_proj_dim == opt.config.hidden_size
    assert llama.config.hidden_act == "silu" and relu.config.hidden_act == "relu"
    assert llama.config.num_key_value_heads < llama.config.num_attention_heads and llama.config.tie_word_embeddings
    for model in (opt, llama, relu):
        assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()  # tied
        assert next(model.parameters()).dtype == torch.float16  # saved in --save-dtype
    tokenizer = AutoTokenizer.from_pretrained(out / "tiny-llama")
    ids = tokenizer("Hello world")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id == llama.config.bos_token_id
    logits = relu.float()(input_ids=torch.tensor([ids])).logits
    assert torch.isfinite(logits).all()


def test_saved_models_convert_with_the_team_converters(trained, tmp_path):
    out, _ = trained
    convert_opt_checkpoint.main(["--model-name", str(out / "tiny-opt"), "--save-path", str(tmp_path / "opt")])
    for name in ("tiny-llama", "tiny-llama-relu"):
        convert_llama_checkpoint.main(["--model-name", str(out / name), "--save-path", str(tmp_path / name)])
    for converted in (tmp_path / "opt", tmp_path / "tiny-llama", tmp_path / "tiny-llama-relu"):
        files = {p.name for p in converted.iterdir()}
        assert {"config.json", "pytorch_embs.pt", "pytorch_0.pt", "pytorch_1.pt", "pytorch_lm_head.pt"} <= files
        embs = torch.load(converted / "pytorch_embs.pt")
        head = torch.load(converted / "pytorch_lm_head.pt")
        assert torch.equal(head["lm_head.weight"], embs["embed_tokens.weight"])
    assert json.loads((tmp_path / "tiny-llama-relu" / "config.json").read_text())["hidden_act"] == "relu"


def test_validation_perplexity_matches_hf_loss_on_the_saved_checkpoint(trained):
    """Reported perplexity = exp(mean NLL), each document's first token excluded, windows of --seq-len."""
    out, summary = trained
    seq_len, record = summary["shape"]["seq_len"], summary["models"]["tiny-llama"]
    tokenizer = AutoTokenizer.from_pretrained(out / "tiny-llama")
    model = LlamaForCausalLM.from_pretrained(out / "tiny-llama").float().eval()
    texts = ttm.read_texts(ttm.REPO / summary["data"]["val_file"], summary["data"]["val_docs"])
    total, count = 0.0, 0
    with torch.no_grad():
        for ids in tokenizer(texts)["input_ids"]:
            for start in range(0, len(ids) - 1, seq_len):
                window = torch.tensor([ids[start:start + seq_len + 1]])  # HF shifts labels by one itself
                n = window.shape[1] - 1
                total += model(input_ids=window, labels=window).loss.item() * n
                count += n
    assert count == record["val_scored_tokens"] == summary["data"]["val_scored_tokens"]
    assert record["val_perplexity"] == pytest.approx(math.exp(total / count), rel=1e-4)


def test_packed_blocks_make_every_token_after_the_first_a_target_once():
    docs = [[2, 10, 11, 12], [2, 20, 21], [2, 30, 31, 32, 33]]
    blocks = ttm.pack_blocks(docs, seq_len=4)
    stream = [t for d in docs for t in d]
    assert blocks.shape == (2, 5)
    assert blocks[:, 1:].flatten().tolist() == stream[1:9]
    assert blocks[1, 0] == blocks[0, -1]


def test_validation_windows_score_every_token_but_each_documents_first():
    inputs, targets = ttm.validation_windows([[2, 5, 6, 7, 8, 9], [2, 4]], seq_len=3, pad_id=1)
    assert inputs.tolist() == [[2, 5, 6], [7, 8, 1], [2, 1, 1]]
    assert targets.tolist() == [[5, 6, 7], [8, 9, -100], [4, -100, -100]]


def test_batch_schedule_is_seeded_and_covers_each_block_once_per_epoch():
    schedule = ttm.batch_schedule(n_blocks=10, batch_size=5, steps=4, seed=3)
    assert torch.equal(schedule, ttm.batch_schedule(n_blocks=10, batch_size=5, steps=4, seed=3))
    assert sorted(schedule[:2].flatten().tolist()) == list(range(10))
    assert sorted(schedule[2:].flatten().tolist()) == list(range(10))


def test_model_cards_and_summary_record_the_run(trained):
    out, summary = trained
    assert summary["manifest"]["git_commit"] and summary["data"]["train_sha256"]
    assert (out / ttm.SUMMARY_DIR / "loss_curves.png").stat().st_size > 0
    saved = json.loads((out / ttm.SUMMARY_DIR / "training_summary.json").read_text())
    assert saved["models"]["tiny-opt"]["val_perplexity"] == summary["models"]["tiny-opt"]["val_perplexity"]
    for name in ttm.MODEL_NAMES:
        card = (out / name / "README.md").read_text()
        assert f"{summary['models'][name]['val_perplexity']:.2f}" in card
        assert summary["data"]["train_sha256"] in card and "--steps 20" in card


def test_existing_outputs_are_not_overwritten(trained):
    out, _ = trained
    with pytest.raises(FileExistsError, match="--overwrite"):
        ttm.main(TINY_ARGS + ["--out", str(out)])
