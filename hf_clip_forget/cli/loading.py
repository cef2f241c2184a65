"""Loading what the command line names — models, adapters, data, cached features — with one-line errors.

A failure the user can fix becomes a :class:`CommandError` naming the file or repo and the fix.
"""

from __future__ import annotations

import contextlib
import contextvars
import os

from ..families import SUPPORTED_MODEL_CLASSES, DualEncoderFamily, family_of_class, find_family


#: Commands whose work is shared across launched processes.
MULTI_PROCESS_COMMANDS = ("eval", "sweep")


class CommandError(Exception):
    """A failure the user can fix; ``main`` prints it as one ``error:`` line."""


def one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~", "\\")) or os.path.isabs(name) or name.count("/") > 1


def _corrupt_safetensors(directory: str) -> list[str]:
    """The ``.safetensors`` files under ``directory`` (and its direct subfolders) whose header cannot be read."""
    from safetensors import SafetensorError, safe_open

    corrupt = []
    for root, folders, names in os.walk(directory):
        for name in sorted(n for n in names if n.endswith(".safetensors")):
            try:
                with safe_open(os.path.join(root, name), framework="pt"):
                    pass
            except (SafetensorError, OSError):
                corrupt.append(os.path.join(root, name))
        if root != directory:
            folders.clear()
    return corrupt


def _source_error(what: str, source: str, error: BaseException) -> str:
    """One line saying why ``what`` could not be loaded from ``source`` and what to do."""
    from huggingface_hub import constants
    from safetensors import SafetensorError

    local = os.path.expanduser(source)
    if isinstance(error, SafetensorError):
        if os.path.isdir(local):
            files = _corrupt_safetensors(local) or [f"a .safetensors file in {source}"]
            return (
                f"{what} {source!r}: {', '.join(files)} is corrupt or truncated ({one_line(error)}). Save or copy it "
                "again."
            )
        return (
            f"{what} {source!r}: a .safetensors file of it in the Hub cache ({constants.HF_HUB_CACHE}) is corrupt or "
            f"truncated ({one_line(error)}). Delete the repo's folder there and download it again."
        )
    message = one_line(error)
    named = any(name in message for name in (source, local, os.path.realpath(local)))
    if not os.path.exists(local) and constants.is_offline_mode():
        return (
            f"{what} {source!r} is not a local path and is not in the Hub cache, and offline mode is on "
            "(HF_HUB_OFFLINE=1). Download it once online, or give a local directory."
        )
    if named and not isinstance(error, OSError):
        return message  # our own loaders' errors name the source and say what to do
    if os.path.exists(local):
        return message if named else f"cannot load {what} from {source!r}: {message}"
    reason = (str(error).strip().splitlines() or [type(error).__name__])[0].rstrip(".")
    return (
        f"cannot load {what} {source!r} from the Hub ({constants.ENDPOINT}): {reason}. Check the id (and "
        "`hf auth login` for a private repo) and your connection, or give a local directory."
    )


@contextlib.contextmanager
def _loading(what: str, source: str, check_path: bool = True):
    """Turn the errors of loading ``what`` from ``source`` (a path or Hub id) into one :class:`CommandError`;
    with ``check_path``, refuse first a ``source`` that is spelled as a path but does not exist."""
    from safetensors import SafetensorError

    if check_path and not os.path.exists(os.path.expanduser(source)) and _looks_like_path(source):
        raise CommandError(f"{what} {source!r} does not exist. Give an existing local path or a Hub repo id.")
    try:
        yield
    except (OSError, ValueError, SafetensorError) as error:
        raise CommandError(_source_error(what, source, error)) from error


def _model_class(name_or_path: str):
    """The class to load MODEL as: the supported class its config's ``architectures`` names, else ``AutoModel``.

    ``AutoModel`` maps a config type to its bare model, so a detector checkpoint (``OwlViTForObjectDetection``)
    would load as ``OwlViTModel`` without its detection heads, and an edit of that would not reach the detector.
    """
    import transformers
    from transformers import AutoConfig, AutoModel

    with _loading("model", name_or_path):
        config = AutoConfig.from_pretrained(name_or_path)
    for name in getattr(config, "architectures", None) or ():
        if family_of_class(name) is not None and hasattr(transformers, name):
            return getattr(transformers, name)
    return AutoModel


def load_dual_encoder(name_or_path: str, image_processor: bool = True):
    """``(model, tokenizer, image_processor)`` for MODEL; a clear error if it is not a dual encoder.

    The image processor is loaded only when asked for and the model takes images (``None`` otherwise: an audio
    model has a feature extractor instead, which :func:`load_processor` gives).
    """
    from .. import models  # noqa: F401  (registers the demo towers' model types before from_pretrained)

    if name_or_path == "demo":
        from ..models.demo import load_demo_model

        model, processor = load_demo_model()
        return model, processor.tokenizer, processor.image_processor if image_processor else None
    from transformers import AutoImageProcessor, AutoTokenizer

    model_class = _model_class(name_or_path)
    with _loading("model", name_or_path):
        model = model_class.from_pretrained(name_or_path).eval()
    family = find_family(model)
    if family is None:
        raise CommandError(
            f"{name_or_path!r} loads as {type(model).__name__}, which forget adapters do not support. Supported: "
            f"{', '.join(SUPPORTED_MODEL_CLASSES)} checkpoints, or `demo`."
        )
    with _loading("tokenizer", name_or_path):
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    if not image_processor or family.inputs != "image":
        return model, tokenizer, None
    with _loading("image processor", name_or_path):
        return model, tokenizer, AutoImageProcessor.from_pretrained(name_or_path)


def load_processor(name_or_path: str):
    """MODEL's own processor (``AutoProcessor``): a detector's, which post-processes boxes, or CLAP's."""
    from transformers import AutoProcessor

    with _loading("processor", name_or_path):
        return AutoProcessor.from_pretrained(name_or_path)


def model_family(model) -> DualEncoderFamily:
    """The family of a model :func:`load_dual_encoder` returned (or of a peft wrapper of it)."""
    family = find_family(model)
    if family is None:  # load_dual_encoder refuses these: a bug if reached
        raise RuntimeError(f"{type(model).__name__} has no family.")
    return family


def require_image_classifier(model, command: str) -> None:
    """Refuse ``eval``/``sweep`` (the zero-shot image-classification harness) on audio models and detectors."""
    family = model_family(model)
    name = type(model.get_base_model() if hasattr(model, "get_base_model") else model).__name__
    if family.detector:
        raise CommandError(
            f"`{command}` measures zero-shot image classification, and {name} is an open-vocabulary detector: count "
            "its boxes per query before/after with `hf-clip-forget detect MODEL --adapter DIR --images ... "
            "--queries ...`."
        )
    if family.inputs != "image":
        raise CommandError(
            f"`{command}` measures zero-shot image classification, and {name} embeds {family.inputs}, not images: "
            f"build its adapter with `hf-clip-forget forget` and check it in Python (docs/families.md)."
        )


#: Set by the global ``--trust-unverified`` for the command that runs (see :func:`trusting_unverified_adapters`).
_TRUST_UNVERIFIED: contextvars.ContextVar[bool] = contextvars.ContextVar("trust_unverified", default=False)


@contextlib.contextmanager
def trusting_unverified_adapters(trust: bool = True):
    """Within this context, :func:`load_adapter` passes ``trust_unverified=trust`` to the loader."""
    token = _TRUST_UNVERIFIED.set(bool(trust))
    try:
        yield
    finally:
        _TRUST_UNVERIFIED.reset(token)


def load_adapter(model, adapter: str):
    """``model`` with the forget adapter(s) saved at ``adapter`` (a directory or Hub id) loaded and active."""
    from ..api import ForgetPeftModel

    local = os.path.expanduser(adapter)
    if os.path.isdir(local) and not any(
        os.path.isfile(os.path.join(folder, "adapter_config.json"))
        for folder in [local] + [os.path.join(local, name) for name in os.listdir(local)]
    ):
        merged = os.path.isfile(os.path.join(local, "config.json"))
        raise CommandError(
            f"{adapter!r} holds no adapter_config.json, so it is not a saved forget adapter"
            + (
                " (it is a full model: evaluate it as MODEL, with --reference BASE for the 'before' column)."
                if merged
                else ". Give the directory `hf-clip-forget forget --output` wrote."
            )
        )
    with _loading("adapter", adapter):
        options = {"trust_unverified": True} if _TRUST_UNVERIFIED.get() else {}
        return ForgetPeftModel.from_pretrained(model, adapter, **options)


def load_data(data: str, split: str):
    """``(dataset, source)``: the labelled images of ``--data`` and the path (resolved) or id they came from."""
    from ..evaluation import load_labelled_images

    # one cache entry per file, however its path is spelled (the datasets fingerprint depends on the path string)
    source = os.path.realpath(os.path.expanduser(data)) if os.path.exists(os.path.expanduser(data)) else data
    try:
        with _loading("data", data, check_path=False):  # its own message lists what --data can be
            return load_labelled_images(source, split=split), source
    except CommandError as error:  # the loader's message names its keyword; the command line's, its flag
        raise CommandError(str(error).replace("Pass `split=` one of them.", "Give --split one of them.")) from error


def cached_image_features(
    model,
    image_processor,
    data: str,
    split: str,
    name_or_path: str | None = None,
    use_cache: bool = True,
    *,
    accelerator=None,
    batch_size: int = 64,
):
    """The pre-projection image features of a labelled image set, computed once and cached on disk.

    The cache is keyed on the vision tower's weights, the image processor's settings and the data's identity
    (:func:`hf_clip_forget.evaluation.image_features_key`), so ``name_or_path`` plays no part: it is accepted for
    callers that pass it. With several processes (``accelerator``) the embedding is shared among them.
    """
    from ..evaluation import image_features_key, load_or_embed_image_features

    dataset, source = load_data(data, split)
    key = image_features_key(model, image_processor, dataset, source)
    return load_or_embed_image_features(
        key, model, image_processor, dataset, use_cache=use_cache, accelerator=accelerator, batch_size=batch_size
    )


def command_processes(command: str):
    """The processes this run was launched as; only ``eval`` and ``sweep`` may have more than one."""
    from ..evaluation import launched_processes, process_state

    launched = launched_processes()
    if launched > 1 and command not in MULTI_PROCESS_COMMANDS:
        raise CommandError(
            f"`{command}` runs in one process, but this run was launched as {launched}: run it without torchrun "
            f"(only {' and '.join(MULTI_PROCESS_COMMANDS)} share their work across processes)."
        )
    try:
        return process_state()
    except RuntimeError as error:
        raise CommandError(str(error)) from error


def check_output_path(path: str | None, option: str) -> None:
    """Refuse, before any work, an output path that cannot be written."""
    if path is None:
        return
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise CommandError(f"{option} {path!r} is a directory; give a file path.")
    if not os.path.isdir(folder):
        raise CommandError(f"{option} {path!r}: the folder {folder!r} does not exist. Create it first.")
