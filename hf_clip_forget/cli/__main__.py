"""``python -m hf_clip_forget.cli`` (e.g. under ``torchrun``): the ``hf-clip-forget`` command line."""

import sys

from . import main


sys.exit(main())
