"""fastavg: the optimizer step and the weight averaging that rides on it, in one pass over memory."""
from .averaging import BELAY, EMA, LAWA, SEMA, SWA

__all__ = ["EMA", "BELAY", "SWA", "LAWA", "SEMA"]
