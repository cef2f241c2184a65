"""Pushing with the Hub offline says so (issue 21), and the local Hub (``python -m hf_clip_forget.hub.local_hub``)
takes a push and serves it back from a folder, as the README shows."""

import os
import subprocess
import sys

import pytest
import torch
from huggingface_hub import constants, snapshot_download

from hf_clip_forget import ForgetPeftModel, HubUploadError
from hf_clip_forget.cli import main
from hf_clip_forget.hub.local_hub import LocalHub
from hf_clip_forget.testing_utils import random_pixels, tiny_clip

from .conftest import image_features
from .test_cli import save_tiny_model


def edited_model(tokenizer):
    return tiny_clip().add_forget_adapter(["cat"], tokenizer=tokenizer, show_progress=False)


@pytest.mark.parametrize("with_token", [False, True])
def test_an_offline_push_says_the_hub_is_offline_and_how_to_go_online(with_token, fake_hub, tokenizer, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    if not with_token:
        monkeypatch.delenv("HF_TOKEN")
    sent = len(fake_hub.requests)
    with pytest.raises(HubUploadError) as raised:
        edited_model(tokenizer).push_to_hub("tester/offline")
    message = str(raised.value)
    assert "offline" in message and "No Hugging Face token" not in message
    assert "unset HF_HUB_OFFLINE" in message and "save_pretrained" in message and "Nothing was uploaded" in message
    assert len(fake_hub.requests) == sent and "tester/offline" not in fake_hub.repos


def test_the_command_line_says_so_in_one_error_line(tmp_path, monkeypatch, capsys):
    model_dir = save_tiny_model(tmp_path / "tiny")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.delenv("HF_TOKEN")
    args = ["forget", model_dir, "--classes", "cat", "--output", str(tmp_path / "out"), "--push-to-hub", "me/x"]
    assert main(args) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("error:") and "The Hub is offline" in error


def test_a_process_started_offline_without_a_token_is_told_the_hub_is_offline(tmp_path):
    """The real situation: HF_HUB_OFFLINE=1 in the environment before anything is imported, no token anywhere."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HF_ENDPOINT")}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"))
    code = (
        "import hf_clip_forget\n"
        "from hf_clip_forget.testing_utils import tiny_clip, tiny_tokenizer\n"
        "model = tiny_clip().add_forget_adapter(['cat'], tokenizer=tiny_tokenizer(), show_progress=False)\n"
        "try:\n"
        "    model.push_to_hub('me/offline')\n"
        "except hf_clip_forget.HubUploadError as error:\n"
        "    print(error)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "The Hub is offline" in result.stdout, result.stdout + result.stderr


def test_push_to_a_local_hub_served_from_a_folder_and_load_it_back(tmp_path, tokenizer):
    """``python -m hf_clip_forget.hub.local_hub DIR`` as the README runs it: the push lands in DIR/namespace/name/,
    and a server started again on DIR serves it for loading."""
    folder = tmp_path / "local-hub"
    server = subprocess.Popen(
        [sys.executable, "-m", "hf_clip_forget.hub.local_hub", str(folder), "--port", "0", "--token", "hf_local"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        first_line = server.stdout.readline()
        assert " at http://127.0.0.1:" in first_line, first_line + server.stderr.read()
        endpoint = first_line.split(" at ")[1].split()[0]
        model = edited_model(tokenizer)
        commit = model.push_to_hub("me/tiny-no-cat", endpoint=endpoint, token="hf_local")
        assert commit.commit_url.startswith(endpoint)
    finally:
        server.terminate()
        server.wait(timeout=30)
        server.stdout.close()
        server.stderr.close()
    pushed = folder / "me" / "tiny-no-cat"
    assert (pushed / "adapter_config.json").is_file() and (pushed / "README.md").is_file()

    with LocalHub("hf_local", directory=str(folder)) as hub:  # read back from the folder
        assert "adapter_config.json" in hub.repos["me/tiny-no-cat"]
        local = snapshot_download("me/tiny-no-cat", endpoint=hub.endpoint, local_dir=str(tmp_path / "download"))
    loaded = ForgetPeftModel.from_pretrained(tiny_clip(), local)
    pixels = random_pixels(batch_size=3)
    torch.testing.assert_close(image_features(loaded, pixels), image_features(model, pixels), rtol=0, atol=0)


def test_the_local_hub_refuses_paths_that_leave_the_repo(tmp_path):
    import base64
    import json
    import urllib.request

    with LocalHub("t", directory=str(tmp_path / "hub")) as hub:
        hub.repos["me/r"], hub.commits["me/r"] = {}, []
        body = "\n".join(
            json.dumps(line)
            for line in (
                {"key": "header", "value": {"summary": "x"}},
                {"key": "file", "value": {"path": "../../escape.txt", "content": base64.b64encode(b"x").decode()}},
            )
        ).encode()
        request = urllib.request.Request(
            f"{hub.endpoint}/api/models/me/r/commit/main", data=body, headers={"Authorization": "Bearer t"}
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=30)
        assert refused.value.code == 400
    assert not (tmp_path / "escape.txt").exists() and hub.repos["me/r"] == {}
