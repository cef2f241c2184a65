"""Prompt templates that turn a class name into sentences for the text tower.

Every template is a format string with exactly one ``{}`` (the class name). Three kinds of template sets are
accepted wherever templates are: the name of a built-in set (``"single"`` or ``"imagenet"``), one template
string, or a list of template strings.
"""

from __future__ import annotations

from collections.abc import Sequence


SINGLE_TEMPLATE: tuple[str, ...] = ("a photo of a {}.",)

# The 80 prompts of the ImageNet zero-shot ensemble published with CLIP (Radford et al., 2021).
IMAGENET_TEMPLATES: tuple[str, ...] = (
    "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.", "a photo of the hard to see {}.",
    "a low resolution photo of the {}.", "a rendering of a {}.", "graffiti of a {}.", "a bad photo of the {}.",
    "a cropped photo of the {}.", "a tattoo of a {}.", "the embroidered {}.", "a photo of a hard to see {}.",
    "a bright photo of a {}.", "a photo of a clean {}.", "a photo of a dirty {}.", "a dark photo of the {}.",
    "a drawing of a {}.", "a photo of my {}.", "the plastic {}.", "a photo of the cool {}.",
    "a close-up photo of a {}.", "a black and white photo of the {}.", "a painting of the {}.",
    "a painting of a {}.", "a pixelated photo of the {}.", "a sculpture of the {}.", "a bright photo of the {}.",
    "a cropped photo of a {}.", "a plastic {}.", "a photo of the dirty {}.", "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.", "a photo of the {}.", "a good photo of the {}.", "a rendering of the {}.",
    "a {} in a video game.", "a photo of one {}.", "a doodle of a {}.", "a close-up photo of the {}.",
    "a photo of a {}.", "the origami {}.", "the {} in a video game.", "a sketch of a {}.", "a doodle of the {}.",
    "a origami {}.", "a low resolution photo of a {}.", "the toy {}.", "a rendition of the {}.",
    "a photo of the clean {}.", "a photo of a large {}.", "a rendition of a {}.", "a photo of a nice {}.",
    "a photo of a weird {}.", "a blurry photo of a {}.", "a cartoon {}.", "art of a {}.", "a sketch of the {}.",
    "a embroidered {}.", "a pixelated photo of a {}.", "itap of the {}.", "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.", "a plushie {}.", "a photo of the nice {}.", "a photo of the small {}.",
    "a photo of the weird {}.", "the cartoon {}.", "art of the {}.", "a drawing of the {}.",
    "a photo of the large {}.", "a black and white photo of a {}.", "the plushie {}.", "a dark photo of a {}.",
    "itap of a {}.", "graffiti of the {}.", "a toy {}.", "itap of my {}.", "a photo of a cool {}.",
    "a photo of a small {}.", "a tattoo of the {}.",
)  # fmt: skip

# The 7 of the 80 that CLIP's authors selected for ImageNet (sequential forward selection; CLIP repository,
# notebooks/Prompt_Engineering_for_ImageNet.ipynb): most of the ensemble's gain for under a tenth of its prompts.
IMAGENET_SELECTED_TEMPLATES: tuple[str, ...] = (
    "itap of a {}.", "a bad photo of the {}.", "a origami {}.", "a photo of the large {}.", "a {} in a video game.",
    "art of the {}.", "a photo of the small {}.",
)  # fmt: skip

# The 18 prompts CLIP's authors published for CIFAR-10 and CIFAR-100 (CLIP repository, data/prompts.md).
CIFAR_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.", "a blurry photo of a {}.", "a black and white photo of a {}.", "a low contrast photo of a {}.",
    "a high contrast photo of a {}.", "a bad photo of a {}.", "a good photo of a {}.", "a photo of a small {}.",
    "a photo of a big {}.", "a photo of the {}.", "a blurry photo of the {}.", "a black and white photo of the {}.",
    "a low contrast photo of the {}.", "a high contrast photo of the {}.", "a bad photo of the {}.",
    "a good photo of the {}.", "a photo of the small {}.", "a photo of the big {}.",
)  # fmt: skip

# Prompts for audio–text models (CLAP): how captions of sound clips name their source.
SOUND_TEMPLATES: tuple[str, ...] = (
    "the sound of a {}.", "the sound of the {}.", "a sound of a {}.", "a recording of a {}.", "audio of a {}.",
    "a {} can be heard.", "the noise of a {}.", "this is the sound of a {}.",
)  # fmt: skip

# Paraphrases that appear in none of the sets above: the audit asks whether a forgotten class comes back under prompts
# that were never used to build an edit (tests check the sets are disjoint).
HELD_OUT_TEMPLATES: tuple[str, ...] = (
    "an image showing a {}.", "a snapshot of a {}.", "there is a {} in this picture.", "a {} is shown here.",
    "a shot of a {}.", "this image contains a {}.", "an example of a {}.", "a depiction of a {}.",
    "a {} seen up close.", "a candid picture of a {}.", "a {} in the scene.", "look at this {}.",
    "a quick snap of a {}.", "a portrait of a {}.", "a still image of a {}.", "a typical {}.",
    "an everyday {}.", "a {} in the middle of the frame.", "a detailed view of a {}.", "a {} photographed outdoors.",
)  # fmt: skip

TEMPLATE_SETS: dict[str, tuple[str, ...]] = {
    "single": SINGLE_TEMPLATE,
    "imagenet_selected": IMAGENET_SELECTED_TEMPLATES,
    "cifar": CIFAR_TEMPLATES,
    "imagenet": IMAGENET_TEMPLATES,
    "sound": SOUND_TEMPLATES,
    "held_out": HELD_OUT_TEMPLATES,
}

# Domain-conditioned templates ("a sketch of a {}."): how a caption names an image domain. PACS's four domains are
# built in (the demo model was trained with these captions); any other domain gets `generic_domain_templates`.
PHOTO_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.", "a photo of the {}.", "a good photo of a {}.", "a close-up photo of a {}.",
    "a bright photo of a {}.", "a blurry photo of a {}.", "a cropped photo of the {}.", "a low resolution photo of a {}.",
    "a photo of a small {}.", "a photo of a large {}.", "an image of a {}.", "a picture of a {}.", "a {}.",
    "itap of a {}.", "a photo of my {}.", "a jpeg corrupted photo of a {}.",
)  # fmt: skip
DOMAIN_TEMPLATES: dict[str, tuple[str, ...]] = {
    "photo": PHOTO_TEMPLATES,
    "art_painting": ("a painting of a {}.", "an oil painting of a {}.", "art of a {}.", "a painting of the {}.",
                     "a watercolor painting of a {}.", "a rendition of a {}.", "an artwork showing a {}."),
    "cartoon": ("a cartoon of a {}.", "a cartoon {}.", "a drawing of a cartoon {}.", "the cartoon {}.",
                "a clip art of a {}.", "an illustration of a cartoon {}.", "a comic drawing of a {}."),
    "sketch": ("a sketch of a {}.", "a pencil sketch of a {}.", "a black and white sketch of the {}.",
               "a line drawing of a {}.", "a doodle of a {}.", "a drawing of a {}.", "a sketch of the {}."),
}  # fmt: skip


def generic_domain_templates(domain: str) -> tuple[str, ...]:
    """Templates for a domain without built-in ones: ``"a {domain} of a {}."`` and two variants."""
    words = domain.replace("_", " ").strip()
    if not words or "{" in words or "}" in words:
        raise ValueError(f"Domain names must be non-blank text without braces, got {domain!r}.")
    return (f"a {words} of a {{}}.", f"a {words} of the {{}}.", f"a {words} image of a {{}}.")


def domain_templates(domain: str, overrides: dict[str, Sequence[str]] | None = None) -> list[str]:
    """The templates that condition a prompt on ``domain``: ``overrides[domain]``, the built-in ones, or generic."""
    if overrides and domain in overrides:
        return resolve_templates(list(overrides[domain]))
    return list(DOMAIN_TEMPLATES.get(domain) or generic_domain_templates(domain))


def resolve_templates(templates: str | Sequence[str] | None) -> list[str]:
    """Return the template list for ``templates`` and check that each has exactly one ``{}``.

    Args:
        templates: ``None`` (the 80-template ``"imagenet"`` ensemble), the name of a built-in set
            (``"single"``, ``"imagenet"``), one template string, or a sequence of template strings.

    Raises:
        ValueError: for an unknown set name, an empty list, a duplicate, or a template without exactly one ``{}``.
        TypeError: for a template that is not a string.
    """
    if templates is None:
        return list(IMAGENET_TEMPLATES)
    if isinstance(templates, str):
        if templates in TEMPLATE_SETS:
            return list(TEMPLATE_SETS[templates])
        if "{}" not in templates:
            raise ValueError(
                f"Unknown template set {templates!r}. Pass one of {sorted(TEMPLATE_SETS)} or a format string "
                "with one '{}' for the class name, e.g. 'a photo of a {}.'."
            )
        templates = [templates]
    templates = list(templates)
    if not templates:
        raise ValueError("`templates` is empty. Pass at least one format string such as 'a photo of a {}.'.")
    for template in templates:
        if not isinstance(template, str):
            raise TypeError(f"Templates must be strings, got {template!r} of type {type(template).__name__}.")
        if template.count("{}") != 1 or template.replace("{}", "").count("{") or template.replace("{}", "").count("}"):
            raise ValueError(
                f"Template {template!r} must contain exactly one '{{}}' (where the class name goes) and no other braces."
            )
    if len(set(templates)) != len(templates):
        raise ValueError(f"`templates` contains duplicates: {templates!r}.")
    return templates


def describe_templates(templates: Sequence[str]) -> str:
    """A template list in words: its set's name and size (``"imagenet (80 templates)"``), the one template, or
    ``"5 custom templates"``."""
    templates = tuple(templates)
    for name, members in TEMPLATE_SETS.items():
        if templates == members:
            return f'"{templates[0]}"' if len(templates) == 1 else f"{name} ({len(templates)} templates)"
    return f'"{templates[0]}"' if len(templates) == 1 else f"{len(templates)} custom templates"


def fill_templates(class_name: str, templates: Sequence[str]) -> list[str]:
    """The prompts for one class: every template formatted with ``class_name``."""
    return [template.format(class_name) for template in templates]
