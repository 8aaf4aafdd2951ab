"""The harness model `dejavu`: dense equals the harness's own HFLM, full budgets equal dense, sparse modes equal the
runner's, on requests the harness builds from the local task."""
from __future__ import annotations

import pytest
import torch
from lm_eval.api.instance import Instance
from lm_eval.api.registry import get_model
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager

from Decentralized_FM_alpha.lm_eval_model import DejaVuLM
from scripts.assets import make_local_task
from tests.helpers_models import make_llama, make_opt
from tests.runner_helpers import read_results, run_one_rank, token_logprobs, write_requests
from tests.test_sparse_inference import write_predictors

TOL = 1e-4
pytestmark = pytest.mark.usefixtures("one_cpu_thread")


@pytest.fixture(scope="module")
def local_task(tmp_path_factory):
    return make_local_task.main(["--out-dir", str(tmp_path_factory.mktemp("lm_eval_tasks")), "--num-examples", "5",
                                 "--max-words", "24"])


@pytest.fixture(scope="module")
def requests(local_task) -> list[Instance]:
    """The harness's own (context, continuation) requests of both local tasks: 5 last words, 5 x 4 choices."""
    loaded = TaskManager(include_path=str(local_task), include_defaults=False).load(list(make_local_task.LOCAL_TASKS))
    instances = []
    for task in loaded["tasks"].values():
        task.build_all_requests(rank=0, world_size=1)
        instances += task.instances
    assert len(instances) == 5 + 5 * 4
    return instances


@pytest.fixture(scope="module", params=["opt", "llama"])
def family(request, tmp_path_factory, tiny_tokenizer_dir):
    tmp = tmp_path_factory.mktemp(f"lm_eval_{request.param}")
    model, hf_dir, converted = (make_opt if request.param == "opt" else make_llama)(tmp, tiny_tokenizer_dir, seed=5)
    dense = DejaVuLM(pretrained=str(converted), device="cpu", batch_size=4)
    return request.param, model, hf_dir, converted, tmp, dense


def loglikelihoods(lm, instances) -> torch.Tensor:
    return torch.tensor([logprob for logprob, _ in lm.loglikelihood(instances, disable_tqdm=True)],
                        dtype=torch.float64)


def sparse_lm(converted, **kwargs) -> DejaVuLM:
    return DejaVuLM(pretrained=str(converted), device="cpu", batch_size=4, **kwargs)


def test_dejavu_is_registered_with_the_harness():
    assert get_model("dejavu") is DejaVuLM


def test_dense_loglikelihoods_equal_the_harness_hf_wrapper(family, requests):
    name, _, hf_dir, converted, _, dense = family
    hf = HFLM(pretrained=str(hf_dir), device="cpu", batch_size=3, dtype="float32")
    ours, theirs = dense.loglikelihood(requests, disable_tqdm=True), hf.loglikelihood(requests, disable_tqdm=True)
    error = (torch.tensor([o[0] for o in ours]) - torch.tensor([t[0] for t in theirs])).abs().max().item()
    assert error <= TOL, error
    assert [o[1] for o in ours] == [t[1] for t in theirs]
    assert all(o[0] < 0 for o in ours)
    # whole texts in rolling windows: 24-token windows cut the first two into several
    contexts = list(dict.fromkeys(r.args[0] for r in requests))
    texts = [" ".join(contexts[:3]), " ".join(contexts[2:]), contexts[0][:40]]
    rolling = [Instance("loglikelihood_rolling", {}, (text,), i) for i, text in enumerate(texts)]
    short = DejaVuLM(pretrained=str(converted), device="cpu", batch_size=4, max_seq_len=24)
    hf_short = HFLM(pretrained=str(hf_dir), device="cpu", batch_size=3, dtype="float32", max_length=24)
    assert len(short.tok_encode(texts[0])) > 2 * 24
    ours, theirs = short.loglikelihood_rolling(rolling, True), hf_short.loglikelihood_rolling(rolling, True)
    assert max(abs(o - t) for o, t in zip(ours, theirs)) <= TOL


def test_a_continuation_longer_than_max_length_is_an_error(family):
    dense = family[-1]
    with pytest.raises(ValueError, match=f"continuation of {dense.max_length + 1} tokens is longer than max_length"):
        dense._loglikelihood_tokens([(None, [5, 6], [7] * (dense.max_length + 1))], disable_tqdm=True)


def full_budgets(model, name) -> dict:
    c = model.config
    return {"mlp_topk": c.ffn_dim if name == "opt" else c.intermediate_size, "att_topk": c.num_attention_heads}


def test_full_budget_in_every_mode_equals_dense(family, requests):
    name, model, _, converted, tmp, dense = family
    write_predictors(tmp / "pred_full", model, name, seed=3)
    reference = loglikelihoods(dense, requests)
    for mode in ("dense", "oracle", "random", "predictor"):
        extra = {"predictor_dir": str(tmp / "pred_full")} if mode == "predictor" else {}
        lm = sparse_lm(converted, sparse_mode=mode, gqa_groups=(name, mode) == ("llama", "oracle"),
                       **full_budgets(model, name), **extra)
        assert (loglikelihoods(lm, requests) - reference).abs().max().item() <= 1e-6, mode


def runner_continuation_logprobs(family, lm, requests, tag, flags) -> torch.Tensor:
    """The runner's log-probs, on context + continuation as one echo request, summed over the continuation tokens."""
    name, _, _, converted, tmp, _ = family
    prompts = [context + continuation for context, continuation in (r.args for r in requests)]
    out = tmp / f"runner_{tag}.jsonl"
    run_one_rank(["--model-name", str(converted), "--model-type", f"{name}-ml-att-sparse", "--infer-data",
                  str(write_requests(tmp / f"req_{tag}.jsonl", prompts)), "--output-path", str(out), *flags])
    sums = []
    for r, result in zip(requests, read_results(out)):
        continuation = lm._encode_pair(*r.args)[1]
        sums.append(sum(token_logprobs(result)[-len(continuation):]))
    return torch.tensor(sums, dtype=torch.float64)


@pytest.mark.parametrize("mode", ["oracle", "predictor"])
def test_sparse_modes_at_a_budget_equal_the_runner(family, requests, mode):
    name, model, _, converted, tmp, dense = family
    write_predictors(tmp / "pred", model, name, seed=4)  # lookahead: MLP reads att_x_l, attention att_x_(l-1)
    gqa = name == "llama" and mode == "oracle"
    args = {"sparse_mode": mode, "mlp_topk": 0.25, "att_topk": 2, "gqa_groups": gqa,
            **({"predictor_dir": str(tmp / "pred")} if mode == "predictor" else {})}
    lm = sparse_lm(converted, **args)
    ours = loglikelihoods(lm, requests)
    flags = ["--sparse-mode", mode, "--mlp-topk", "0.25", "--att-topk", "2", *(["--gqa-groups"] if gqa else []),
             *(["--predictor-dir", str(tmp / "pred")] if mode == "predictor" else [])]
    runner = runner_continuation_logprobs(family, lm, requests, mode, flags)
    assert (ours - runner).abs().max().item() <= TOL
    assert (ours - loglikelihoods(dense, requests)).abs().max().item() > 1e-2  # the budget changes the answer
    assert lm.get_model_info()["dejavu"]["sparsity"]["mode"] == mode


def test_model_arguments_are_the_runners_flags_and_errors_name_what_is_wrong(family, tmp_path):
    name, model, _, converted, tmp, _ = family
    lm = DejaVuLM.create_from_arg_string(f"pretrained={converted},sparse_mode=random,mlp_topk=0.5,att_topk=3,"
                                         f"sparse_layers=1-2,dtype=float32,seed=7", {"batch_size": 2, "device": "cpu"})
    sparsity = lm.get_model_info()["dejavu"]["sparsity"]
    assert sparsity["mlp_budgets"] == {1: 0.5, 2: 0.5} and sparsity["att_budgets"] == {1: 3, 2: 3}
    assert lm.args.seed == 7 and lm.args.token_micro_batch_size == 2 and lm.args.dtype == "fp32"
    write_predictors(tmp_path / "pred", model, name, seed=1, layers=[0, 2])
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'pred' / 'mlp_layer1.pt'}"):
        sparse_lm(converted, sparse_mode="predictor", predictor_dir=str(tmp_path / "pred"), mlp_topk=0.25)
    with pytest.raises(TypeError, match="trust_remote_code"):
        sparse_lm(converted, trust_remote_code=True)
    with pytest.raises(ValueError, match="without sparse_mode"):
        sparse_lm(converted, mlp_topk=0.25)


def test_generate_until_is_the_greedy_completion_of_hf(family, tiny_tokenizer_dir):
    name, model, _, _, _, dense = family
    context = "The river flows into the"
    request = Instance("generate_until", {}, (context, {"until": ["\n\n"], "max_gen_toks": 6}), 0)
    ids = dense.tokenizer(context, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=model.config.pad_token_id)
    text = dense.tokenizer.decode(expected[0, ids.shape[1]:])
    assert dense.generate_until([request], disable_tqdm=True) == [text.split("\n\n")[0]]
