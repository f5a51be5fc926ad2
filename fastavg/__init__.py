"""fastavg: the optimizer step and the weight averaging that rides on it, in one pass over memory.

    opt = fastavg.AdamW(model.parameters(), lr=1e-3, average=fastavg.EMA(0.999))
    ema = fastavg.AveragedModel(model, average=fastavg.EMA(0.999))   # any optimizer: ema.attach(opt)

``fastavg.reference`` holds the same classes in plain torch (the spec).
"""
from . import posthoc, reference
from ._backends import status as backend_status
from .averaged_model import AveragedModel
from .averaging import BELAY, BEMA, EMA, LAWA, SEMA, SWA, PowerEMA
from .optim import SGD, Adam, AdamW

__all__ = ["SGD", "Adam", "AdamW", "AveragedModel", "EMA", "BELAY", "SWA", "LAWA", "SEMA", "PowerEMA", "BEMA",
           "backend_status", "posthoc", "reference"]
__version__ = "0.1.0"
