"""``fedfuse simulate`` on a Hugging Face ``save_to_disk`` directory, partitioned by a
Flower Datasets partitioner: the real libraries, a real simulation."""

from __future__ import annotations

import json

import datasets
import numpy as np
import pytest
from PIL import Image

from fedfuse.config import DataConfig
from fedfuse.data.datasets import load_dataset
from tests.helpers import SMALL_SCENARIO, run_cli

pytestmark = pytest.mark.slow


def test_simulate_a_saved_dataset_with_a_pathological_partition(tmp_path):
    digits = load_dataset(DataConfig())
    pictures = [Image.fromarray((x[0] * 15).astype(np.uint8)) for x in digits.X]
    saved = datasets.Dataset.from_dict(
        {"image": pictures, "digit": digits.y.tolist()},
        features=datasets.Features({"image": datasets.Image(),
                                    "digit": datasets.ClassLabel(names=[str(i) for i in
                                                                        range(10)])}))
    saved.save_to_disk(str(tmp_path / "digits-hf"))
    scenario = tmp_path / "tiny.toml"
    source = f'source = "{tmp_path / "digits-hf"}"\nlabel_column = "digit"'
    scenario.write_text(SMALL_SCENARIO.replace('source = "digits"', source)
                        .replace('method = "dirichlet"', 'method = "pathological"\n'
                                 'classes_per_client = 4'))
    proc = run_cli("simulate", scenario, "--out", tmp_path / "run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["partition"]["method"] == "pathological"
    assert summary["partition"]["label_skew"] > 0.4  # four classes of ten per client
    assert summary["fused"]["test_accuracy"] > 0.5
    clients = json.loads((tmp_path / "run" / "clients.json").read_text())
    assert len(clients) == 9
