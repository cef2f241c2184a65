"""On real images (the demo model, one PACS test image per (domain, class) cell): image embeddings stored from the
unedited model and edited with ``edit_embeddings`` are the merged model's embeddings of the same images — raw and
L2-normalised, float32 and float16, for a stack of a global and a domain-specific adapter."""

import torch

from hf_clip_forget import add_forget_adapter
from hf_clip_forget.core import image_side_embeddings
from hf_clip_forget.index import edit_embeddings

from .real_data import needs_pacs, stratified_pacs


pytestmark = needs_pacs


def image_embeddings(model, pixel_values) -> torch.Tensor:
    with torch.no_grad():
        return image_side_embeddings(model, pixel_values=pixel_values)


def test_stored_pacs_embeddings_edited_equal_the_merged_models():
    from hf_clip_forget.models.demo import load_demo_model

    model, processor = load_demo_model()
    images = stratified_pacs(1)  # 28 images: every class in every domain
    pixels = processor.image_processor(list(images["image"]), return_tensors="pt")["pixel_values"]
    stored = image_embeddings(model, pixels)
    classes = images.features["label"].names
    others = [c for c in classes if c != "dog"]
    edited = add_forget_adapter(model, ["dog"], processor.tokenizer, retain_classes=others, show_progress=False)
    edited = add_forget_adapter(edited, ["horse"], processor.tokenizer, retain_classes=[c for c in classes if c != "horse"],
                                domains=["sketch"], retain_domains=["art_painting", "cartoon", "photo"],
                                adapter_name="sketch_horse", show_progress=False)  # fmt: skip
    edited.base_model.set_adapter(["default", "sketch_horse"])
    try:
        edited.merge_adapter()
        merged = image_embeddings(edited, pixels)
        from_index = edit_embeddings(edited, stored, side="image")
        normalised = edit_embeddings(edited, torch.nn.functional.normalize(stored, dim=-1).half())
    finally:
        edited.unload()
    cosine = torch.nn.functional.cosine_similarity(from_index.double(), merged.double(), dim=-1)
    assert cosine.min() >= 1 - 1e-6  # float32: the guarantee
    # the merged weight rounds M W once more than the stored path: float32, relative ~1e-6 of the embedding
    assert ((from_index - merged).norm(dim=-1) / merged.norm(dim=-1)).max() <= 1e-5
    moved = torch.nn.functional.cosine_similarity(stored.double(), merged.double(), dim=-1)
    assert moved.min() < 0.99  # the edit changed what is stored: equality is not the identity passing
    # float16, unit rows: one rounding of the stored rows and one of the result (relative 2⁻¹¹ each)
    half = torch.nn.functional.cosine_similarity(normalised.double(), merged.double(), dim=-1)
    assert normalised.dtype == torch.float16 and half.min() >= 1 - 2e-3
    assert (normalised.double().norm(dim=-1) - 1).abs().max() <= 2e-3
