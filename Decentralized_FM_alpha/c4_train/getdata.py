"""C4 `en` train documents -> echo requests for activation collection (original DejaVu c4_train/getdata.py).

    python Decentralized_FM_alpha/c4_train/getdata.py                 # 500 docs from the hub
    python Decentralized_FM_alpha/c4_train/getdata.py --from-file data/samples/c4_train_1k.jsonl

Writes Decentralized_FM_alpha/c4_train/c4_train.jsonl (the path the original collection script
reads) and c4_train.jsonl.manifest.json. All logic: task_datasets/request_files.py.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from Decentralized_FM_alpha.task_datasets.request_files import c4_getdata_main  # noqa: E402

if __name__ == "__main__":
    c4_getdata_main(None, split="train", default_output=Path(__file__).resolve().parent / "c4_train.jsonl",
                    default_num_docs=500)
