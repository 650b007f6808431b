"""Kubernetes resource quantities: validation pattern and exact parsing.

A quantity is what users write in ``spec.resources`` (``"500m"``, ``"4Gi"``, ``2``). The CRD schema
refuses anything that does not match :data:`QUANTITY_PATTERN`; :func:`parse_quantity` turns an
accepted value into an exact :class:`~decimal.Decimal` in base units (cores, bytes, IOPS, ...).
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any

from pydantic import BeforeValidator, WithJsonSchema

# A non-negative Kubernetes quantity: <number><suffix>, where suffix is a binary SI suffix (Ki..Ei),
# a decimal SI suffix (n, u, m, k, M, G, T, P, E) or a decimal exponent (e3, E-2). The sign of the
# number itself is not accepted: capacity is never negative.
QUANTITY_PATTERN = (
    r"^\+?([0-9]+(\.[0-9]*)?|\.[0-9]+)"
    r"(([KMGTPE]i)|[numkMGTPE]|([eE][+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)))?$"
)
_QUANTITY_RE = re.compile(QUANTITY_PATTERN)

_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_DECIMAL = {
    "n": Decimal("1e-9"),
    "u": Decimal("1e-6"),
    "m": Decimal("1e-3"),
    "": Decimal(1),
    "k": Decimal("1e3"),
    "M": Decimal("1e6"),
    "G": Decimal("1e9"),
    "T": Decimal("1e12"),
    "P": Decimal("1e15"),
    "E": Decimal("1e18"),
}
_SPLIT_RE = re.compile(r"^\+?(?P<number>[0-9]*\.?[0-9]*)(?P<suffix>.*)$")


class QuantityError(ValueError):
    """A value that is not a non-negative Kubernetes quantity."""


def parse_quantity(value: str | int | float) -> Decimal:
    """Return the quantity in base units, exactly.

    >>> parse_quantity("500m")
    Decimal('0.500')
    >>> parse_quantity("1Ki")
    Decimal('1024')
    """
    if isinstance(value, bool):
        raise QuantityError(f"{value!r} is not a quantity")
    if isinstance(value, int | float):
        if value < 0:
            raise QuantityError(f"{value!r} is negative")
        return Decimal(str(value))
    text = value.strip()
    if not _QUANTITY_RE.match(text):
        raise QuantityError(f"{value!r} is not a non-negative Kubernetes quantity")
    match = _SPLIT_RE.match(text)
    if match is None:  # pragma: no cover - the pattern above already guarantees a match
        raise QuantityError(f"{value!r} is not a quantity")
    number, suffix = match.group("number"), match.group("suffix")
    try:
        base = Decimal(number)
    except InvalidOperation as exc:  # pragma: no cover - guarded by the pattern
        raise QuantityError(f"{value!r} is not a quantity") from exc
    if suffix in _BINARY:
        return base * _BINARY[suffix]
    if suffix in _DECIMAL:
        return base * _DECIMAL[suffix]
    # decimal exponent, e.g. "e3" or "E-2"
    return base * (Decimal(10) ** Decimal(suffix[1:]))


def _check_quantity(value: Any) -> str | int:
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise QuantityError(f"{value!r} is not a quantity: use a string such as '500m' or '4Gi'")
    parse_quantity(value)
    return value


Quantity = Annotated[
    str | int,
    BeforeValidator(_check_quantity),
    WithJsonSchema(
        {
            "x-kubernetes-int-or-string": True,
            "anyOf": [{"type": "integer"}, {"type": "string"}],
            "pattern": QUANTITY_PATTERN,
            "minimum": 0,
        }
    ),
]
"""A non-negative Kubernetes quantity (int-or-string in the CRD schema)."""
