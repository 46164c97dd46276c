"""Continual methods behind one small interface (`fl2t.methods.base.Method`): the baselines of DESIGN §3 and
fl2t itself. `METHODS[name](ctx)` makes one; the benchmark runner knows nothing else about them."""

from fl2t.methods.base import Method, MethodContext, Sampler
from fl2t.methods.cidm import CIDM
from fl2t.methods.clora import CLoRA
from fl2t.methods.ewc import EWC
from fl2t.methods.fl2t import FL2T
from fl2t.methods.lwf import LwF
from fl2t.methods.magmax import MagMax
from fl2t.methods.merge import Merge
from fl2t.methods.oracle import Oracle
from fl2t.methods.sequential import Sequential

METHODS: dict[str, type[Method]] = {m.name: m for m in (Oracle, Sequential, EWC, LwF, CLoRA, Merge, MagMax, CIDM, FL2T)}

__all__ = ["METHODS", "Method", "MethodContext", "Sampler"]
