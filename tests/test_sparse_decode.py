"""The sparse decode step (modules/sparse_decode.py) computes what the masked simulation computes, on fewer units."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig

from Decentralized_FM_alpha.modules import (hf_llama_sparse_mlp_attention, hf_opt_sparse_mlp_attention, sparse_decode,
                                            sparse_kernels)
from Decentralized_FM_alpha.modules.sparse_kernels import Selection, columns_times, rows_times
from Decentralized_FM_alpha.modules.sparsity import SparsityController, SparsityPlan
from Decentralized_FM_alpha.utils.selection import fraction_count
from tests.helpers_models import make_llama, make_opt
from tests.runner_helpers import REPO, c4_texts, read_results, run_one_rank, write_requests
from tests.test_sparse_inference import write_predictors

SPARSE_MODULES = {"opt": hf_opt_sparse_mlp_attention, "llama": hf_llama_sparse_mlp_attention}


@pytest.fixture(scope="module", params=["opt", "llama"])
def family(request, tmp_path_factory, tiny_tokenizer_dir, one_cpu_thread):
    tmp = tmp_path_factory.mktemp(f"decode_{request.param}")
    model, _, converted = (make_opt if request.param == "opt" else make_llama)(tmp, tiny_tokenizer_dir, seed=5)
    return request.param, model, converted, tmp


def random_selection(gen: torch.Generator, batch: int, n: int, k: int) -> tuple[Selection, torch.Tensor]:
    """Each row keeps k random units of n: the union selection and the rows' masks (B, N)."""
    mask = torch.zeros(batch, n, dtype=torch.bool)
    for row in range(batch):
        mask[row, torch.randperm(n, generator=gen)[:k]] = True
    return sparse_decode.select_mask(mask, torch.float32), mask


def test_torch_kernels_equal_dense_matmuls_on_the_selected_units():
    gen = torch.Generator().manual_seed(0)
    b, d, n = 3, 24, 40
    x = torch.randn(b, d, generator=gen)
    w, up, bias = (torch.randn(n, d, generator=gen), torch.randn(n, d, generator=gen), torch.randn(n, generator=gen))
    sel, mask = random_selection(gen, b, n, 7)
    count = int(sel.count)
    assert count == int(mask.any(0).sum()) and sel.index.numel() == n
    index = sel.index[:count]
    rows = rows_times(x, w, sel, bias=bias, up=up, act="silu", backend="torch")
    dense = F.silu(x @ w.T + bias) * (x @ up.T) * mask
    torch.testing.assert_close(rows[:, :count], dense[:, index], rtol=1e-5, atol=1e-5)
    assert rows[:, count:].abs().max() == 0  # padding entries are zero
    linear = torch.nn.Linear(n, d, bias=False)
    a = torch.randn(b, n, generator=gen) * mask  # every row's own units
    packed = torch.zeros(b, n)
    packed[:, :count] = a[:, index]
    torch.testing.assert_close(columns_times(packed, linear, sel, backend="torch"), linear(a), rtol=1e-5, atol=1e-5)


def test_top_k_selection_is_the_union_of_the_rows_top_k():
    gen = torch.Generator().manual_seed(1)
    scores = torch.randn(4, 30, generator=gen)
    sel = sparse_decode.select_top_k(scores, 5, torch.float32)
    top = scores.topk(5, dim=-1).indices
    count = int(sel.count)
    assert set(sel.index[:count].tolist()) == set(top.flatten().tolist())
    assert sel.index.numel() == 20 and sel.index[:count].tolist() == sorted(sel.index[:count].tolist())
    for row in range(4):
        kept = {int(u) for u, k in zip(sel.index, sel.keep[row]) if k}
        assert kept == set(top[row].tolist())
    single = sparse_decode.select_top_k(scores[:1], 5, torch.float32)
    assert single.keep is None and sorted(single.index.tolist()) == sorted(top[0].tolist())


def controller(name, config, converted, mode, tmp, mlp_k=0.5, att_k=2):
    layers = range(config.num_hidden_layers)
    plan = SparsityPlan(mode=mode, mlp_budgets={l: mlp_k for l in layers}, att_budgets={l: att_k for l in layers},
                        predictor_dir=tmp / "predictors" if mode == "predictor" else None, seed=3)
    return SparsityController(plan, SPARSE_MODULES[name].model_dims(config), layers, torch.device("cpu"))


@pytest.mark.parametrize("mode", ["random", "predictor"])
def test_decode_layer_of_a_batch_equals_the_masked_simulation(family, mode):
    """Three rows with their own masks: the kernels compute the union and each row keeps only its own units."""
    name, model, converted, tmp = family
    if mode == "predictor":
        write_predictors(tmp / "predictors", model, name, seed=8)
    config = AutoConfig.from_pretrained(converted)
    gen = torch.Generator().manual_seed(2)
    module = SPARSE_MODULES[name]
    outputs = {}
    for decode in sparse_decode.DECODE_CHOICES:
        sparsity = controller(name, config, converted, mode, tmp)
        blocks = [module.GPTBlock.from_pretrained(str(converted), config, i, sparsity=sparsity, decode=decode).eval()
                  for i in range(config.num_hidden_layers)]
        gen.manual_seed(2)
        att = blocks[0].self_attn
        kv_heads, hd = getattr(att, "num_kv_heads", att.num_heads), att.head_dim
        x = torch.randn(3, 1, config.hidden_size, generator=gen)
        past = [(torch.randn(3, kv_heads, 5, hd, generator=gen), torch.randn(3, kv_heads, 5, hd, generator=gen))
                for _ in blocks]
        bias = torch.zeros(3, 1, 1, 6)
        bias[1, ..., :2] = torch.finfo(torch.float32).min  # row 1 hides two padded keys
        presents = []
        with torch.no_grad():
            for block, layer_past in zip(blocks, past):
                x, present = block(x, bias, layer_past)
                presents.append(present)
        outputs[decode] = (x, presents)
    (x_sim, p_sim), (x_dec, p_dec) = outputs["simulate"], outputs["kernels"]
    torch.testing.assert_close(x_dec, x_sim, rtol=1e-5, atol=1e-5)
    for (k1, v1), (k2, v2) in zip(p_sim, p_dec):
        torch.testing.assert_close(k2, k1, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(v2, v1, rtol=1e-5, atol=1e-5)


def generate(name, converted, req, out, *flags):
    run_one_rank(["--model-name", str(converted), "--model-type", f"{name}-ml-att-sparse", "--infer-data", str(req),
                  "--output-path", str(out), "--mlp-topk", "0.5", "--att-topk", "2", *flags])
    return [r["result"]["choices"][0] for r in read_results(out)]


def test_greedy_generation_with_kernels_equals_the_simulation(family):
    """The runner's generation: same tokens, log-probs within 1e-5 (predictor mode, random predictors)."""
    name, model, converted, tmp = family
    write_predictors(tmp / "gen_predictors", model, name, seed=4)
    req = write_requests(tmp / "req_gen.jsonl", c4_texts(2, max_chars=100), max_tokens=12, echo=False)
    flags = ["--sparse-mode", "predictor", "--predictor-dir", str(tmp / "gen_predictors")]
    simulated = generate(name, converted, req, tmp / "sim.jsonl", *flags)
    decoded = generate(name, converted, req, tmp / "dec.jsonl", *flags, "--sparse-decode", "kernels")
    manifest = (tmp / "dec.jsonl.manifest.json").read_text()
    assert '"sparse_decode": "kernels"' in manifest
    for sim, dec in zip(simulated, decoded):
        assert dec["logprobs"]["tokens"] == sim["logprobs"]["tokens"] and len(dec["logprobs"]["tokens"]) == 12
        gap = max(abs(a - b) for a, b in zip(sim["logprobs"]["token_logprobs"], dec["logprobs"]["token_logprobs"]))
        assert gap <= 1e-5


def test_static_decoder_equals_the_runner_decode_step(family):
    """The bench's path (preallocated cache, device position) against the simulation's forward with a cache."""
    name, model, converted, tmp = family
    config = AutoConfig.from_pretrained(converted)
    module = SPARSE_MODULES[name]
    pieces = {}
    for decode in sparse_decode.DECODE_CHOICES:
        sparsity = controller(name, config, converted, "random", tmp)
        blocks = [module.GPTBlock.from_pretrained(str(converted), config, i, sparsity=sparsity, decode="simulate")
                  for i in range(config.num_hidden_layers)]
        pieces[decode] = (sparsity, blocks)
    embeddings = module.GPTEmbeddings.from_pretrained(str(converted), config)
    lm_head = module.GPTLMHead.from_pretrained(str(converted), config)
    ids = torch.tensor([[5, 17, 40, 33, 9, 71, 12]])
    sim_sparsity, sim_blocks = pieces["simulate"]
    dec_sparsity, dec_blocks = pieces["kernels"]
    att = sim_blocks[0].self_attn
    kv_heads = getattr(att, "num_kv_heads", att.num_heads)
    cache = sparse_decode.StaticCache(len(dec_blocks), 1, kv_heads, 16, att.head_dim, torch.float32,
                                      torch.device("cpu"))
    decoder = sparse_decode.StaticDecoder(embeddings, dec_blocks, lm_head, sparse_decode.SimulationMasks(dec_sparsity),
                                          cache)
    with torch.no_grad():
        x, past = embeddings(ids), []
        bias = torch.zeros(1, 1, ids.shape[1], ids.shape[1]).masked_fill(
            torch.ones(ids.shape[1], ids.shape[1], dtype=torch.bool).triu(1), torch.finfo(torch.float32).min)
        for sim_block, dec_block in zip(sim_blocks, dec_blocks):
            x_sim, present = sim_block(x, bias, None)
            dec_block(x, bias, None)  # the same prompt pass, so both controllers draw the same random masks
            past.append(present)
            x = x_sim
        cache.load(past)
        token = torch.tensor([[21]])
        for step in range(3):
            n = ids.shape[1] + step
            x = embeddings(token, n)
            bias = torch.zeros(1, 1, 1, n + 1)
            for i, block in enumerate(sim_blocks):
                x, past[i] = block(x, bias, past[i])
            expected = lm_head(x)[:, 0]
            logits = decoder.step(token)
            torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
            token = expected.argmax(-1, keepdim=True)
            cache.set_position(n + 1)


def test_modes_that_rank_by_the_dense_activations_are_refused(family):
    name, _, converted, tmp = family
    config = AutoConfig.from_pretrained(converted)
    with pytest.raises(ValueError, match="oracle"):
        SPARSE_MODULES[name].GPTBlock(config, 0, sparsity=controller(name, config, converted, "oracle", tmp),
                                      decode="kernels")


@pytest.mark.skipif(sparse_kernels.triton is None, reason="Triton is not installed (CUDA builds of torch ship it)")
def test_triton_kernels_equal_the_torch_kernels_in_the_interpreter():
    """The Triton kernels run on CPU tensors under TRITON_INTERPRET=1 (float32) and match the torch backend."""
    script = textwrap.dedent("""
        import torch
        from Decentralized_FM_alpha.modules import sparse_decode
        from Decentralized_FM_alpha.modules.sparse_kernels import columns_times, rows_times
        gen = torch.Generator().manual_seed(0)
        for b, d, n, k in ((1, 48, 70, 20), (3, 40, 64, 9)):
            x, w, up = torch.randn(b, d, generator=gen), torch.randn(n, d, generator=gen), torch.randn(n, d, generator=gen)
            bias = torch.randn(n, generator=gen)
            sel = sparse_decode.select_top_k(torch.randn(b, n, generator=gen), k, torch.float32)
            for kwargs in ({"bias": bias, "act": "relu"}, {"up": up, "act": "silu"}, {}):
                got = rows_times(x, w, sel, backend="triton", **kwargs)
                want = rows_times(x, w, sel, backend="torch", **kwargs)
                assert torch.allclose(got, want, rtol=1e-4, atol=1e-4), (b, kwargs, (got - want).abs().max())
            linear = torch.nn.Linear(n, d, bias=False)
            a = torch.randn(b, sel.index.numel(), generator=gen) * (1 if sel.keep is None else sel.keep)
            got, want = (columns_times(a, linear, sel, backend=be) for be in ("triton", "torch"))
            assert torch.allclose(got, want, rtol=1e-4, atol=1e-4), (b, (got - want).abs().max())
        # whole decode steps of both architectures, given masks and predictors, batch 1 and 3
        from scripts.bench import bench_sparse_decode as bench
        cpu = torch.device("cpu")
        for name in ("llama-3.2-3b", "opt-2.7b"):
            model = bench.build_model(name, True, cpu, torch.float32, 0)
            k, h = bench.fraction_count(0.25, model.ffn), bench.fraction_count(0.5, model.attention.num_heads)
            for batch in (1, 3):
                given = bench.given_selections(model, batch, k, h, False, gen, torch.float32, cpu)
                predictors = bench.random_predictors(model, 16, torch.float32, cpu)
                for masks in (sparse_decode.GivenMasks(given),
                              sparse_decode.PredictorMasks(predictors, {0: k, 1: k}, {0: h, 1: h})):
                    logits = []
                    for backend in ("triton", "torch"):
                        cache = sparse_decode.StaticCache(2, batch, model.kv_heads, 16, model.attention.head_dim,
                                                          torch.float32, cpu)
                        cache.k.copy_(torch.randn(cache.k.shape, generator=torch.Generator().manual_seed(3)))
                        cache.v.copy_(torch.randn(cache.v.shape, generator=torch.Generator().manual_seed(4)))
                        cache.set_position(9)
                        decoder = sparse_decode.StaticDecoder(model.embeddings, model.blocks, model.lm_head, masks,
                                                              cache, backend)
                        with torch.no_grad():
                            logits.append(decoder.step(torch.full((batch, 1), 7)))
                    assert torch.allclose(*logits, rtol=1e-4, atol=1e-4), (name, batch, type(masks).__name__)
        print("ok")
    """)
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-3000:]


@pytest.fixture(scope="module")
def smoke_bench(tmp_path_factory, one_cpu_thread) -> dict:
    """bench_sparse_decode.py --smoke at one MLP and one head fraction, as its JSON."""
    from scripts.bench import bench_sparse_decode

    out = tmp_path_factory.mktemp("bench")
    bench_sparse_decode.main(["--smoke", "--mlp-fractions", "0.25", "--att-fractions", "0.5", "--out", str(out)])
    return json.loads((out / "bench_sparse_decode.json").read_text())


def test_bench_smoke_writes_every_setting_next_to_its_floor(smoke_bench):
    report = smoke_bench
    assert report["complete"] and set(report["models"]) == {"llama-3.2-3b", "opt-2.7b"}
    assert report["ceilings"]["copy_bytes_per_s"] > 0 and report["provenance"]["git_commit"]
    budgets = {(0.25, None), (None, 0.5), (0.25, 0.5)}
    for name, m in report["models"].items():
        assert not m.get("errors"), m.get("errors")
        for key, check in m["check"].items():
            if key.startswith("decode"):
                assert check["sparse_vs_simulation_rel_error"] < 1e-5, (name, key)
        rows = {(r["batch"], r["mode"], r["masks"], r["mlp_fraction"], r["att_fraction"]): r for r in m["decode"]}
        expected = {(b, "dense", "n/a", None, None) for b in (1, 2)}
        expected |= {(1, mode, masks, *f) for f in budgets for mode, masks in (("given", "one"),
                                                                              ("predictor", "predicted"))}
        expected |= {(2, mode, masks, *f) for f in budgets for mode, masks in (("given", "independent"),
                                                                              ("given", "shared"),
                                                                              ("predictor", "predicted"))}
        assert set(rows) == expected
        for r in rows.values():
            assert r["tokens_per_s"] > 0 and r["floor_us"] > 0 and r["floor_bytes"] > 0
        assert all(r["predictor_share"] > 0 for r in rows.values() if r["mode"] == "predictor")
        independent, shared = rows[(2, "given", "independent", 0.25, None)], rows[(2, "given", "shared", 0.25, None)]
        kept = independent["mlp_kept"] / m["ffn"]
        assert shared["mlp_union_fraction"] == pytest.approx(kept) and independent["mlp_union_fraction"] > kept
        dense_bytes = rows[(1, "dense", "n/a", None, None)]["floor_bytes"]
        assert rows[(1, "given", "one", 0.25, None)]["floor_bytes"] < dense_bytes
        assert {r["batch"] for r in m["kernel"]} == {1, 2} and {r["batch"] for r in m["hf_generate"]} == {1, 2}


def test_speed_section_prices_each_sweep_row_with_its_bench_row(smoke_bench, tmp_path):
    from scripts.report.speed import speed_section

    llama = smoke_bench["models"]["llama-3.2-3b"]
    mlp_kept, att_kept = fraction_count(0.25, llama["ffn"]), fraction_count(0.5, llama["heads"])
    row = dict(dataset="c4", att_unit="heads", predictor_input="lookahead", output_manifest="")
    sweep = [dict(row, model="meta-llama/Llama-3.2-3B", mode="dense", block="none", mlp_topk="dense", att_topk="dense",
                  mlp_kept="n/a", att_kept="n/a", perplexity="10.0"),
             dict(row, model="meta-llama/Llama-3.2-3B", mode="predictor", block="mlp", mlp_topk="0.25",
                  att_topk="dense", mlp_kept=str(mlp_kept), att_kept="n/a", perplexity="13.0"),
             dict(row, model="meta-llama/Llama-3.2-3B", mode="oracle", block="both", mlp_topk=str(mlp_kept),
                  att_topk="0.5", mlp_kept=str(mlp_kept), att_kept=str(att_kept), perplexity="11.0"),
             dict(row, model="smollm2-135m", mode="dense", block="none", mlp_topk="dense", att_topk="dense",
                  mlp_kept="n/a", att_kept="n/a", perplexity="20.0")]
    lines = speed_section(sweep, smoke_bench, tmp_path / "figures", tmp_path, source="[S1]")
    text = "\n".join(lines)
    assert "random weights at the real shapes" in text and "union" in text
    assert (tmp_path / "figures" / "speed_vs_perplexity.png").is_file() and "figures/speed_vs_perplexity.png" in text
    bench = {(r["batch"], r["mode"], r["masks"], r["mlp_kept"], r["att_kept"]): r for r in llama["decode"]}
    cells = {(line.split(" | ")[2], line.split(" | ")[4]): line.split(" | ") for line in lines
             if line.startswith("| meta-llama")}  # (mode, att_topk)
    predictor = cells[("predictor", "dense")]
    assert predictor[5] == f"{13.0 / 10.0:.2f}"
    assert predictor[6] == f"{bench[(1, 'predictor', 'predicted', mlp_kept, None)]['speedup_vs_dense']:.2f}"
    assert predictor[7] == f"{bench[(2, 'predictor', 'predicted', mlp_kept, None)]['speedup_vs_dense']:.2f}"
    oracle = cells[("oracle", "0.5")]
    assert oracle[6] == f"{bench[(1, 'given', 'one', mlp_kept, att_kept)]['speedup_vs_dense']:.2f}"
    assert "a bound" in oracle[8] and "smollm2-135m" in text  # no bench at its shape, said so
