"""Real UEA/UCR time-series classification data from the files the `aeon` wheel ships.

    pip install 'lstm-pipeline[uea]'
    lstm-pipeline data uea JapaneseVowels --out data/vowels

aeon carries a few archive datasets inside its wheel (aeon/datasets/data/NAME/NAME_TRAIN.ts and
NAME_TEST.ts: JapaneseVowels, BasicMotions, GunPoint, ArrowHead, ItalyPowerDemand, OSULeaf, ...).
Only those are offered: aeon's own loader reads the shipped files, and a name that is not shipped
is refused here instead of being downloaded. The archive's TRAIN split becomes OUT/train, its
TEST split OUT/val; string class labels become indices with the names kept as `data prepare`
keeps them (OUT/dataset.json and the shards' schema metadata).
"""

from __future__ import annotations

import importlib.util
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import DataError
from pipeline.prepare import DATASET_FILE, META_KEY
from pipeline.shards import sequence_array
from pipeline.storage import Output


def shipped_dir() -> str:
    spec = importlib.util.find_spec("aeon")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("`data uea` needs aeon, which ships the UEA/UCR files: "
                        "pip install 'lstm-pipeline[uea]'")
    return os.path.join(list(spec.submodule_search_locations)[0], "datasets", "data")


def shipped_names() -> list[str]:
    root = shipped_dir()
    return sorted(n for n in os.listdir(root)
                  if os.path.isfile(os.path.join(root, n, f"{n}_TRAIN.ts"))
                  and os.path.isfile(os.path.join(root, n, f"{n}_TEST.ts")))


def _table(X, y, names: list[str] | None, split: str) -> pa.Table:
    """aeon's (channels, length) series -> time-major list<list<float32>> rows; labels are class
    indices into `names`, or the regression targets when `names` is None."""
    series = [np.asarray(x, dtype=np.float32).T for x in X]  # [length, channels]
    lengths = np.array([len(s) for s in series])
    features = sequence_array(np.concatenate(series), np.concatenate([[0], np.cumsum(lengths)]))
    if names is None:
        label = pa.array(np.asarray(y, dtype=np.float32))
    else:
        index = {n: i for i, n in enumerate(names)}
        label = pa.array([index[str(v)] for v in y], type=pa.int64())
    return pa.table({"id": pa.array([f"{split}-{i:05d}" for i in range(len(series))]),
                     "features": features, "label": label})


def _class_order(names: set[str]) -> list[str]:
    """Class names in numeric order when they are all numbers (1, 2, ..., 10), else sorted."""
    try:
        return sorted(names, key=float)
    except ValueError:
        return sorted(names)


def _load(name: str) -> tuple[str, dict]:
    """(task, {split: (X, y)}) from aeon's loader: a classification problem, else a regression one
    (aeon keeps both kinds in the wheel; its classification loader refuses regression sets)."""
    from aeon.datasets import load_classification, load_regression

    splits = {}
    task = "classification"
    for split, aeon_split in (("train", "train"), ("val", "test")):
        try:
            X, y = load_classification(name, split=aeon_split, extract_path=shipped_dir())
        except ValueError as exc:
            if "regression problem" not in str(exc):
                raise DataError(f"aeon cannot load {name!r} ({str(exc).splitlines()[0]}): choose "
                                "another dataset from `data uea --list`") from None
            task = "regression"
            X, y = load_regression(name, split=aeon_split, extract_path=shipped_dir())
        splits[split] = (X, y)
    return task, splits


def write_uea(name: str, out: str, overwrite: bool = False) -> dict:
    """Write OUT/train, OUT/val and OUT/dataset.json for the shipped dataset NAME (classification
    or, for the archive's regression sets, float targets: train it with model.task=regression)."""
    available = shipped_names()
    if name not in available:
        raise DataError(f"{name!r} is not among the UEA/UCR datasets shipped in the aeon wheel "
                        f"(nothing is downloaded): choose one of {', '.join(available)}")
    output = Output(out, "uea", overwrite=overwrite,
                    inputs={"the aeon dataset": os.path.join(shipped_dir(), name)})
    task, splits = _load(name)
    names = None
    if task == "classification":
        names = _class_order({str(v) for _, y in splits.values() for v in y})
    facts = {"source": f"aeon {name} (UEA/UCR archive, shipped in the aeon wheel)",
             "task": task, "class_names": names}
    with output.staged() as staging:
        counts = {}
        for split, (X, y) in splits.items():
            table = _table(X, y, names, split)
            facts.setdefault("features", [f"channel_{j}" for j in
                                          range(len(table.column("features")[0].as_py()[0]))])
            os.makedirs(os.path.join(staging, split))
            pq.write_table(table.replace_schema_metadata({META_KEY: json.dumps(facts).encode()}),
                           os.path.join(staging, split, "part-00000.parquet"))
            counts[split] = table.num_rows
        facts["examples"] = counts
        with open(os.path.join(staging, DATASET_FILE), "w") as fh:
            json.dump(facts, fh, indent=2)
    return facts
