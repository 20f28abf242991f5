"""The self-contained HTML report of one prompt through a looped and a deep model, built from the
headline numbers (``analysis.measures.summary``) and the figure builders (``analysis.viz``)."""
from .command import add_parser, report_for_checkpoints
from .sections import NUMBERS_ID, build_report, report_numbers, software_versions

__all__ = ["NUMBERS_ID", "add_parser", "build_report", "report_for_checkpoints", "report_numbers", "software_versions"]
