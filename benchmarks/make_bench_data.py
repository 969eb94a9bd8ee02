"""Writes the benchmark data sets offline: a CIFAR-10-schema image folder and a GLUE-schema sst2 folder with a
matching tokenizer (tests/helpers builds both; nothing is downloaded).

Usage: python benchmarks/make_bench_data.py OUT_DIR [--images 12800] [--sentences 4096]
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.helpers.tiny_datasets import make_cifar_like  # noqa: E402
from tests.helpers.tiny_glue import make_glue_like, make_tiny_bert  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("out")
parser.add_argument("--images", type=int, default=12800)
parser.add_argument("--sentences", type=int, default=4096)
args = parser.parse_args()
out = Path(args.out)
# The folder is named cifar10 so that the recipe uses the CIFAR-10 normalisation, as on the Hub.
make_cifar_like(out / "cifar10", n_train=args.images, n_test=max(args.images // 10, 100))
make_glue_like(out / "glue", "sst2", n_train=args.sentences, n_eval=256)
make_tiny_bert(out / "tokenizer")
print(f"bench data in {out}")
