"""Upload forget adapters, or merged unlearned models, to the Hugging Face Hub: files and card in one commit.

transformers' ``PushToHubMixin.push_to_hub`` (which ``PeftModel`` inherits) would replace the card with a generic
one, so the upload is done here: save into a temporary directory, write this package's card, and make a single
``HfApi.upload_folder`` commit. A failed upload raises; nothing is reported as success unless the commit landed.
A merged upload carries the tokenizer and image processor, so that the repo works as it is (``pipeline``); no
uploaded file names a local path of the uploader's machine.

``base_model_name_or_path``: a local save records where the base model was loaded from, a local directory included
(as peft does; see :mod:`hf_clip_forget.tuners.projection_edit.provenance`); an upload records the base's Hub id
instead, or ``null`` when it was not loaded from the Hub, and is refused if any text file still names the directory.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Sequence

from huggingface_hub import CommitInfo, HfApi, constants, get_token
from huggingface_hub.errors import HfHubHTTPError, HFValidationError, RepositoryNotFoundError
from huggingface_hub.utils import validate_repo_id

from ..api import ForgetPeftModel, load_from_model_checkpoint
from ..files import rewrite_adapter_configs
from .card import ForgetEvaluation, base_model_id, check_audit_matches, check_license, write_model_card


#: Files that are only read as text; scanned for local paths before an upload (weights are not).
_TEXT_SUFFIXES = (".json", ".md", ".txt", ".jinja", ".yaml")


class HubUploadError(OSError):
    """An upload to the Hub did not happen; the message says why and what to do. Nothing was committed."""


def push_to_hub(
    model: ForgetPeftModel,
    repo_id: str,
    *,
    merged: bool = False,
    evaluations: Sequence[ForgetEvaluation] = (),
    audit=None,
    license: str | None = None,
    tokenizer=None,
    image_processor=None,
    processor=None,
    commit_message: str | None = None,
    private: bool | None = None,
    token: str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    endpoint: str | None = None,
) -> CommitInfo:
    """Upload ``model``'s forget adapters (default) or, with ``merged=True``, the full model with the edit merged.

    Args:
        model: the :class:`~hf_clip_forget.ForgetPeftModel` to upload (it is not modified).
        repo_id: ``"namespace/name"`` of the model repo (created if missing).
        merged: upload a plain transformers checkpoint with the active adapters merged, instead of the adapters.
        evaluations: before/after accuracies to show in the card and its ``model-index``.
        audit: an :class:`~hf_clip_forget.audit.AuditReport` of ``model`` (``model.audit_forgetting(...)``): shown in
            the card's "Audit" section and uploaded as ``audit.json``.
        license: the card's ``license``, a Hub license identifier (``"mit"``, ``"other"``…). Default: the base
            model's, read from its card (on the Hub, or in the local directory it was loaded from); ``"unknown"``
            when that cannot be determined.
        tokenizer, image_processor: saved with a merged model (``merged=True``), so that the repo works with
            ``pipeline("zero-shot-image-classification", model=repo_id)``. Default: loaded from the checkpoint the
            base model was loaded from; if there is none, the upload is refused. Not used for adapters.
        processor: instead of ``tokenizer`` and ``image_processor``, a processor holding both (``CLIPProcessor``…).
        commit_message, private, token, revision, create_pr: as for ``HfApi.upload_folder`` / ``create_repo``.
        endpoint: the Hub's URL (default: ``HF_ENDPOINT`` or huggingface.co).

    Returns:
        The ``CommitInfo`` of the single commit holding the files and the card.

    Raises:
        ValueError: invalid ``repo_id`` or ``license``, no token, or (merged) no tokenizer or image processor.
        HubUploadError: offline mode is on (``HF_HUB_OFFLINE=1``), or the Hub refused or could not be reached;
            nothing was committed.
    """
    token = _checked_token(repo_id, token)
    check_audit_matches(model, audit)
    if license is not None:
        check_license(license)
    preprocessors = _preprocessors(model, merged, tokenizer, image_processor, processor)
    api = HfApi(endpoint=endpoint, token=token)
    with tempfile.TemporaryDirectory() as temporary:
        folder = os.path.join(temporary, "upload")
        _save_for_upload(model, folder, merged, preprocessors)
        write_model_card(
            model,
            folder,
            merged=merged,
            repo_id=repo_id,
            evaluations=evaluations,
            license=license,
            online=True,
            audit=audit,
        )
        _name_base_by_hub_id(folder, model)
        _refuse_local_paths(folder, model)
        what = "merged model" if merged else f"forget adapter(s) {list(model.peft_config)}"
        try:
            api.create_repo(repo_id, private=private, exist_ok=True)
            return api.upload_folder(
                repo_id=repo_id,
                folder_path=folder,
                commit_message=commit_message or f"Upload {what} (hf_clip_forget)",
                revision=revision,
                create_pr=create_pr,
            )
        except Exception as error:  # noqa: BLE001 - every failure is reported the same way, with its cause
            raise HubUploadError(_explain(error, repo_id, api.endpoint)) from error


def _checked_token(repo_id: str, token: str | None) -> str:
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ValueError(f"Invalid Hub repo id {repo_id!r}: {error} Use the form 'namespace/model-name'.") from error
    if constants.is_offline_mode():
        # checked before the token: offline, `hf auth login` cannot help, and a token would not get a byte through
        raise HubUploadError(
            f"The Hub is offline in this process (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE is set): nothing can be "
            f"uploaded to {repo_id!r}. To push, start Python again without them (`unset HF_HUB_OFFLINE "
            "TRANSFORMERS_OFFLINE`; huggingface_hub reads them at import) and with a token (`hf auth login` or "
            "HF_TOKEN). Without a network, `save_pretrained(DIRECTORY)` keeps the same files and card, and `python -m "
            "hf_clip_forget.hub.local_hub DIRECTORY` serves a local Hub to push to. Nothing was uploaded."
        )
    token = token or get_token()
    if not token:
        raise ValueError(
            "No Hugging Face token: log in with `hf auth login`, set the HF_TOKEN environment variable, or pass "
            "`token=`. Nothing was uploaded."
        )
    return token


def _save_for_upload(model: ForgetPeftModel, folder: str, merged: bool, preprocessors: list) -> None:
    if merged:
        model.save_merged_pretrained(folder)
    else:
        model.save_pretrained(folder)
    for preprocessor in preprocessors:
        preprocessor.save_pretrained(folder)


def _preprocessors(model: ForgetPeftModel, merged: bool, tokenizer, image_processor, processor) -> list:
    """What a merged repo needs beside the weights to be usable as pushed; refuses when it cannot be had."""
    options = {"tokenizer": tokenizer, "image_processor": image_processor, "processor": processor}
    given = [name for name, value in options.items() if value is not None]
    if not merged:
        if given:
            raise ValueError(
                f"`{'`, `'.join(given)}=` is saved only with a merged model (`merged=True`); an adapter is loaded "
                "onto a base model that brings its own. Nothing was uploaded."
            )
        return []
    if processor is not None:
        if tokenizer is not None or image_processor is not None:
            raise ValueError("Pass either `processor=` or `tokenizer=` and `image_processor=`, not both.")
        missing = [part for part in ("tokenizer", "image_processor") if getattr(processor, part, None) is None]
        if missing:
            raise ValueError(f"The processor has no {' or '.join(missing)}: a merged repo needs both.")
        return [processor]
    from transformers import AutoImageProcessor, AutoTokenizer

    try:
        if tokenizer is None:
            tokenizer = load_from_model_checkpoint(model, AutoTokenizer, "tokenizer")
        if image_processor is None:
            image_processor = load_from_model_checkpoint(model, AutoImageProcessor, "image_processor")
    except ValueError as error:
        raise ValueError(
            f"A merged upload includes the tokenizer and the image processor, so that the repo works as pushed "
            f"(`pipeline('zero-shot-image-classification', model=repo_id)`). {error} Nothing was uploaded."
        ) from error
    return [tokenizer, image_processor]


def _name_base_by_hub_id(folder: str, model: ForgetPeftModel) -> None:
    """Make every adapter config's ``base_model_name_or_path`` the base model's Hub id, or ``null`` when it was not
    loaded from the Hub: the local path a local save records (so that the base is found on the author's machine)
    names a directory of the uploader's machine, private and useless to anyone else, and a bare directory name would
    pass for a Hub id. Only the uploaded copy changes: the model's configs and earlier local saves keep the path."""
    base = base_model_id(model)
    rewrite_adapter_configs(folder, "base_model_name_or_path", lambda _: base)


def _refuse_local_paths(folder: str, model: ForgetPeftModel) -> None:
    """Refuse the upload if a text file still names the local directory the base model was loaded from."""
    source = getattr(model.get_base_model(), "name_or_path", None)
    if not source or not os.path.exists(source):
        return
    paths = "|".join(re.escape(path) for path in {os.path.abspath(source), os.path.realpath(source)})
    local = re.compile(rf"(?<![\w/.:-])(?:{paths})(?![\w.-])")  # the path itself, not a URL ending like it
    for directory, _, names in os.walk(folder):
        for name in (name for name in names if name.endswith(_TEXT_SUFFIXES)):
            with open(os.path.join(directory, name), encoding="utf-8", errors="replace") as handle:
                text = handle.read()
            if local.search(text):
                raise ValueError(
                    f"{os.path.relpath(os.path.join(directory, name), folder)} would publish the local path of the "
                    f"base model ({source!r}). Nothing was uploaded."
                )


def _explain(error: Exception, repo_id: str, endpoint: str) -> str:
    status = getattr(getattr(error, "response", None), "status_code", None)
    if status in (401, 403):
        return (
            f"The Hub at {endpoint} refused the upload to {repo_id!r} (HTTP {status}): the token is invalid or has no "
            "write access to that namespace. Check HF_TOKEN or `hf auth login`. Nothing was uploaded."
        )
    if isinstance(error, RepositoryNotFoundError):
        return f"The repo {repo_id!r} does not exist at {endpoint} and could not be created. Nothing was uploaded."
    if isinstance(error, HfHubHTTPError):
        return f"The Hub at {endpoint} rejected the upload to {repo_id!r}: {error}. Nothing was uploaded."
    return (
        f"Could not reach the Hub at {endpoint} to upload {repo_id!r} ({type(error).__name__}: {error}). Check the "
        "network or HF_ENDPOINT. Nothing was uploaded."
    )
