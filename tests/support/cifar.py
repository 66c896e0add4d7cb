"""Small CIFAR-10 copies in the real on-disk format (python pickles of uint8 rows), for the real loader."""

from __future__ import annotations

import hashlib
import os
import pickle

import numpy as np

BATCH_FILES = [f"data_batch_{i}" for i in range(1, 6)]
LABEL_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def write_cifar10(root: str, per_batch: int = 4, test_size: int = 6, seed: int = 0) -> tuple[dict[str, str], dict]:
    """Write `root/cifar-10-batches-py/` and return (md5 per file, the arrays written)."""
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder, exist_ok=True)
    written = {"train_rows": [], "train_labels": [], "test_rows": None, "test_labels": None}

    def dump(name: str, payload: dict) -> None:
        with open(os.path.join(folder, name), "wb") as handle:
            pickle.dump(payload, handle, protocol=2)

    for index, name in enumerate(BATCH_FILES):
        rows = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = [int(x) for x in rng.integers(0, 10, size=per_batch)]
        dump(name, {"batch_label": f"training batch {index + 1} of 5", "labels": labels, "data": rows,
                    "filenames": [f"img_{index}_{i}.png" for i in range(per_batch)]})
        written["train_rows"].append(rows)
        written["train_labels"] += labels
    test_rows = rng.integers(0, 256, size=(test_size, 3072), dtype=np.uint8)
    test_labels = [int(x) for x in rng.integers(0, 10, size=test_size)]
    dump("test_batch", {"batch_label": "testing batch 1 of 1", "labels": test_labels, "data": test_rows,
                        "filenames": [f"test_{i}.png" for i in range(test_size)]})
    dump("batches.meta", {"label_names": LABEL_NAMES, "num_cases_per_batch": per_batch, "num_vis": 3072})
    written["train_rows"] = np.concatenate(written["train_rows"])
    written["test_rows"], written["test_labels"] = test_rows, test_labels
    checksums = {}
    for name in BATCH_FILES + ["test_batch", "batches.meta"]:
        with open(os.path.join(folder, name), "rb") as handle:
            checksums[name] = hashlib.md5(handle.read()).hexdigest()
    return checksums, written
