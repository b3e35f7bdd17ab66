"""Flower Datasets' partitioners behind fedfuse's split, and Hugging Face ``save_to_disk``
directories as data sources (real flwr-datasets and datasets libraries)."""

from __future__ import annotations

import datasets
import numpy as np
import pytest
from PIL import Image

from fedfuse.config import DataConfig
from fedfuse.data.datasets import load_dataset
from fedfuse.data.flower import FLOWER_METHODS, FlowerParams, flower_partition
from fedfuse.data.partition import build_federation, label_skew
from fedfuse.errors import DataError

Y = np.random.default_rng(0).integers(0, 10, size=2000)


def covers(parts: list[np.ndarray], n: int) -> bool:
    joined = np.concatenate(parts)
    return len(joined) == len(np.unique(joined)) and joined.max() < n


@pytest.mark.parametrize("method", FLOWER_METHODS)
def test_each_partitioner_deals_disjoint_parts_the_same_for_a_seed(method):
    parts = flower_partition(Y, 8, method, FlowerParams(), seed=3)
    assert len(parts) == 8 and covers(parts, len(Y))
    again = flower_partition(Y, 8, method, FlowerParams(), seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    if method != "linear":  # linear's sizes and an in-order cut: other seeds, other rows
        other = flower_partition(Y, 8, method, FlowerParams(), seed=4)
        assert any(not np.array_equal(a, b) for a, b in zip(parts, other))


def test_what_each_partitioner_promises():
    pathological = flower_partition(Y, 10, "pathological",
                                    FlowerParams(classes_per_client=2), seed=1)
    assert all(len(np.unique(Y[p])) <= 2 for p in pathological)
    assert label_skew(Y, pathological) > 0.7
    linear = [len(p) for p in flower_partition(Y, 10, "linear", FlowerParams(), seed=1)]
    assert linear == sorted(linear) and linear[-1] >= 9 * linear[0]
    square = [len(p) for p in flower_partition(Y, 10, "square", FlowerParams(), seed=1)]
    assert square[-1] > 50 * square[0]
    dirichlet = flower_partition(Y, 10, "flower_dirichlet",
                                 FlowerParams(alpha=0.3, min_samples=40), seed=1)
    assert min(len(p) for p in dirichlet) >= 40 and label_skew(Y, dirichlet) > 0.3
    shard = flower_partition(Y, 10, "shard", FlowerParams(shards_per_client=2), seed=1)
    assert all(len(np.unique(Y[p])) <= 4 for p in shard)  # two label-sorted shards


def test_a_federation_takes_them_inside_fedfuse_split(caplog):
    fed = build_federation(Y, [6, 4], method="pathological", alpha=0.5, min_samples=10,
                           test_fraction=0.2, val_fraction=0.2, seed=7,
                           flower=FlowerParams(classes_per_client=3))
    assert len(fed.clients) == 10
    for c in fed.clients:
        assert len(np.unique(Y[np.concatenate([c.train, c.val])])) <= 3
    held = np.concatenate([fed.test, *[np.concatenate([c.train, c.val])
                                       for c in fed.clients]])
    assert len(held) == len(np.unique(held))  # disjoint; the test split is fedfuse's
    assert len(fed.test) == 400
    unused = len(Y) - len(held)  # classes no client of a cohort drew
    assert unused == 0 or "to no client" in caplog.text
    with pytest.raises(DataError, match="could not deal|min_samples"):  # 2^i starves one
        build_federation(Y, [8], method="exponential", alpha=0.5, min_samples=10,
                         test_fraction=0.2, val_fraction=0.2, seed=7)


def images(n: int, mode: str) -> list[Image.Image]:
    rng = np.random.default_rng(n)
    shape = (12, 10) if mode == "L" else (12, 10, 3)
    return [Image.fromarray(rng.integers(0, 255, size=shape).astype(np.uint8))
            for _ in range(n)]


def test_a_saved_image_dataset_is_a_source(tmp_path):
    labels = datasets.ClassLabel(names=["cat", "dog", "eel"])
    gray = datasets.Dataset.from_dict(
        {"img": images(30, "L"), "label": [i % 3 for i in range(30)]},
        features=datasets.Features({"img": datasets.Image(), "label": labels}))
    gray.save_to_disk(str(tmp_path / "gray"))
    data = load_dataset(DataConfig(source=str(tmp_path / "gray")))
    assert data.X.shape == (30, 1, 12, 10) and data.schema.is_image
    assert data.schema.class_labels == ("cat", "dog", "eel")
    assert np.array_equal(data.X[4, 0], np.asarray(gray[4]["img"], dtype=np.float32))
    rgb = datasets.DatasetDict({"train": datasets.Dataset.from_dict(
        {"picture": images(9, "RGB"), "kind": [0, 1, 2] * 3},
        features=datasets.Features({"picture": datasets.Image(), "kind": labels}))})
    rgb.save_to_disk(str(tmp_path / "rgb"))
    data = load_dataset(DataConfig(source=str(tmp_path / "rgb"), label_column="kind",
                                   features=["picture"]))
    assert data.X.shape == (9, 3, 12, 10)
    assert np.array_equal(data.X[2].transpose(1, 2, 0),
                          np.asarray(rgb["train"][2]["picture"], dtype=np.float32))
    with pytest.raises(DataError, match="no split 'test'"):
        load_dataset(DataConfig(source=str(tmp_path / "rgb"), label_column="kind",
                                split="test"))


def test_a_saved_tabular_dataset_and_its_refusals(tmp_path):
    table = datasets.Dataset.from_dict({"age": [30.0, 41.0, 52.0, 63.0],
                                        "dose": [1, 2, 3, 4], "note": ["a", "b", "c", "d"],
                                        "outcome": ["no", "yes", "no", "yes"]})
    table.save_to_disk(str(tmp_path / "tab"))
    data = load_dataset(DataConfig(source=str(tmp_path / "tab"), label_column="outcome",
                                   features=["age", "dose"]))
    assert data.X.tolist() == [[30, 1], [41, 2], [52, 3], [63, 4]]
    assert data.schema.feature_names == ("age", "dose")
    assert list(data.y) == [0, 1, 0, 1]
    with pytest.raises(DataError, match="column 'note' is not numeric"):
        load_dataset(DataConfig(source=str(tmp_path / "tab"), label_column="outcome"))
    with pytest.raises(DataError, match="no column 'label'"):
        load_dataset(DataConfig(source=str(tmp_path / "tab")))
    with pytest.raises(DataError, match="nothing downloads at run time"):
        load_dataset(DataConfig(source="ylecun/mnist"), base_dir=tmp_path)
