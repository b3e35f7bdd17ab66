"""Hugging Face ``datasets`` directories (``Dataset.save_to_disk``) as ``data.source``
(extra ``fedfuse[datasets]``).

Read from disk only: nothing downloads. The features are one image column (decoded to
(C, H, W): a grayscale image gets one channel, an RGB one three), one array column
(kept in its shape), or numeric scalar columns (one feature each), as ``data.features``
names them (default: every column but ``data.label_column``). A ``ClassLabel`` label
column gives its class names; a saved ``DatasetDict`` is read at ``data.split``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fedfuse.data.datasets import Dataset, from_arrays
from fedfuse.errors import DataError


def is_saved_dataset(path: Path) -> bool:
    """Whether ``path`` is a directory written by ``save_to_disk`` (a dataset or a
    dataset dictionary)."""
    return (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()


def load_saved_dataset(path: Path, label_column: str, features: Sequence[str], split: str,
                       class_labels: tuple[str, ...] | None = None) -> Dataset:
    """The data set saved in ``path`` (see the module docstring)."""
    try:
        import datasets
    except ImportError:
        raise DataError(f"{path}: a Hugging Face datasets directory needs the datasets "
                        "library: pip install 'fedfuse[datasets]'") from None
    datasets.disable_progress_bars()
    try:
        loaded = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError, OSError) as exc:
        raise DataError(f"{path}: not readable as a saved Hugging Face dataset ({exc})") \
            from None
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(f"{path}: no split {split!r} (splits: {', '.join(loaded)}); "
                            "set data.split")
        loaded = loaded[split]
    columns = list(loaded.column_names)
    chosen = list(features) or [c for c in columns if c != label_column]
    for column in (label_column, *chosen):
        if column not in columns:
            raise DataError(f"{path}: no column {column!r} (columns: {', '.join(columns)}); "
                            "set data.label_column / data.features")
    table = loaded.with_format("numpy")
    arrays = [np.asarray(table[c]) for c in chosen]
    for column, a in zip(chosen, arrays):
        if a.dtype == object or not (np.issubdtype(a.dtype, np.number)
                                     or a.dtype == bool):
            raise DataError(f"{path}: column {column!r} is not numeric arrays of one shape "
                            f"(got {a.dtype}); images must all have one size")
    if len(arrays) == 1 and arrays[0].ndim >= 2:
        X = arrays[0]
        if isinstance(loaded.features[chosen[0]], datasets.Image):
            X = X[:, None] if X.ndim == 3 else X.transpose(0, 3, 1, 2)  # to (C, H, W)
        names = tuple(f"x{i}" for i in range(int(np.prod(X.shape[1:]))))
    elif all(a.ndim == 1 for a in arrays):
        X, names = np.stack(arrays, axis=1), tuple(chosen)
    else:
        raise DataError(f"{path}: give one image or array column, or scalar columns, as "
                        f"data.features (got {', '.join(chosen)})")
    y = np.asarray(table[label_column])
    label = loaded.features[label_column]
    if isinstance(label, datasets.ClassLabel):
        y = np.asarray(label.names)[y]
    return from_arrays(X, y, names, path, class_labels)
