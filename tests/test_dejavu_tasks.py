"""DejaVu's seven local tasks (scripts/assets/dejavu_tasks.py): the harness's own requests from the bundled splits,
the Hugging Face field layout, dense accuracy equal to the harness's `hf` model, and checksums enforced."""
from __future__ import annotations

import shutil
from pathlib import Path

import datasets
import pytest
from lm_eval import utils as harness_utils
from lm_eval.api.task import ConfigurableTask
from lm_eval.evaluator import evaluate
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager
from lm_eval.tasks._yaml_loader import load_yaml

from Decentralized_FM_alpha import convert_llama_checkpoint, lm_eval_model
from Decentralized_FM_alpha.lm_eval_model import DejaVuLM
from scripts.assets import dejavu_tasks, make_local_task

REPO = Path(__file__).resolve().parents[1]
FIRST = 20  # documents whose requests are compared
pytestmark = pytest.mark.usefixtures("one_cpu_thread")

# The fields (and their types) of the Hugging Face datasets the harness's built-in tasks read.
HF_FIELDS = {
    "dejavu_cb": {"premise": str, "hypothesis": str, "idx": int, "label": int},
    "dejavu_copa": {"premise": str, "choice1": str, "choice2": str, "question": str, "idx": int, "label": int},
    "dejavu_rte": {"premise": str, "hypothesis": str, "idx": int, "label": int},
    "dejavu_winogrande": {"sentence": str, "option1": str, "option2": str, "answer": str},
    "dejavu_piqa": {"goal": str, "sol1": str, "sol2": str, "label": int},
    "dejavu_openbookqa": {"id": str, "question_stem": str, "choices": dict, "answerKey": str},
    "dejavu_lambada_openai": {"text": str},
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """The offline task folder as the study writes it (the WikiText-2 test task and DejaVu's seven)."""
    return make_local_task.main(["--out-dir", str(tmp_path_factory.mktemp("tasks")), "--num-examples", "5",
                                 "--max-words", "24"])


@pytest.fixture(scope="module")
def local(folder) -> dict:
    """The seven local tasks as the harness loads them from the folder."""
    return TaskManager(include_path=str(folder), include_defaults=False).load(list(dejavu_tasks.TASK_NAMES))["tasks"]


def builtin_task(yaml: str, documents: list[dict], **overrides) -> ConfigurableTask:
    """The harness's built-in task from its own YAML, its hub dataset replaced by the given documents."""
    config = load_yaml(dejavu_tasks.harness_tasks_dir() / yaml)
    splits = {config[k] for k in dejavu_tasks.SPLITS if config.get(k)}  # train too: the few-shot sampler reads it
    config["custom_dataset"] = lambda **_: datasets.DatasetDict(
        {split: datasets.Dataset.from_list(documents) for split in splits})
    return ConfigurableTask(config={**config, **overrides})


def requests(task, limit: int = FIRST) -> list[tuple]:
    task.build_all_requests(limit=limit, rank=0, world_size=1)
    return [(i.doc_id, i.idx, i.request_type, i.args) for i in task.instances]


@pytest.mark.parametrize("name", dejavu_tasks.TASK_NAMES)
def test_local_task_requests_equal_the_builtin_task_on_the_same_documents(local, name, monkeypatch):
    """Local: through lm_eval_model's compiled-once templates; built-in: through the harness's own apply_template."""
    spec = dejavu_tasks.BY_NAME[name]
    documents = dejavu_tasks.hf_documents(spec)
    builtin = builtin_task(spec.builtin_yaml, documents)
    ours = requests(local[name])
    monkeypatch.setattr(harness_utils, "apply_template", lm_eval_model.HARNESS_APPLY_TEMPLATE)
    assert ours == requests(builtin)
    assert len({args for *_, args in ours}) == len(ours)  # distinct pairs: a constant prompt would not pass
    assert local[name].OUTPUT_TYPE == builtin.OUTPUT_TYPE
    assert local[name]._metric_fn_list.keys() == builtin._metric_fn_list.keys()
    assert local[name]._aggregation_list == builtin._aggregation_list
    assert [dict(d) for d in local[name].eval_docs] == documents  # every document, in file order
    assert local[name].config.num_fewshot in (None, 0)


def test_local_rte_is_also_the_hub_rte_of_glue(local):
    """DejaVu's `rte` is the harness's GLUE task: the same prompt on sentence1 / sentence2."""
    documents = [{"sentence1": d["premise"], "sentence2": d["hypothesis"], "idx": d["idx"], "label": d["label"]}
                 for d in dejavu_tasks.hf_documents(dejavu_tasks.BY_NAME["dejavu_rte"])]
    assert requests(local["dejavu_rte"]) == requests(builtin_task("glue/rte/default.yaml", documents))


def test_few_shot_examples_come_from_the_scored_split_never_the_document_itself(local):
    task = local["dejavu_copa"]
    task.set_config(key="num_fewshot", value=2)
    task.set_fewshot_seed(seed=1234)
    try:
        shots = requests(task, limit=5)
    finally:
        task.set_config(key="num_fewshot", value=0)
    zero = requests(task, limit=5)
    docs = list(task.eval_docs)
    for (doc_id, _, _, (context, _)), (_, _, _, (bare, _)) in zip(shots, zero):
        assert context.endswith(bare) and len(context) > len(bare)
        premises = [d["premise"].strip()[:-1] for d in docs if d["premise"].strip()[:-1] in context[:-len(bare)]]
        assert len(premises) == 2 and docs[doc_id]["premise"].strip()[:-1] not in premises


def test_documents_have_the_hugging_face_fields_and_count_every_line(local):
    """Every document of the full splits: the fields the built-in prompt functions read, answers in range (the
    harness's templates take about 20 s on all 9,191 documents here, so the requests are compared on the first 20)."""
    for name, fields in HF_FIELDS.items():
        spec = dejavu_tasks.BY_NAME[name]
        documents = dejavu_tasks.hf_documents(spec)
        source = dejavu_tasks.DATA_DIR / spec.sources[0]
        assert len(documents) == len(source.read_text().splitlines()) == len(local[name].eval_docs)
        for doc in documents:
            assert list(doc) == list(fields) and all(isinstance(doc[k], t) for k, t in fields.items()), (name, doc)
    piqa = dejavu_tasks.hf_documents(dejavu_tasks.BY_NAME["dejavu_piqa"])
    labels = (dejavu_tasks.DATA_DIR / "piqa/valid-labels.lst").read_text().split()
    assert [d["label"] for d in piqa] == [int(x) for x in labels] and {d["label"] for d in piqa} == {0, 1}
    for doc in dejavu_tasks.hf_documents(dejavu_tasks.BY_NAME["dejavu_openbookqa"]):
        assert doc["choices"]["label"] == ["A", "B", "C", "D"] and len(doc["choices"]["text"]) == 4
        assert doc["answerKey"] in doc["choices"]["label"]
    assert {d["answer"] for d in dejavu_tasks.hf_documents(dejavu_tasks.BY_NAME["dejavu_winogrande"])} == {"1", "2"}
    labels = {name: {d["label"] for d in dejavu_tasks.hf_documents(dejavu_tasks.BY_NAME[name])}
              for name in ("dejavu_cb", "dejavu_copa", "dejavu_rte")}
    assert labels == {"dejavu_cb": {0, 1, 2}, "dejavu_copa": {0, 1}, "dejavu_rte": {0, 1}}
    lambada = dejavu_tasks.hf_documents(dejavu_tasks.BY_NAME["dejavu_lambada_openai"])
    assert all(len(d["text"].split(" ")) > 1 for d in lambada)  # a context and a last word


def test_a_changed_data_file_is_an_error_naming_it(tmp_path, folder):
    data = shutil.copytree(dejavu_tasks.DATA_DIR, tmp_path / "data")
    assert dejavu_tasks.write_tasks(tmp_path / "ok", data)["tasks"]["dejavu_piqa"]["documents"] == 1838
    labels = data / "piqa/valid-labels.lst"
    labels.write_text(labels.read_text().replace("1", "0", 1))  # one label flipped
    with pytest.raises(ValueError, match=f"{labels}: sha256 .* differs"):
        dejavu_tasks.write_tasks(tmp_path / "out", data)
    (data / "cb/cb_validation.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match="cb_validation.jsonl: missing"):
        dejavu_tasks.write_tasks(tmp_path / "out", data)
    # a written document changed after the folder was made: the sweep's check before evaluating names it
    dejavu_tasks.verify_task_folder(folder)
    copy = shutil.copytree(folder, tmp_path / "folder")
    manifest = (copy / "task_manifest.json").read_text().replace(str(folder), str(copy))
    (copy / "task_manifest.json").write_text(manifest)
    dejavu_tasks.verify_task_folder(copy)
    written = copy / "dejavu_rte.jsonl"
    written.write_text(written.read_text().replace("True", "Trve", 1) + "\n")
    with pytest.raises(ValueError, match=f"{written}: sha256 .* differs"):
        dejavu_tasks.verify_task_folder(copy)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> tuple[Path, Path]:
    """The bundled trained tiny Llama and its conversion."""
    hf_dir = REPO / "pretrained_models/tiny-llama"
    converted = tmp_path_factory.mktemp("tiny_llama") / "converted"
    convert_llama_checkpoint.main(["--model-name", str(hf_dir), "--save-path", str(converted)])
    return hf_dir, converted


def test_dense_accuracy_on_the_local_tasks_equals_the_harness_hf_model(folder, tiny_llama):
    hf_dir, converted = tiny_llama
    manager = TaskManager(include_path=str(folder), include_defaults=False)
    scores = []
    for lm in (DejaVuLM(pretrained=str(converted), device="cpu", batch_size=8),
               HFLM(pretrained=str(hf_dir), device="cpu", batch_size=8, dtype="float32")):
        out = evaluate(lm=lm, task_dict=manager.load([dejavu_tasks.GROUP]), limit=6, bootstrap_iters=0,
                       log_samples=False)
        scores.append({task: {k: v for k, v in metrics.items() if k != "alias"}
                       for task, metrics in out["results"].items()})
    ours, theirs = scores
    assert set(ours) == {dejavu_tasks.GROUP, *dejavu_tasks.TASK_NAMES}
    for task, metrics in theirs.items():
        assert set(ours[task]) == set(metrics)
        for key, value in metrics.items():
            if isinstance(value, str):  # a text entry (pytest 9 refuses approx on a string): equal as text
                assert ours[task][key] == value, (task, key)
            else:
                assert ours[task][key] == pytest.approx(value, rel=1e-5, abs=1e-9), (task, key)
    assert ours["dejavu_lambada_openai"]["perplexity,none"] > 1  # a real score, compared above to 5 digits
    accuracies = [ours[task]["acc,none"] for task in dejavu_tasks.TASK_NAMES]
    assert ours[dejavu_tasks.GROUP]["acc,none"] == pytest.approx(sum(accuracies) / 7)  # the paper's unweighted mean
