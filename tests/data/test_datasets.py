import numpy as np
import pytest

from fedfuse.config import DataConfig
from fedfuse.data.datasets import load_dataset
from fedfuse.errors import DataError


@pytest.mark.parametrize("source, shape, classes", [("digits", (1, 8, 8), 10),
                                                    ("breast_cancer", (30,), 2)])
def test_embedded_data_sets(source, shape, classes):
    ds = load_dataset(DataConfig(source=source))
    assert ds.X.dtype == np.float32 and ds.X.shape[1:] == shape
    assert ds.schema.num_classes == classes and set(np.unique(ds.y)) == set(range(classes))


def test_csv_and_npz_files(tmp_path):
    csv = tmp_path / "d.csv"
    csv.write_text("a,b,diagnosis\n1,2,yes\n3,4,no\n5,6,yes\n")
    ds = load_dataset(DataConfig(source=str(csv), label_column="diagnosis"))
    assert ds.X.shape == (3, 2) and list(ds.y) == [1, 0, 1]
    assert ds.schema.feature_names == ("a", "b") and ds.schema.class_labels == ("no", "yes")
    with pytest.raises(DataError, match="label column 'label' not found"):
        load_dataset(DataConfig(source=str(csv)))
    npz = tmp_path / "d.npz"
    np.savez(npz, X=np.ones((4, 3)), y=np.array([0, 1, 0, 1]))
    assert load_dataset(DataConfig(source=str(npz))).X.shape == (4, 3)
    np.savez(npz, X=np.ones((4, 3)), labels=np.array([0, 1, 0, 1]))
    with pytest.raises(DataError, match=r"missing array\(s\) \['y'\]"):
        load_dataset(DataConfig(source=str(npz)))
    with pytest.raises(DataError, match="data file not found"):
        load_dataset(DataConfig(source=str(tmp_path / "none.csv")))
    bad = tmp_path / "bad.csv"
    bad.write_text("a,label\nx,1\n")
    with pytest.raises(DataError, match="bad.csv:2: a feature value is not a number"):
        load_dataset(DataConfig(source=str(bad)))
    with pytest.raises(DataError, match="expected 'digits'"):
        load_dataset(DataConfig(source="data.parquet"))
