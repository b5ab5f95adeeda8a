"""Every claim the suite checks: the statistics claims (taq.analysis.claims) and the quantizer's, measured on the
model (taq.quant.claims)."""

from taq.analysis.claims import CLAIMS
from taq.quant.claims import BITS, GROUPS, TIME_AWARE

ALL_CLAIMS = {**CLAIMS, TIME_AWARE.name: TIME_AWARE}
QUANT_CLAIM_LAYERS = [f"A{bits}:{group}" for bits in BITS for group in GROUPS]  # the quantizer claim's rows
