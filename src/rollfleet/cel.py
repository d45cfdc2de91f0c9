"""`Cel`: a CEL rule the RLJob CRD carries beside the pydantic validator it mirrors.

Models in spec.py (and method parameters in rollfleet.methods) list theirs in `__cel__`;
crd.py writes them into the CRD as `x-kubernetes-validations`.
"""

from __future__ import annotations

from typing import Literal, NamedTuple


class Cel(NamedTuple):
    """A CEL rule the CRD carries for a cross-field check that a validator beside it makes.

    A model lists its rules in `__cel__`; crd.py puts them on that model's schema as
    `x-kubernetes-validations`, so the API server refuses the manifest before the operator
    reads it, and `self` is the object the model describes. The CRD sets no defaults, so a
    field the manifest leaves out is absent there: write `{self.a.b}` (or `{p.b}` for the
    variable of a list macro such as `self.items.all(p, ...)`) and crd.py expands it to the
    field's value or, where absent, its pydantic default, e.g.
    `(has(self.workers) ? self.workers : 1)`. A bare `self.a` has no default: guard it with
    `has(self.a)`. tests/unit/test_crd.py checks every rule against these validators.
    """

    rule: str
    message: str
    field_path: str | None = None
    "the field the API server blames, relative to `self` (e.g. `.workers`)"
    reason: Literal[
        "FieldValueInvalid", "FieldValueForbidden", "FieldValueDuplicate", "FieldValueRequired"
    ] = "FieldValueInvalid"
