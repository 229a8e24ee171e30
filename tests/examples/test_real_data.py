"""The full data sets parse as distributed, with their documented row counts (``make test-real-data``).

Deselected unless ``--real-data DIR`` names the directory (the default run reads tests/data only); ``make paper``
runs this first on ``$(DATA)``. Row counts: the data directory's SOURCES.md.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.real_data


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"examples_{name}_real", ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


glue = _load("glue")
gsm8k = _load("gsm8k")


@pytest.mark.parametrize("task, train_rows, dev_rows, metric, regression, width", [
    ("SST-2", 10000, 872, "accuracy", False, 1),
    ("CoLA", 8551, 1043, "mcc", False, 1),
    ("STS-B", 5749, 1500, "pearson", True, 2),
])
def test_real_glue_tasks(real_data_dir, task, train_rows, dev_rows, metric, regression, width):
    t = glue.load_task(real_data_dir / task)
    assert (len(t.train.texts), len(t.dev.texts)) == (train_rows, dev_rows)
    assert (t.metric, t.regression) == (metric, regression)
    assert t.classes == ([] if regression else ["0", "1"])
    assert all(len(x) == width and all(s.strip() for s in x) for x in t.train.texts + t.dev.texts)


@pytest.mark.parametrize("split, rows", [("train", 7473), ("test", 1319)])
def test_real_gsm8k(real_data_dir, split, rows):
    got = gsm8k.load_rows(split, 10**6, data_dir=real_data_dir / "gsm8k")
    assert len(got) == rows
    assert all(r["question"].strip() and gsm8k.extract_number(r["answer"]) is not None for r in got)
    assert all("####" in r["answer"] for r in got)
