"""Drawing and writing only: figures and `taq plot` (`plots`), the summary table rendered (`tables`), the HTML page
(`html`). The numbers come from `taq.analysis`."""

from taq.report.html import write_report
from taq.report.plots import default_layers, write_figures
from taq.report.tables import write_summary

__all__ = ["default_layers", "write_figures", "write_report", "write_summary"]
