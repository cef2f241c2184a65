"""The ``detect`` command: boxes per text query before and after a forget edit of an open-vocabulary detector."""

from __future__ import annotations

import dataclasses
import os

from .arguments import split_names, write_json
from .loading import (
    CommandError,
    check_output_path,
    command_processes,
    load_adapter,
    load_dual_encoder,
    load_processor,
    one_line,
)


#: File endings read as images from a folder given to ``--images``.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def image_paths(values: list[str]) -> list[str]:
    """The image files of ``--images``: files as given, and each folder's images in name order."""
    paths = []
    for value in values:
        path = os.path.expanduser(value)
        if os.path.isdir(path):
            found = sorted(
                os.path.join(path, name)
                for name in os.listdir(path)
                if name.lower().endswith(IMAGE_SUFFIXES) and os.path.isfile(os.path.join(path, name))
            )
            if not found:
                raise CommandError(
                    f"--images {value!r} is a folder with no image files ({', '.join(IMAGE_SUFFIXES)})."
                )
            paths.extend(found)
        elif os.path.isfile(path):
            paths.append(path)
        else:
            raise CommandError(f"--images {value!r} does not exist. Give image files or folders of images.")
    return paths


def load_images(paths: list[str]) -> list:
    """The images at ``paths`` as RGB PIL images; an unreadable file is named."""
    from PIL import Image

    images = []
    for path in paths:
        try:
            with Image.open(path) as image:
                images.append(image.convert("RGB"))
        except OSError as error:  # PIL's UnidentifiedImageError is one
            raise CommandError(f"--images: cannot read {path!r} as an image ({one_line(error)}).") from error
    return images


def _columns(args) -> tuple[str, str]:
    if args.adapter and args.reference:
        raise CommandError(
            "give --adapter (an adapter to evaluate on MODEL) or --reference (the original of a merged MODEL), "
            "not both."
        )
    if args.adapter:
        return f"{args.model} (adapter bypassed)", f"{args.model} + adapter {args.adapter}"
    if args.reference:
        return args.reference, args.model
    raise CommandError(
        "give --adapter DIR (the 'before' column is MODEL with it bypassed) or --reference BASE (the original of a "
        "merged MODEL)."
    )


def command_detect(args) -> int:
    """Count the boxes the detector's own post-processing labels with each query, before and after the edit."""
    from ..evaluation import detector_family, evaluate_detection

    check_output_path(args.json, "--json")
    before_name, after_name = _columns(args)
    queries = split_names(args.queries)
    if not queries:
        raise CommandError("--queries is empty: give the text queries, comma-separated.")
    command_processes("detect")
    paths = image_paths(args.images)
    model, _, _ = load_dual_encoder(args.model, image_processor=False)
    detector_family(model)  # refuses any other model, naming the detector classes
    processor = load_processor(args.model)
    reference = None
    if args.reference:
        reference, _, _ = load_dual_encoder(args.reference, image_processor=False)
        detector_family(reference)
    else:
        model = load_adapter(model, args.adapter)
    report = evaluate_detection(
        model,
        processor,
        load_images(paths),
        queries,
        threshold=args.threshold,
        reference=reference,
        image_names=paths,
        batch_size=args.batch_size,
    )
    report = dataclasses.replace(report, before=before_name, after=after_name)
    print(report)
    write_json(args.json, report.to_dict())
    return 0
