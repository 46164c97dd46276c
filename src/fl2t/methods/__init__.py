"""Continual methods behind one small interface (`fl2t.methods.base.Method`): the baselines of DESIGN §3 and
fl2t itself. `METHODS[name](ctx)` makes one; the benchmark runner knows nothing else about them besides what
`Method` declares (its settings model, whether it samples each concept alone)."""

from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from fl2t.errors import Fl2tError
from fl2t.methods.base import Method, MethodContext, MethodSettings
from fl2t.methods.cidm import CIDM, CIDMTokens
from fl2t.methods.clora import CLoRA
from fl2t.methods.ewc import EWC
from fl2t.methods.fl2t import FL2T
from fl2t.methods.lookup import Lookup, LookupRouted, LookupSpan
from fl2t.methods.lwf import LwF
from fl2t.methods.magmax import MagMax, MagMaxAlone
from fl2t.methods.merge import Merge
from fl2t.methods.oracle import Oracle
from fl2t.methods.sequential import Sequential

METHODS: dict[str, type[Method]] = {
    m.name: m
    for m in (
        Oracle,
        Lookup,
        LookupSpan,
        LookupRouted,
        Sequential,
        EWC,
        LwF,
        CLoRA,
        Merge,
        MagMax,
        MagMaxAlone,
        CIDM,
        CIDMTokens,
        FL2T,
    )
}

__all__ = ["METHODS", "Method", "MethodContext", "MethodSettings", "method_settings"]


def method_settings(name: str, values: Mapping[str, Any] | MethodSettings | None) -> MethodSettings:
    """Method `name`'s own settings as its typed model (`settings_model`, defined next to the method), from a
    benchmark config's mapping; None: its defaults. An unknown method, setting or value is an Fl2tError."""
    if name not in METHODS:
        raise Fl2tError(f"no method named {name!r}; choose from {', '.join(METHODS)}")
    model = METHODS[name].settings_model
    fields = ", ".join(model.model_fields) or "none"
    if type(values) is model:
        return values
    if values is None:
        values = {}
    if not isinstance(values, Mapping):
        raise Fl2tError(f"method {name}: its settings are a mapping of setting: value (its settings: {fields})")
    try:
        return model.model_validate(values)
    except ValidationError as e:
        unknown = [str(err["loc"][0]) for err in e.errors() if err["type"] == "extra_forbidden"]
        if unknown:
            raise Fl2tError(
                f"method {name} has no setting {', '.join(map(repr, unknown))} (its settings: {fields})"
            ) from None
        err = e.errors()[0]
        raise Fl2tError(f"method {name}: {'.'.join(str(x) for x in err['loc'])}: {err['msg']}") from None
