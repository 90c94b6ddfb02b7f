"""Views of a ComparisonReport: JSON (document), terminal, HTML with its plots; rows holds what they share."""

from __future__ import annotations

from modelkin.compare.report.document import SCHEMA, ComparisonReport
from modelkin.compare.report.terminal import print_summary, progress

__all__ = ["SCHEMA", "ComparisonReport", "print_summary", "progress"]
