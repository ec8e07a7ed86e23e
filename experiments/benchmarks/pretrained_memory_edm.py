"""Host memory of `load_pretrained` on an NVlabs/edm network snapshot (.pkl) of EDM's ImageNet-64 ADM
size (EDMPrecond(DhariwalUNet), 1000 classes, random weights), pickled with EDM's own code as its
training loop does: peak RSS of a fresh process that only loads it, divided by the file's size.
Prints a table and writes experiments/results/pretrained_memory_EDM-ADM-imagenet64.*.

    python -m experiments.benchmarks.pretrained_memory_edm --edm REPO      (needs torch)
"""

from __future__ import annotations

import argparse
import importlib
import tempfile
from pathlib import Path

from experiments.benchmarks.common import markdown_table, write_results
from experiments.benchmarks.pretrained_memory import measure
from experiments.pretrained.make_edm_pickles import snapshot
from experiments.pretrained.make_fixtures import load_package

NAME = "EDM-ADM-imagenet64"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--edm", type=Path, required=True)
    args = ap.parse_args()
    import torch

    torch.set_grad_enabled(False)
    load_package("dnnlib", args.edm / "dnnlib")
    load_package("torch_utils", args.edm / "torch_utils")
    load_package("training", args.edm / "training")
    networks = importlib.import_module("training.networks")
    loss = importlib.import_module("training.loss")
    net = networks.EDMPrecond(img_resolution=64, img_channels=3, label_dim=1000, model_type="DhariwalUNet")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "network-snapshot.pkl"
        snapshot(torch, net, loss.EDMLoss(), None, path)
        del net
        row = measure(NAME, path)
    table = markdown_table(list(row), [list(row.values())])
    print(table)
    write_results(f"pretrained_memory_{NAME}", {"rows": [row]}, table)


if __name__ == "__main__":
    main()
