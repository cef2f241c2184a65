"""The model's preprocessors: the tokenizer and image processor saved with its checkpoint, loaded when the user
passes none, and what prototypes need of the image processor."""

from __future__ import annotations

from typing import Any


def resolve_tokenizer(model, tokenizer):
    """``tokenizer`` if given (checked to be a tokenizer), else the one saved with ``model``'s checkpoint."""
    if tokenizer is not None:
        if not callable(tokenizer) or not hasattr(tokenizer, "__len__"):
            raise TypeError(f"`tokenizer` must be a transformers tokenizer, got {type(tokenizer).__name__}.")
        return tokenizer
    from transformers import AutoTokenizer

    return load_from_model_checkpoint(model, AutoTokenizer, "tokenizer")


def resolve_image_processor(model, image_processor):
    """``image_processor`` if given (checked), else the one saved with ``model``'s checkpoint."""
    if image_processor is not None:
        if not callable(image_processor) or not hasattr(image_processor, "image_mean"):
            raise TypeError(
                f"`image_processor` must be a transformers image processor, got {type(image_processor).__name__}."
            )
        return image_processor
    from transformers import AutoImageProcessor

    return load_from_model_checkpoint(model, AutoImageProcessor, "image_processor")


def load_from_model_checkpoint(model, auto_class, argument: str):
    """``auto_class.from_pretrained`` of the checkpoint ``model`` was loaded from (its tokenizer, image processor…),
    with an error that says to pass ``argument=`` when there is no checkpoint or loading fails."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    source = getattr(base, "name_or_path", None)
    what = argument.replace("_", " ")
    if not source:
        raise ValueError(
            f"Pass `{argument}=` (e.g. `{auto_class.__name__}.from_pretrained(<model id>)`): the model was not loaded "
            f"from a checkpoint, so its {what} cannot be found."
        )
    try:
        return auto_class.from_pretrained(source)
    except Exception as error:  # noqa: BLE001 - any failure means the same thing to the user
        raise ValueError(
            f"Could not load the {what} of {source!r} ({error}). Pass `{argument}=` explicitly."
        ) from error


def prototype_geometry(image_processor) -> dict[str, Any]:
    """Input size and normalisation of the model's images, from its image processor."""
    size = None
    for attribute in ("crop_size", "size"):
        value = getattr(image_processor, attribute, None)
        value = dict(value) if value is not None and not isinstance(value, int) else value
        if isinstance(value, int):
            size = value
        elif value:
            size = value.get("height") or value.get("shortest_edge")
        if size:
            break
    if not size:
        raise ValueError("Could not read the input size from `image_processor` (crop_size/size); pass another one.")
    return {"image_size": int(size), "image_mean": list(image_processor.image_mean),
            "image_std": list(image_processor.image_std)}  # fmt: skip
