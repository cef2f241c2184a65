"""Upload forget adapters, or merged unlearned models, to the Hugging Face Hub: files and card in one commit.

transformers' ``PushToHubMixin.push_to_hub`` (which ``PeftModel`` inherits) would replace the card with a generic
one, so the upload is done here: save into a temporary directory, write this package's card, and make a single
``HfApi.upload_folder`` commit. A failed upload raises; nothing is reported as success unless the commit landed.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence

from huggingface_hub import CommitInfo, HfApi, get_token
from huggingface_hub.errors import HfHubHTTPError, HFValidationError, RepositoryNotFoundError
from huggingface_hub.utils import validate_repo_id

from ..api import ForgetPeftModel
from .card import ForgetEvaluation, write_model_card


class HubUploadError(OSError):
    """An upload to the Hub did not happen; the message says why and what to do. Nothing was committed."""


def push_to_hub(
    model: ForgetPeftModel,
    repo_id: str,
    *,
    merged: bool = False,
    evaluations: Sequence[ForgetEvaluation] = (),
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
        commit_message, private, token, revision, create_pr: as for ``HfApi.upload_folder`` / ``create_repo``.
        endpoint: the Hub's URL (default: ``HF_ENDPOINT`` or huggingface.co).

    Returns:
        The ``CommitInfo`` of the single commit holding the files and the card.

    Raises:
        ValueError: invalid ``repo_id`` or no token.
        HubUploadError: the Hub refused or could not be reached; nothing was committed.
    """
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ValueError(f"Invalid Hub repo id {repo_id!r}: {error} Use the form 'namespace/model-name'.") from error
    token = token or get_token()
    if not token:
        raise ValueError(
            "No Hugging Face token: log in with `hf auth login`, set the HF_TOKEN environment variable, or pass "
            "`token=`. Nothing was uploaded."
        )
    api = HfApi(endpoint=endpoint, token=token)
    with tempfile.TemporaryDirectory() as temporary:
        folder = os.path.join(temporary, "upload")
        if merged:
            model.save_merged_pretrained(folder)
        else:
            model.save_pretrained(folder)
        write_model_card(model, folder, merged=merged, repo_id=repo_id, evaluations=evaluations)
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
