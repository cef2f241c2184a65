"""The test suite's Hub: :class:`hf_clip_forget.hub.local_hub.LocalHub`, in memory, on 127.0.0.1.

The module is loaded from its file, not imported through the package: importing ``hf_clip_forget`` imports
huggingface_hub, which reads ``HF_ENDPOINT`` at import time, and ``conftest.py`` sets it to this server's address
first. ``hf_clip_forget.hub.local_hub`` imports nothing of the package, so loading it alone is safe.
"""

from __future__ import annotations

import importlib.util
import os
import sys


def _load_local_hub():
    name = "hf_clip_forget.hub.local_hub"
    if name in sys.modules:
        return sys.modules[name]
    package = importlib.util.find_spec("hf_clip_forget")  # finds the package without importing it
    path = os.path.join(package.submodule_search_locations[0], "hub", "local_hub.py")
    spec = importlib.util.spec_from_file_location("_hf_clip_forget_local_hub", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


FakeHub = _load_local_hub().LocalHub

__all__ = ["FakeHub"]
