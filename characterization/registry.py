"""Every claim the suite checks: the statistics claims (taq.analysis.claims) and the quantizer's, measured on the
model (taq.quant.claims)."""

from taq.analysis.claims import CLAIMS
from taq.quant.claims import CLAIM_ROWS, QUANT_CLAIMS

ALL_CLAIMS = {**CLAIMS, **QUANT_CLAIMS}
QUANT_CLAIM_LAYERS = CLAIM_ROWS  # claim -> its rows ("A{bits}:{group}")
