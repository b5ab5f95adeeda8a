"""Every claim the suite checks: the statistics claims (taq.analysis.claims) and the quantizer's, measured on the
model (taq.quant.claims)."""

from taq.analysis.claims import CLAIMS
from taq.quant.claims import CLAIM_ROWS, QUANT_CLAIMS
from taq.quant.damage import DAMAGE, DAMAGE_ROWS

ALL_CLAIMS = {**CLAIMS, **QUANT_CLAIMS, DAMAGE.name: DAMAGE}
QUANT_CLAIM_LAYERS = {**CLAIM_ROWS, DAMAGE.name: DAMAGE_ROWS}  # claim -> its rows ("A{bits}:{group}", ...)
