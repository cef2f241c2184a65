"""Layer 4 — the audit: probes that try to get a forgotten class back, before and after the edit.

::

    from hf_clip_forget.audit import audit_forgetting

    report = audit_forgetting(model, tokenizer, neighbours=["puppy", "hound"], data=dataset)
    print(report)                      # a table: probe, class, what was tried, before, after, chance, verdict
    report.save("audit.json"); report.plot("audit.png")
"""

from ..core import find_neighbours, vocabulary_words
from .report import GONE_MARGIN, LEAK_SHARE, NOT_REMOVED, VERDICTS, AuditReport, AuditRow, verdict
from .run import audit_forgetting


__all__ = [
    "GONE_MARGIN",
    "LEAK_SHARE",
    "NOT_REMOVED",
    "VERDICTS",
    "AuditReport",
    "AuditRow",
    "audit_forgetting",
    "find_neighbours",
    "verdict",
    "vocabulary_words",
]
