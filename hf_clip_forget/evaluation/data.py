"""Labelled image sets for zero-shot evaluation: loading them and finding their image, label and domain columns.

Any ``datasets.Dataset`` with an image column (the ``datasets.Image`` feature) and a ``ClassLabel`` label column
can be evaluated; the names of the label's ``ClassLabel`` are the class names given to the text tower. An optional
domain column (e.g. PACS' ``photo``/``art_painting``/``cartoon``/``sketch``) breaks the accuracies down per domain.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

import datasets


#: Names tried, in order, for the image and label columns when none is given.
IMAGE_COLUMN_NAMES = ("image", "img")
LABEL_COLUMN_NAMES = ("label", "labels", "fine_label")
DOMAIN_COLUMN_NAME = "domain"
#: ``domain_column`` value meaning "use a column named ``domain`` if there is one".
AUTO: Literal["auto"] = "auto"


@dataclass(frozen=True)
class LabelledColumns:
    """The columns of a labelled image set: ``image`` (a ``datasets.Image`` feature), ``label`` (a ``ClassLabel``)
    and, when present, ``domain`` (a ``ClassLabel`` or a string column)."""

    image: str
    label: str
    domain: str | None = None


def _describe_columns(dataset: datasets.Dataset) -> str:
    return ", ".join(f"{name!r} ({type(feature).__name__})" for name, feature in dataset.features.items()) or "none"


def resolve_columns(
    dataset: datasets.Dataset,
    image_column: str | None = None,
    label_column: str | None = None,
    domain_column: str | None = AUTO,
) -> LabelledColumns:
    """Find (or check) the image, label and domain columns of ``dataset``.

    Args:
        dataset: a ``datasets.Dataset``.
        image_column: the image column; by default the first of ``image``, ``img`` holding images, else the only
            column holding images.
        label_column: the label column, a ``ClassLabel``; by default the first of ``label``, ``labels``,
            ``fine_label`` that is one, else the only ``ClassLabel`` column besides the domain.
        domain_column: ``"auto"`` (a column named ``domain``, if any), a column name, or ``None`` (no domains).

    Raises:
        TypeError: when ``dataset`` is not a ``datasets.Dataset`` (e.g. a ``DatasetDict``: pick a split).
        ValueError: when a column is missing or of the wrong type; the message lists the columns there are.
    """
    if isinstance(dataset, datasets.DatasetDict):
        raise TypeError(
            f"Got a DatasetDict with splits {sorted(dataset)}; evaluate one split, e.g. "
            f"`dataset[{next(iter(dataset), 'test')!r}]`."
        )
    if not isinstance(dataset, datasets.Dataset):
        raise TypeError(
            f"Expected a `datasets.Dataset` of labelled images, got {type(dataset).__name__}. Load one with "
            "`hf_clip_forget.evaluation.load_labelled_images`."
        )
    features = dataset.features
    columns = _describe_columns(dataset)

    if image_column is not None:
        if not isinstance(features.get(image_column), datasets.Image):
            raise ValueError(
                f"`image_column={image_column!r}` is not an image column of this dataset; its columns are {columns}. "
                f"If it holds image paths or bytes, cast it first: `dataset.cast_column({image_column!r}, datasets.Image())`."
            )
    else:
        image_columns = [name for name, feature in features.items() if isinstance(feature, datasets.Image)]
        preferred = [name for name in IMAGE_COLUMN_NAMES if name in image_columns]
        if preferred:
            image_column = preferred[0]
        elif len(image_columns) == 1:
            image_column = image_columns[0]
        elif not image_columns:
            raise ValueError(
                f"The dataset has no image column (a `datasets.Image` feature); its columns are {columns}. If a column "
                "holds image paths or bytes, cast it: `dataset.cast_column('<column>', datasets.Image())`, or pass "
                "`image_column=`."
            )
        else:
            raise ValueError(
                f"The dataset has several image columns {image_columns}: pass `image_column=` to pick one."
            )

    if domain_column == AUTO:
        domain_column = DOMAIN_COLUMN_NAME if DOMAIN_COLUMN_NAME in features else None
    elif domain_column is not None:
        feature = features.get(domain_column)
        if not isinstance(feature, datasets.ClassLabel) and getattr(feature, "dtype", None) not in (
            "string",
            "large_string",
        ):
            raise ValueError(
                f"`domain_column={domain_column!r}` is not a ClassLabel or string column of this dataset; its columns "
                f"are {columns}. Pass `domain_column=None` to evaluate without domains."
            )

    if label_column is not None:
        if not isinstance(features.get(label_column), datasets.ClassLabel):
            raise ValueError(
                f"`label_column={label_column!r}` is not a ClassLabel column of this dataset; its columns are "
                f"{columns}. The class names come from the ClassLabel; to make one from a column of class-name "
                f"strings, use `dataset = dataset.class_encode_column({label_column!r})`."
            )
    else:
        label_columns = [
            name
            for name, feature in features.items()
            if isinstance(feature, datasets.ClassLabel) and name != domain_column
        ]
        preferred = [name for name in LABEL_COLUMN_NAMES if name in label_columns]
        if preferred:
            label_column = preferred[0]
        elif len(label_columns) == 1:
            label_column = label_columns[0]
        elif not label_columns:
            hint = next((name for name in LABEL_COLUMN_NAMES if name in features), None)
            fix = (
                f"To make one from a column of class-name strings, use `dataset.class_encode_column({hint!r})`; "
                f"for integer labels, cast it to `datasets.ClassLabel(names=[...])`."
                if hint
                else "Cast the label column to `datasets.ClassLabel(names=[...])` (or `dataset.class_encode_column(...)`)."
            )
            raise ValueError(
                f"The dataset has no label column of type ClassLabel (which holds the class names); its columns are "
                f"{columns}. {fix} Then pass `label_column=` if it is not named {' / '.join(LABEL_COLUMN_NAMES)}."
            )
        else:
            raise ValueError(
                f"The dataset has several ClassLabel columns {label_columns}: pass `label_column=` to pick one."
            )
    return LabelledColumns(image=image_column, label=label_column, domain=domain_column)


def check_labelled_images(
    dataset: datasets.Dataset,
    image_column: str | None = None,
    label_column: str | None = None,
    domain_column: str | None = AUTO,
) -> LabelledColumns:
    """:func:`resolve_columns`, and a ``ValueError`` if ``dataset`` has no rows."""
    columns = resolve_columns(dataset, image_column, label_column, domain_column)
    if len(dataset) == 0:
        raise ValueError(
            "The dataset is empty: there are no images to evaluate. Check the split and any filtering applied to it."
        )
    return columns


def _looks_like_path(source: str) -> bool:
    return (
        source.startswith((".", "/", "~", "\\"))
        or os.path.isabs(source)
        or source.count("/") > 1
        or source.lower().endswith((".parquet", ".arrow", ".jsonl", ".csv", ".zip", ".tar", ".tar.gz"))
    )


def _pick_split(dataset_dict: datasets.DatasetDict, split: str, source: str) -> datasets.Dataset:
    if split in dataset_dict:
        return dataset_dict[split]
    if len(dataset_dict) == 1:
        # an unsplit folder: `datasets` names its only split "train", whatever the files hold
        return next(iter(dataset_dict.values()))
    raise ValueError(f"{source!r} has no split {split!r}; it has {sorted(dataset_dict)}. Pass `split=` one of them.")


def _load_parquet(files: list[str], split: str) -> datasets.Dataset:
    import pyarrow.parquet as pq

    # `datasets` fails on rows-less files with an obscure message; say what is wrong instead
    if sum(pq.ParquetFile(file).metadata.num_rows for file in files) == 0:
        raise ValueError(f"The dataset is empty: {files} hold no rows. Give a parquet file with labelled images.")
    return datasets.load_dataset("parquet", data_files={split: files}, split=split)


def _load_local(path: str, split: str) -> datasets.Dataset:
    if os.path.isfile(path):
        if not path.lower().endswith(".parquet"):
            raise ValueError(
                f"{path!r} is not a parquet file. Give a .parquet file, a directory of parquet files, or an image "
                "folder (one subfolder of images per class)."
            )
        return _load_parquet([path], split)
    if any(os.path.isfile(os.path.join(path, name)) for name in ("state.json", "dataset_dict.json")):
        loaded = datasets.load_from_disk(path)  # written by `save_to_disk`
        return _pick_split(loaded, split, path) if isinstance(loaded, datasets.DatasetDict) else loaded
    parquet = sorted(
        os.path.join(root, name)
        for root, _, names in os.walk(path)
        for name in names
        if name.lower().endswith(".parquet")
    )
    if parquet:
        per_split = [file for file in parquet if os.path.splitext(os.path.basename(file))[0] == split]
        if per_split:  # e.g. pacs/test.parquet next to pacs/train.parquet
            return _load_parquet(per_split, split)
        return _pick_split(datasets.load_dataset("parquet", data_dir=path), split, path)
    try:
        loaded = datasets.load_dataset("imagefolder", data_dir=path)
    except FileNotFoundError as error:
        raise ValueError(
            f"{path!r} holds neither parquet files nor images. Give a .parquet file, a directory of parquet files, "
            f"or an image folder with one subfolder of images per class ({error})."
        ) from error
    return _pick_split(loaded, split, path)


def load_labelled_images(
    source: str | os.PathLike,
    split: str = "test",
    *,
    image_column: str | None = None,
    label_column: str | None = None,
    domain_column: str | None = AUTO,
) -> datasets.Dataset:
    """Load a labelled image set as a ``datasets.Dataset`` and check that it can be evaluated.

    Args:
        source: one of
            - a parquet file (e.g. ``../shared/data/pacs/test.parquet``);
            - a directory of parquet files: ``<split>.parquet`` if there is one, else the split ``datasets`` infers
              from the file names;
            - a directory written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``;
            - an image folder (the ``datasets`` ``imagefolder`` builder: the class is the name of the subfolder
              holding an image; ``train/``, ``test/``… subfolders are splits);
            - a Hub dataset id, loaded with ``datasets.load_dataset(source, split=split)``.
        split: the split to load. A folder without splits is used whole.
        image_column, label_column, domain_column: see :func:`resolve_columns`.

    Returns:
        The dataset, unchanged (use :func:`resolve_columns` for its column names); it has an image column, a
        ``ClassLabel`` label column and at least one row.

    Raises:
        ValueError: for a missing path, a source that cannot be loaded, no image column, no ``ClassLabel`` label
            column, or an empty split; each message says how to fix it.
    """
    source = os.fspath(source)
    path = os.path.expanduser(source)
    if os.path.exists(path):
        dataset = _load_local(path, split)
    elif _looks_like_path(source):
        raise ValueError(
            f"No such file or directory: {source!r}. Give an existing parquet file, directory of parquet files or "
            "image folder, or a Hub dataset id such as 'uoft-cs/cifar10'."
        )
    else:
        try:
            dataset = datasets.load_dataset(source, split=split)
        except Exception as error:  # noqa: BLE001 - every failure means the same to the user: not loadable
            raise ValueError(
                f"{source!r} is not a local file or directory, and loading it as a Hub dataset (split {split!r}) "
                f"failed: {type(error).__name__}: {str(error).rstrip('.')}. Check the path or the dataset id, the "
                "split name and your connection (or `HF_HUB_OFFLINE`)."
            ) from error
    if isinstance(dataset, datasets.IterableDataset):
        raise ValueError(f"{source!r} loaded as a streaming dataset; evaluation needs a map-style `datasets.Dataset`.")
    check_labelled_images(dataset, image_column, label_column, domain_column)
    return dataset


def first_per_cell(dataset: datasets.Dataset, per_cell: int) -> datasets.Dataset:
    """The first ``per_cell`` images of every (domain, class) cell of ``dataset`` (of every class without a
    ``domain`` column), in dataset order: a small stratified sample that is the same on every run."""
    domains = dataset["domain"] if "domain" in dataset.column_names else [None] * len(dataset)
    taken: dict[tuple, int] = {}
    indices = []
    for index, cell in enumerate(zip(domains, dataset["label"], strict=True)):
        if taken.get(cell, 0) < per_cell:
            taken[cell] = taken.get(cell, 0) + 1
            indices.append(index)
    return dataset.select(indices)
