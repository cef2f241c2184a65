"""The README's Python snippets that claim to run offline do run, and print what their comments say."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def block_with(marker: str) -> str:
    blocks = [b for b in python_blocks((ROOT / "README.md").read_text(encoding="utf-8")) if marker in b]
    assert len(blocks) == 1, f"expected one README python block containing {marker!r}, found {len(blocks)}"
    return blocks[0]


def test_the_readme_demo_snippet_runs_offline_and_prints_what_it_says():
    code = block_with("load_demo_model")
    expected = re.findall(r"#\s*prints:\s*(.+?)\s*$", code, flags=re.M)
    assert expected, "the snippet should say what it prints (`# prints: ...`)"
    # a fresh interpreter with the Hub switched off: the snippet needs nothing but the installed packages (the
    # demo model is assembled from them into the test session's HF_HOME, or reused from it)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_ENDPOINT="http://127.0.0.1:9")
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == expected, (result.stdout, expected)
