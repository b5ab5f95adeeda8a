"""Numbers from activation statistics, pure NumPy (no plotting library needed):

- `cells`: reading the stats arrays (layers, their order) and per-(layer, timestep) aggregates;
- `measures`: the one definition of each diagnostic quantity (asymmetry, temporal drift, channel outliers);
- `quant_error`: quantization error estimated exactly from histograms;
- `summary`: the per-layer summary table's numbers;
- `claims`: the claim registry (threshold, measurement, the TaQ-DiT observation it encodes).
"""

from taq.analysis.claims import CLAIMS, Claim, Measurement, measure, measure_all
from taq.analysis.summary import LayerSummary, summarize

__all__ = ["CLAIMS", "Claim", "LayerSummary", "Measurement", "measure", "measure_all", "summarize"]
