"""C4 `en` validation documents -> echo requests for perplexity (original DejaVu c4_val/getdata.py).

    python Decentralized_FM_alpha/c4_val/getdata.py                   # 10,000 docs from the hub
    python Decentralized_FM_alpha/c4_val/getdata.py --from-file data/samples/c4_validation_2k.parquet --num-docs 0

Writes Decentralized_FM_alpha/c4_val/c4_valid.jsonl (the path the original perplexity scripts
read) and c4_valid.jsonl.manifest.json. All logic: task_datasets/request_files.py.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from Decentralized_FM_alpha.task_datasets.request_files import c4_getdata_main  # noqa: E402

if __name__ == "__main__":
    c4_getdata_main(None, split="validation", default_output=Path(__file__).resolve().parent / "c4_valid.jsonl",
                    default_num_docs=10000)
