"""Variants: named rows of a benchmark that run a method with other settings.

    variants:
      cidm+tokens+compute: {method: cidm+tokens, learn: {steps: 700}}   # the strongest baseline at fl2t's compute
      ewc@1e2: {method: ewc, settings: {ewc_lambda: 100}}
      fl2t@lb0.1: {method: fl2t, consolidate: {lambda_base: 0.1}}

A variant's name serves wherever a method's does (`--methods cidm+tokens+compute`, results.json, the report's rows),
and its state has its own folder. For that row only, `learn` overrides the config's Step-1 settings, `consolidate`
its Step-2 settings, and `settings` the method's own settings (its `settings_model`, over the config's `methods:`
entry for it). A method that learns each concept alone (an `AloneMethod`: oracle, lookup, merge, magmax-alone, fl2t)
takes its experts from the run's shared store, learned once at the config's Step-1 settings; a `learn` override for
such a variant is refused rather than given a store of its own (a second store would be a second run's Step 1: make
it a benchmark of its own). Fidelity targets always come from the shared store, whatever a row's `learn`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fl2t.config import ConsolidateSettings, LearnSettings
from fl2t.errors import Fl2tError

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.,@+=-]*")  # a row's name is a folder name: no '/', no leading '.'


class Variant(BaseModel):
    """A benchmark row: `method` with overrides. After validation (`check_variants`) each override holds only the
    keys given, with their typed values, so the run's fingerprint reads `100.0` for `1e2` and for `100`."""

    model_config = ConfigDict(extra="forbid")
    method: str = Field(description="the method it runs (a fl2t.methods name)")
    learn: dict[str, Any] = Field(default_factory=dict, description="Step-1 settings that differ from the config's")
    consolidate: dict[str, Any] = Field(default_factory=dict, description="Step-2 settings that differ")
    settings: dict[str, Any] = Field(default_factory=dict, description="the method's own settings that differ")


@dataclass(frozen=True)
class Row:
    """What one results row runs: a METHODS name with its Step-1, Step-2 and own settings (None: its defaults)."""

    method: str
    learn: LearnSettings
    consolidate: ConsolidateSettings
    settings: BaseModel | None


def resolve_row(
    name: str,
    variants: dict[str, Variant],
    learn: LearnSettings,
    consolidate: ConsolidateSettings,
    methods: dict[str, BaseModel],
) -> Row:
    """Row `name`: the method of that name with the config's settings, or the variant of that name with its
    overrides. An unknown name, method or setting is an Fl2tError naming the variant."""
    from fl2t.methods import METHODS, method_settings
    from fl2t.methods.base import AloneMethod

    if name in METHODS:
        return Row(name, learn, consolidate, methods.get(name))
    if name not in variants:
        rows = ", ".join([*METHODS, *variants])
        raise Fl2tError(f"unknown method(s) {name}; choose from {rows}")
    v = variants[name]
    if v.method not in METHODS:
        raise Fl2tError(f"variant {name}: no method named {v.method!r}; choose from {', '.join(METHODS)}")
    if v.learn and issubclass(METHODS[v.method], AloneMethod):
        raise Fl2tError(
            f"variant {name}: {v.method} takes the experts learned alone from the run's shared store, learned at the "
            f"config's learn settings; a learn override ({', '.join(v.learn)}) would need a store of its own: "
            "run it as a benchmark of its own, with those learn settings"
        )
    try:
        base = methods.get(v.method)
        own = {**(base.model_dump() if base is not None else {}), **v.settings}
        settings = method_settings(v.method, own) if own else None
        row_learn = _override(learn, v.learn, "learn")
        row_consolidate = _override(consolidate, v.consolidate, "consolidate")
    except Fl2tError as e:
        raise Fl2tError(f"variant {name}: {e}") from None
    return Row(v.method, row_learn, row_consolidate, settings)


def check_variants(
    variants: dict[str, Variant],
    learn: LearnSettings,
    consolidate: ConsolidateSettings,
    methods: dict[str, BaseModel],
) -> dict[str, Variant]:
    """Every variant resolved once (an error names it), its overrides kept as the keys given with typed values."""
    from fl2t.methods import METHODS

    out = {}
    for name, v in variants.items():
        if not NAME.fullmatch(name):
            raise Fl2tError(f"variant {name!r}: a name of letters, digits and _.,@+=- (it names a folder)")
        if name in METHODS:
            raise Fl2tError(f"variant {name}: a method has that name; give the variant another")
        row = resolve_row(name, variants, learn, consolidate, methods)
        out[name] = v.model_copy(
            update={
                "learn": {k: getattr(row.learn, k) for k in v.learn},
                "consolidate": {k: getattr(row.consolidate, k) for k in v.consolidate},
                "settings": {k: getattr(row.settings, k) for k in v.settings},
            }
        )
    return out


def _override(settings: BaseModel, changes: dict[str, Any], section: str) -> Any:
    """`settings` with `changes`, validated as its model."""
    try:
        return type(settings).model_validate({**settings.model_dump(), **changes})
    except ValidationError as e:
        err = e.errors()[0]
        raise Fl2tError(f"{section}.{'.'.join(str(x) for x in err['loc'])}: {err['msg']}") from None
