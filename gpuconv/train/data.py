"""The data of ``gpuconv train``: scikit-learn's digits and crops of its two sample photos,
split per seed into training, validation and test sets."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .models import DATASETS, GEOMETRY, _check_choice

#: What ``pip install`` brings the optional packages this module needs.
INSTALL_HINT = "pip install 'gpuconv[train]'"


#: Sample-images: tiles per photo (rows x columns) and how many go to validation and test.
TILE_GRID = (4, 5)


VAL_TILES, TEST_TILES = 3, 4


#: Crops per photo: (train, validation, test); ``--quick`` uses fewer training crops.
CROPS = (1500, 250, 500)


QUICK_CROPS = (400, 150, 300)


#: Digits: test fraction of the whole set, validation fraction of the rest.
DIGITS_TEST, DIGITS_VAL = 0.25, 0.15


@dataclass
class Data:
    """Float32 arrays ``(N, C, H, W)`` and int64 labels for train, validation and test."""

    dataset: str
    x: dict = field(default_factory=dict)
    y: dict = field(default_factory=dict)

    def sizes(self):
        return {part: int(len(labels)) for part, labels in self.y.items()}


def _need(module, what):
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"gpuconv train needs {what} ({exc}); install it with: "
                          f"{INSTALL_HINT}") from exc


def _digits(seed):
    datasets = _need("sklearn.datasets", "scikit-learn")
    model_selection = _need("sklearn.model_selection", "scikit-learn")
    digits = datasets.load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]  # (N, 1, 8, 8) in [0, 1]
    y = digits.target.astype(np.int64)
    index = np.arange(len(y))
    rest, test = model_selection.train_test_split(index, test_size=DIGITS_TEST, stratify=y,
                                                  random_state=seed)
    train, val = model_selection.train_test_split(rest, test_size=DIGITS_VAL,
                                                  stratify=y[rest], random_state=seed)
    data = Data("digits")
    for part, rows in (("train", train), ("val", val), ("test", test)):
        data.x[part], data.y[part] = x[rows], y[rows]
    return data


def _tiles(shape, grid):
    """``(top, bottom, left, right)`` of each tile of a ``grid`` over an image of ``shape``."""
    rows = np.linspace(0, shape[0], grid[0] + 1).astype(int)
    cols = np.linspace(0, shape[1], grid[1] + 1).astype(int)
    return [(rows[i], rows[i + 1], cols[j], cols[j + 1])
            for i in range(grid[0]) for j in range(grid[1])]


def _sample_images(seed, quick, size):
    datasets = _need("sklearn.datasets", "scikit-learn")
    _need("PIL", "Pillow (scikit-learn reads the sample photos with it)")
    photos = [np.asarray(image, dtype=np.float32) / 255.0
              for image in datasets.load_sample_images().images]
    rng = np.random.default_rng(seed)
    counts = dict(zip(("train", "val", "test"), QUICK_CROPS if quick else CROPS))
    crops = {part: [] for part in counts}
    labels = {part: [] for part in counts}
    for label, photo in enumerate(photos):
        tiles = _tiles(photo.shape, TILE_GRID)
        order = rng.permutation(len(tiles))
        parts = {"test": order[:TEST_TILES], "val": order[TEST_TILES:TEST_TILES + VAL_TILES],
                 "train": order[TEST_TILES + VAL_TILES:]}
        for part, tile_ids in parts.items():
            chosen = rng.choice(tile_ids, size=counts[part])
            for tile_id in chosen:
                top, bottom, left, right = tiles[tile_id]
                i = rng.integers(top, bottom - size + 1)
                j = rng.integers(left, right - size + 1)
                crops[part].append(photo[i:i + size, j:j + size].transpose(2, 0, 1))
                labels[part].append(label)
    data = Data("sample-images")
    for part in counts:
        data.x[part] = np.stack(crops[part]).astype(np.float32)
        data.y[part] = np.asarray(labels[part], dtype=np.int64)
    # Standardise each channel with the training crops' statistics.
    mean = data.x["train"].mean(axis=(0, 2, 3), keepdims=True)
    std = data.x["train"].std(axis=(0, 2, 3), keepdims=True)
    for part in counts:
        data.x[part] = ((data.x[part] - mean) / std).astype(np.float32)
    return data


def load_data(dataset, seed=0, quick=False):
    """The ``dataset``'s train / validation / test split for ``seed`` (a :class:`Data`).

    The split depends on ``seed`` only (and, for ``sample-images``, on ``quick``, which
    takes fewer crops): the same seed gives the same arrays.
    """
    _check_choice(dataset, DATASETS, "dataset")
    if dataset == "digits":
        return _digits(seed)
    return _sample_images(seed, quick, GEOMETRY["sample-images"][0][1])
