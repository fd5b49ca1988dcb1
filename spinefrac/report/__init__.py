"""The review report: OUT/worklist.csv and the offline HTML review OUT/report/ of a prediction folder."""

from spinefrac.report.build import write_report
from spinefrac.report.worklist import write_worklist

__all__ = ["write_report", "write_worklist"]
