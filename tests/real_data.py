"""Where the real labelled images are (``../shared/data``, or ``HF_CLIP_FORGET_DATA``), and stratified samples of
them for the tests that show effectiveness on real images. The data is never copied into the project."""

import os

import pytest


DATA_DIR = os.environ.get("HF_CLIP_FORGET_DATA", os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))
PACS_TEST = os.path.join(DATA_DIR, "pacs", "test.parquet")

#: Skips a test module when the PACS test split is not there.
needs_pacs = pytest.mark.skipif(not os.path.isfile(PACS_TEST), reason=f"PACS test split not found at {PACS_TEST}")


def stratified_pacs(per_cell: int):
    """The first ``per_cell`` images of every (domain, class) cell of the PACS test split, as a ``datasets.Dataset``."""
    from hf_clip_forget.evaluation import first_per_cell, load_labelled_images

    return first_per_cell(load_labelled_images(PACS_TEST, split="test"), per_cell)


def demo_model_on_pacs(per_cell: int):
    """``(model, tokenizer, features, class text embeddings)``: the demo model, the image features of
    :func:`stratified_pacs` ``(per_cell)`` and the 80-template class embeddings of its classes."""
    import torch

    from hf_clip_forget.evaluation import class_embeddings, embed_images
    from hf_clip_forget.models.demo import load_demo_model

    model, processor = load_demo_model()
    with torch.no_grad():
        features = embed_images(model, stratified_pacs(per_cell), processor.image_processor, show_progress=False)
        text = class_embeddings(model, processor.tokenizer, features.class_names, show_progress=False)
    return model, processor.tokenizer, features, text
