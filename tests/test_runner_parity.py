"""The runner's log-probs and generations equal Hugging Face OPTForCausalLM / LlamaForCausalLM."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer

from tests.helpers_models import llama_3b_config, make_llama, make_opt
from tests.runner_helpers import (c4_texts, hf_token_logprobs, read_results, run_one_rank, run_ranks,
                                  token_logprobs, write_requests)

TOL = 1e-4


@pytest.fixture(scope="module", params=["opt", "llama"])
def family(request, tmp_path_factory, tiny_tokenizer_dir):
    tmp = tmp_path_factory.mktemp(request.param)
    maker = make_opt if request.param == "opt" else make_llama
    model, hf_dir, converted = maker(tmp, tiny_tokenizer_dir, seed=1)
    return request.param, model, converted, tmp


def max_logprob_error(model, tokenizer, prompts, results, max_seq_len=None) -> float:
    worst = 0.0
    for prompt, result in zip(prompts, results):
        ids = tokenizer(prompt)["input_ids"]
        if max_seq_len and len(ids) > max_seq_len:  # the runner keeps BOS and the last tokens
            ids = ids[:1] + ids[len(ids) - max_seq_len + 1:]
        ours = token_logprobs(result)
        assert ours[0] is None and len(ours) == len(ids)
        worst = max(worst, (torch.tensor(ours[1:], dtype=torch.float64) - hf_token_logprobs(model, ids)).abs().max().item())
    return worst


def test_echo_logprobs_equal_hf_world_size_1(family):
    name, model, converted, tmp = family
    prompts = c4_texts(6)
    req = write_requests(tmp / "req1.jsonl", prompts)
    out = tmp / "out1.jsonl"
    run_one_rank(["--model-name", str(converted), "--model-type", name, "--infer-data", str(req),
                  "--output-path", str(out), "--token-micro-batch-size", "3"])
    results = read_results(out)
    assert len(results) == len(prompts)
    error = max_logprob_error(model, AutoTokenizer.from_pretrained(converted), prompts, results)
    print(f"{name} world size 1: max |d logprob| vs HF = {error:.2e}")
    assert error <= TOL
    manifest = json.loads((tmp / "out1.jsonl.manifest.json").read_text())
    assert manifest["git_commit"] and manifest["versions"]["torch"] and "perplexity" in manifest


def test_echo_logprobs_equal_hf_world_size_2_gloo(family):
    name, model, converted, tmp = family
    prompts = c4_texts(4)
    req = write_requests(tmp / "req2.jsonl", prompts)
    out = tmp / "out2.jsonl"
    run_ranks(["--model-name", str(converted), "--model-type", name, "--infer-data", str(req),
               "--output-path", str(out), "--num-layers", "2"], world_size=2)
    error = max_logprob_error(model, AutoTokenizer.from_pretrained(converted), prompts, read_results(out))
    print(f"{name} world size 2 (gloo): max |d logprob| vs HF = {error:.2e}")
    assert error <= TOL


def test_prompt_longer_than_max_seq_len_is_truncated_from_the_left(family):
    name, model, converted, tmp = family
    prompts = c4_texts(2, max_chars=2000)
    tokenizer = AutoTokenizer.from_pretrained(converted)
    assert all(len(tokenizer(p)["input_ids"]) > 64 for p in prompts)
    req = write_requests(tmp / "req_long.jsonl", prompts)
    out = tmp / "out_long.jsonl"
    with pytest.warns(UserWarning, match="2 prompt"):
        run_one_rank(["--model-name", str(converted), "--model-type", name, "--infer-data", str(req),
                      "--output-path", str(out), "--max-seq-len", "64"])
    results = read_results(out)
    assert all(len(token_logprobs(r)) == 64 for r in results)
    assert max_logprob_error(model, tokenizer, prompts, results, max_seq_len=64) <= TOL
    manifest = json.loads((tmp / "out_long.jsonl.manifest.json").read_text())
    assert manifest["truncated_prompts"] == 2


def test_greedy_generation_of_20_tokens_equals_hf_generate(family):
    name, model, converted, tmp = family
    prompts = c4_texts(2, max_chars=120)
    req = write_requests(tmp / "req_gen.jsonl", prompts, max_tokens=20, echo=False)
    out = tmp / "out_gen.jsonl"
    run_one_rank(["--model-name", str(converted), "--model-type", name, "--infer-data", str(req),
                  "--output-path", str(out)])
    tokenizer = AutoTokenizer.from_pretrained(converted)
    for prompt, result in zip(prompts, read_results(out)):
        ids = torch.tensor([tokenizer(prompt)["input_ids"]])
        with torch.no_grad():
            hf = model.generate(ids, max_new_tokens=20, min_new_tokens=20, do_sample=False, pad_token_id=1)
        expected = tokenizer.decode(hf[0, ids.shape[1]:])
        choice = result["result"]["choices"][0]
        assert len(choice["logprobs"]["tokens"]) == 20
        assert choice["text"] == expected


def test_sampling_is_reproducible_by_seed(family):
    name, model, converted, tmp = family
    req = write_requests(tmp / "req_sample.jsonl", c4_texts(1, max_chars=80), max_tokens=8, echo=False,
                         temperature=1.0, top_p=0.9, n=2)
    texts = []
    for run in range(2):
        out = tmp / f"out_sample{run}.jsonl"
        run_one_rank(["--model-name", str(converted), "--model-type", name, "--infer-data", str(req),
                      "--output-path", str(out), "--seed", "7"])
        texts.append([c["text"] for c in read_results(out)[0]["result"]["choices"]])
    assert texts[0] == texts[1] and len(texts[0]) == 2


def test_exact_llama_3_2_3b_architecture_two_layers(tmp_path, tiny_tokenizer_dir):
    """The real 3B shapes (GQA 24/8, head_dim 128, llama3 rope x32, tied 128256 vocab), depth cut to 2."""
    model, hf_dir, converted = make_llama(tmp_path, tiny_tokenizer_dir, seed=3, config=llama_3b_config(2))
    prompts = c4_texts(2, max_chars=300)
    req = write_requests(tmp_path / "req.jsonl", prompts)
    out = tmp_path / "out.jsonl"
    run_one_rank(["--model-name", str(converted), "--model-type", "llama", "--infer-data", str(req),
                  "--output-path", str(out)])
    error = max_logprob_error(model, AutoTokenizer.from_pretrained(converted), prompts, read_results(out))
    print(f"Llama-3.2-3B config, 2 layers: max |d logprob| vs HF = {error:.2e}")
    assert error <= TOL


def test_llama3_rope_scaling_at_long_positions(tmp_path, tiny_tokenizer_dir):
    """Llama 3.2's rope (theta 5e5, llama3 scaling x32) over ~2,900 positions, narrow model for speed."""
    config = llama_3b_config(2)
    config.hidden_size, config.intermediate_size, config.vocab_size = 256, 512, 1024
    config.num_attention_heads, config.num_key_value_heads = 2, 1
    model, _, converted = make_llama(tmp_path, tiny_tokenizer_dir, seed=9, config=config)
    prompts = c4_texts(1, max_chars=6000)
    req = write_requests(tmp_path / "req.jsonl", prompts)
    out = tmp_path / "out.jsonl"
    run_one_rank(["--model-name", str(converted), "--model-type", "llama", "--infer-data", str(req),
                  "--output-path", str(out)])
    tokenizer = AutoTokenizer.from_pretrained(converted)
    assert len(tokenizer(prompts[0])["input_ids"]) > 2500
    assert max_logprob_error(model, tokenizer, prompts, read_results(out)) <= TOL


def test_sorting_by_length_keeps_file_order_and_the_results(family):
    name, model, converted, tmp = family
    prompts = [text[: 40 + (97 * i) % 400] for i, text in enumerate(c4_texts(10, 1000))]  # lengths out of order
    req = write_requests(tmp / "req_sort.jsonl", prompts)
    outs = {}
    for order in ("file", "length"):
        for batch in ("1", "4"):
            outs[(order, batch)] = tmp / f"sort_{order}_{batch}.jsonl"
            run_one_rank(["--model-name", str(converted), "--model-type", name, "--infer-data", str(req),
                          "--output-path", str(outs[(order, batch)]), "--sort-requests", order,
                          "--token-micro-batch-size", batch])
    # one request per batch: sorting changes only the order of the work, and the files are byte-identical
    assert outs[("length", "1")].read_bytes() == outs[("file", "1")].read_bytes()
    # four per batch: results still in file order and equal within float32 rounding (the matmul kernels depend on
    # the batch's padded shape, so bits can differ), with less padding
    by_file, by_length = read_results(outs[("file", "4")]), read_results(outs[("length", "4")])
    assert [r["request"]["prompt"] for r in by_length] == prompts
    for a, b in zip(by_file, by_length):
        assert len(token_logprobs(a)) == len(token_logprobs(b))
        assert max(abs(x - y) for x, y in zip(token_logprobs(a)[1:], token_logprobs(b)[1:])) <= 1e-5
    padding = {order: json.loads(outs[(order, "4")].with_suffix(".jsonl.manifest.json").read_text())
               ["batch_positions"]["padding"] for order in ("file", "length")}
    assert padding["length"] < padding["file"]


def test_bos_facts_follow_the_tokenizer(tiny_tokenizer_dir):
    from tokenizers import processors

    from Decentralized_FM_alpha.pipeline_parallel.dist_pipeline_inference_mask_sample import bos_facts

    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    assert bos_facts(tokenizer)["adds_bos"] is True and bos_facts(tokenizer)["position_0"] == "the BOS token"
    tokenizer.backend_tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)  # as SmolLM2: no BOS
    facts = bos_facts(tokenizer)
    assert facts["adds_bos"] is False and "first text token" in facts["position_0"]
