"""Data sets: the embedded defaults from scikit-learn and users' ``.npz`` / ``.csv`` files
(and Hugging Face ``save_to_disk`` directories: ``huggingface.py``).

Every loader returns features as float32 in their model-facing shape (``digits`` as
1x8x8 images) with labels encoded as 0..K-1, plus a :class:`DataSchema` that models,
artifacts and the predict API check inputs against. Nothing is standardised here:
the normalisation statistics are computed federatedly (see ``fedfuse.stats``).
"""

from __future__ import annotations

import csv
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedfuse.config import EMBEDDED_DATASETS, DataConfig
from fedfuse.errors import DataError


@dataclass(frozen=True)
class DataSchema:
    """What one example looks like and what the classes are called."""

    input_shape: tuple[int, ...]
    feature_names: tuple[str, ...]
    class_labels: tuple[str, ...]
    dtype: str = "float32"

    @property
    def num_classes(self) -> int:
        return len(self.class_labels)

    @property
    def num_features(self) -> int:
        return int(np.prod(self.input_shape))

    @property
    def is_image(self) -> bool:
        return len(self.input_shape) == 3

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataSchema:
        return cls(input_shape=tuple(d["input_shape"]), feature_names=tuple(d["feature_names"]),
                   class_labels=tuple(d["class_labels"]), dtype=d.get("dtype", "float32"))


@dataclass(frozen=True)
class Dataset:
    X: np.ndarray
    y: np.ndarray
    schema: DataSchema

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, idx: np.ndarray) -> Dataset:
        return Dataset(self.X[idx], self.y[idx], self.schema)


def split_transfer(data: Dataset, fraction: float,
                   seed: int) -> tuple[Dataset, np.ndarray | None]:
    """The coordinator's held-out data as (test split, transfer inputs): a seeded
    ``fraction`` of it becomes the unlabeled distillation transfer set (only its inputs
    are returned, so its labels cannot be used), the rest stays the test split."""
    if fraction <= 0.0:
        return data, None
    order = np.random.default_rng([seed, 0x7E57]).permutation(len(data))
    n = int(round(fraction * len(data)))
    if n < 2 or n > len(data) - 1:
        raise DataError(f"fusion.unlabeled_fraction = {fraction} of the coordinator's "
                        f"{len(data)} held-out examples leaves {n} for transfer and "
                        f"{len(data) - n} for testing; each needs at least 2 and 1")
    return data.subset(np.sort(order[n:])), data.X[np.sort(order[:n])]


def load_dataset(cfg: DataConfig, base_dir: Path | None = None,
                 class_labels: tuple[str, ...] | None = None) -> Dataset:
    """Load ``cfg.source``; a relative file path is taken relative to ``base_dir``.

    ``class_labels`` (a deployed site: the coordinator's classes) fixes the label
    encoding, so that a site holding only some classes still numbers them as everyone
    else does; a label outside it is refused."""
    if cfg.source in EMBEDDED_DATASETS:
        return _load_embedded(cfg.source)
    path = Path(cfg.source)
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    if path.suffix == ".npz":
        return load_npz(path, class_labels)
    if path.suffix == ".csv":
        return load_csv(path, cfg.label_column, class_labels)
    from fedfuse.data.huggingface import is_saved_dataset, load_saved_dataset

    if path.is_dir() and is_saved_dataset(path):
        return load_saved_dataset(path, cfg.label_column, cfg.features, cfg.split,
                                  class_labels)
    missing = "" if path.exists() else (
        "; it does not exist (a Hugging Face hub name is not fetched: nothing downloads "
        "at run time; save the data set with save_to_disk where there is a network and "
        "give that directory)")
    raise DataError(f"data.source {cfg.source!r}: expected 'digits', 'breast_cancer', a "
                    "path ending in .npz or .csv, or a directory saved by Hugging Face "
                    f"datasets' save_to_disk{missing}")


def _load_embedded(name: str) -> Dataset:
    from sklearn import datasets

    if name == "digits":
        bunch = datasets.load_digits()
        X = bunch.data.reshape(-1, 1, 8, 8)
        features = tuple(f"pixel_{r}_{c}" for r in range(8) for c in range(8))
        labels = tuple(str(t) for t in bunch.target_names)
    else:
        bunch = datasets.load_breast_cancer()
        X = bunch.data
        features = tuple(str(f) for f in bunch.feature_names)
        labels = tuple(str(t) for t in bunch.target_names)
    schema = DataSchema(input_shape=tuple(X.shape[1:]), feature_names=features,
                        class_labels=labels)
    return Dataset(X.astype(np.float32), bunch.target.astype(np.int64), schema)


def from_arrays(X: np.ndarray, y_raw: np.ndarray, features: tuple[str, ...],
                 where: Path, class_labels: tuple[str, ...] | None = None) -> Dataset:
    if X.ndim < 2:
        raise DataError(f"{where}: features must have shape (n, ...), got {X.shape}")
    if len(X) != len(y_raw):
        raise DataError(f"{where}: {len(X)} feature rows but {len(y_raw)} labels")
    try:
        X = X.astype(np.float32)
    except (TypeError, ValueError):
        raise DataError(f"{where}: features are not numeric") from None
    if not np.isfinite(X).all():
        bad = int((~np.isfinite(X)).any(axis=tuple(range(1, X.ndim))).sum())
        raise DataError(f"{where}: {bad} rows contain NaN or infinite values")
    if class_labels is not None:
        return Dataset(X, _encode(y_raw, class_labels, where),
                       DataSchema(input_shape=tuple(X.shape[1:]), feature_names=features,
                                  class_labels=class_labels))
    classes, y = np.unique(y_raw, return_inverse=True)
    if len(classes) < 2:
        raise DataError(f"{where}: labels have {len(classes)} distinct value(s); need >= 2")
    schema = DataSchema(input_shape=tuple(X.shape[1:]), feature_names=features,
                        class_labels=tuple(str(c) for c in classes))
    return Dataset(X, y.astype(np.int64), schema)


def _encode(y_raw: np.ndarray, class_labels: tuple[str, ...], where: Path) -> np.ndarray:
    """Labels as indices into ``class_labels`` (compared as strings)."""
    index = {label: i for i, label in enumerate(class_labels)}
    names = [str(v) for v in y_raw.tolist()]
    unknown = sorted(set(names) - set(index))
    if unknown:
        raise DataError(f"{where}: label(s) {', '.join(map(repr, unknown[:5]))} are not among "
                        f"the federation's classes ({', '.join(class_labels)})")
    return np.array([index[n] for n in names], dtype=np.int64)


def load_npz(path: Path, class_labels: tuple[str, ...] | None = None) -> Dataset:
    """An ``.npz`` file with arrays ``X`` (n, ...) and ``y`` (n,)."""
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = {"X", "y"} - set(npz.files)
            if missing:
                raise DataError(f"{path}: missing array(s) {sorted(missing)}; "
                                f"found {sorted(npz.files)}")
            X, y = npz["X"], npz["y"]
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not a readable .npz file ({exc})") from None
    n_feat = int(np.prod(X.shape[1:])) if X.ndim >= 2 else 0
    return from_arrays(X, y, tuple(f"x{i}" for i in range(n_feat)), path, class_labels)


def load_csv(path: Path, label_column: str,
             class_labels: tuple[str, ...] | None = None) -> Dataset:
    """A CSV file with a header row; ``label_column`` holds the class, the rest are numeric."""
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    with path.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    if len(rows) < 2:
        raise DataError(f"{path}: needs a header row and at least one data row")
    header = [h.strip() for h in rows[0]]
    if label_column not in header:
        raise DataError(f"{path}: label column {label_column!r} not found "
                        f"(columns: {', '.join(header)})")
    li = header.index(label_column)
    features = tuple(h for i, h in enumerate(header) if i != li)
    X_rows, y = [], []
    for lineno, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        if len(row) != len(header):
            raise DataError(f"{path}:{lineno}: {len(row)} fields, header has {len(header)}")
        try:
            X_rows.append([float(v) for i, v in enumerate(row) if i != li])
        except ValueError:
            raise DataError(f"{path}:{lineno}: a feature value is not a number") from None
        y.append(row[li].strip())
    return from_arrays(np.asarray(X_rows), np.asarray(y), features, path, class_labels)
