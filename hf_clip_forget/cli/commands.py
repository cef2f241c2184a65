"""The commands that edit or check a model: ``forget``, ``verify`` and ``demo`` (``eval`` and ``sweep`` are in
:mod:`.evaluate`)."""

from __future__ import annotations

import json

import torch

from .arguments import accepting_unknown_names, names_option, refuse_unknown_names, split_names, templates_option
from .loading import (
    CommandError,
    cached_image_features,
    check_output_path,
    command_processes,
    load_adapter,
    load_dual_encoder,
    load_processor,
    model_family,
)


def command_forget(args) -> int:
    from ..api import add_forget_adapter

    command_processes("forget")
    # the image processor only for what needs one: prototypes (their input size) and a merged save (to ship it)
    model, tokenizer, image_processor = load_dual_encoder(
        args.model, image_processor=bool(args.prototypes or args.merge)
    )
    _check_forget_request(model, args)
    refuse_unknown_names(tokenizer, args)  # typos ('dgo', 'skech'), unless --allow-unknown-names
    preprocessors = _merged_preprocessors(args, model, tokenizer, image_processor) if args.merge else {}
    with accepting_unknown_names(args):
        edited = add_forget_adapter(
            model,
            names_option(args, "classes", "--classes"),
            tokenizer,
            retain_classes=names_option(args, "retain_classes", "--retain-classes"),
            alpha=args.alpha,
            method=args.method,
            ccup_lambda=args.ccup_lambda,
            ccup_mu=args.ccup_mu,
            logit_mu=args.logit_mu,
            logit_margin=args.logit_margin,
            templates=templates_option(args.templates),
            target=args.target,
            keep_shared_direction=False if args.no_keep_shared_direction else None,
            domains=names_option(args, "domains", "--domains"),
            retain_domains=names_option(args, "retain_domains", "--retain-domains"),
            paradigm=args.paradigm,
            prototypes=args.prototypes,
            prototype_options={"steps": args.prototype_steps, "seed": args.seed} if args.prototypes else None,
            image_processor=image_processor if args.prototypes else None,
            expand_neighbours=args.expand_neighbours,
        )
    audit = None
    if args.audit:
        audit = edited.audit_forgetting(tokenizer)
        print(audit)
    if args.merge:
        edited.save_merged_pretrained(args.output, audit=audit, **preprocessors)  # usable as saved: pipeline()
    else:
        edited.save_pretrained(args.output, audit=audit)
    print(f"forgot {edited.forgotten_classes} → {args.output} ({'merged model' if args.merge else 'adapter'})")
    if args.push_to_hub:
        commit = edited.push_to_hub(args.push_to_hub, merged=args.merge, audit=audit, **preprocessors)
        print(f"pushed to {args.push_to_hub}: {commit.commit_url}")
    return 0


def _check_forget_request(model, args) -> None:
    """Refuse, before any work, what the model's kind of input rules out (its family says which)."""
    family, name = model_family(model), type(model).__name__
    if args.prototypes and not family.supports_prototypes:
        raise CommandError(
            f"--prototypes synthesises whole pixel images whose embedding matches a prompt, which {name} does not "
            "take (it embeds detected boxes, audio, or images cut into patches): drop --prototypes (the edit is "
            "built from the class names' text embeddings)."
        )
    if args.merge and args.push_to_hub and family.inputs != "image":
        raise CommandError(
            f"--push-to-hub with --merge uploads an image processor with the model, and {name} takes "
            f"{family.inputs}: push the adapter (drop --merge), or save with --merge and upload the folder."
        )


def _merged_preprocessors(args, model, tokenizer, image_processor) -> dict:
    """What a merged save carries so that it works as saved: tokenizer and image processor, or, for a model whose
    other input is not an image (CLAP), the checkpoint's processor (tokenizer and feature extractor)."""
    if model_family(model).inputs != "image":
        return {"processor": load_processor(args.model)}
    return {"tokenizer": tokenizer, "image_processor": image_processor}


def command_demo(args) -> int:
    """Forget classes from the embedded default model and show what changes, on the shipped demo images."""
    from importlib import resources

    from PIL import Image

    from ..api import add_forget_adapter
    from ..core import IMAGENET_TEMPLATES, class_text_embeddings

    command_processes("demo")
    model, tokenizer, image_processor = load_dual_encoder("demo")
    folder = resources.files("hf_clip_forget").joinpath("demo_images")
    entries = json.loads(folder.joinpath("images.json").read_text())
    images = [Image.open(folder.joinpath(entry["file"])).convert("RGB") for entry in entries]
    labels = [entry["label"] for entry in entries]
    classes = sorted(set(labels))
    forget = split_names(args.classes)
    unknown = sorted(set(forget) - set(classes))
    if unknown:
        raise ValueError(f"The demo images show {classes}; {unknown} is not among them. Pick from those.")
    pixels = image_processor(images=images, return_tensors="pt")["pixel_values"]

    def predict(target) -> list[str]:
        text = class_text_embeddings(target, tokenizer, classes, IMAGENET_TEMPLATES, show_progress=False)
        output = target.get_image_features(pixel_values=pixels)
        image = torch.nn.functional.normalize(getattr(output, "pooler_output", output).float(), dim=-1)
        return [classes[i] for i in (image @ text.embeddings.float().T).argmax(dim=1).tolist()]

    before = predict(model)
    others = [c for c in classes if c not in forget]
    edited = add_forget_adapter(model, forget, tokenizer, retain_classes=others or None, show_progress=False)
    after = predict(edited)
    print("\nhf-clip-forget demo — the embedded default model (EfficientNet-Lite0 + all-MiniLM-L6-v2; not CLIP)")
    print(f"forgetting {forget} by name: a nullspace projection of visual_projection, no data, no training")
    print(f"(the direction they share with the other classes, {others}, is kept)\n")
    print(f"{'image':<14} {'true class':<10} {'before':<10} {'after':<10}")
    for entry, label, old, new in zip(entries, labels, before, after, strict=True):
        mark = "  ← forgotten" if label in forget else ""
        print(f"{entry['file']:<14} {label:<10} {old:<10} {new:<10}{mark}")

    def accuracy(predictions: list[str], keep: bool) -> float:
        pairs = [(p, t) for p, t in zip(predictions, labels, strict=True) if (t in forget) != keep]
        return 100 * sum(p == t for p, t in pairs) / max(len(pairs), 1)

    print(f"\n{'accuracy on these images':<26} {'before':>7} {'after':>7}")
    print(f"{'forgotten classes':<26} {accuracy(before, False):6.0f}% {accuracy(after, False):6.0f}%")
    print(f"{'other classes':<26} {accuracy(before, True):6.0f}% {accuracy(after, True):6.0f}%")
    if args.data:
        from ..evaluation import evaluate_edit
        from ..evaluation.reports import images_per_cell
        from .evaluate import print_report

        features = cached_image_features(model, image_processor, args.data, "test", "demo")
        print_report(
            evaluate_edit(edited, features, forget, tokenizer=tokenizer).to_dict(), None, images_per_cell(features)
        )
    print("\nImages: PACS (Li et al., ICCV 2017), see hf_clip_forget/demo_images/CREDITS.md.")
    return 0


def command_verify(args) -> int:
    """Recompute each adapter from its recorded classes on MODEL and compare with its stored factors."""
    command_processes("verify")
    if args.json:
        check_output_path(args.json, "--json")
    model, tokenizer, image_processor = load_dual_encoder(args.model)
    edited = load_adapter(model, args.adapter)
    report = edited.verify(tokenizer=tokenizer, image_processor=image_processor, tolerance=args.tolerance)
    print(report)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(report.to_dict(), handle, indent=2)
    if report.ok:
        print(
            f"verified: every adapter's stored edit equals the edit of the classes it names (max |ΔM| ≤ {args.tolerance:g})"
        )
        return 0
    print(
        "NOT VERIFIED: see the rows above (mismatch: the factors do not forget what the config and card say; "
        "invalid: the config describes no edit that can be rebuilt, so what it claims to forget is false)"
    )
    return 1
