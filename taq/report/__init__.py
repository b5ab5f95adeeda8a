"""Phase 2 report: summary numbers (`summary`), figures and `taq plot` (`plots`), the HTML page (`html`)."""

from taq.report.html import write_report
from taq.report.plots import default_layers, write_figures
from taq.report.summary import LayerSummary, histogram_quantile, summarize, write_summary

__all__ = ["LayerSummary", "default_layers", "histogram_quantile", "summarize", "write_figures", "write_report",
           "write_summary"]
