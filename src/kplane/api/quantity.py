"""Kubernetes resource quantities (``100m``, ``0.5``, ``2Ki``, ``1G``, ``1e3``, ...) parsed exactly.

The grammar is upstream's (``k8s.io/apimachinery/pkg/api/resource``)::

    <quantity>      ::= <sign>? <number> <suffix>
    <number>        ::= <digits> | <digits> "." <digits>? | "." <digits>
    <suffix>        ::= <binarySI> | <decimalExponent> | <decimalSI>
    <binarySI>      ::= Ki | Mi | Gi | Ti | Pi | Ei
    <decimalSI>     ::= n | u | m | "" | k | M | G | T | P | E
    <decimalExponent> ::= ("e" | "E") <sign>? <digits>

:func:`parse` returns the exact value (bytes, cores, units) as a :class:`~fractions.Fraction`;
:func:`parse_milli` returns thousandths as an ``int``, rounded up like upstream's ``MilliValue()``.
Anything else raises :class:`ValueError`.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

__all__ = ["format_milli", "parse", "parse_milli"]

_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_DECIMAL = {
    "n": Fraction(1, 10**9), "u": Fraction(1, 10**6), "m": Fraction(1, 1000), "": Fraction(1),
    "k": Fraction(10**3), "M": Fraction(10**6), "G": Fraction(10**9), "T": Fraction(10**12),
    "P": Fraction(10**15), "E": Fraction(10**18),
}
# exponents beyond this are surely mistakes, and would make huge integers
_MAX_EXPONENT = 1000
_MAX_DIGITS = 1000

_RE = re.compile(
    r"(?P<sign>[+-]?)(?:(?P<int>[0-9]+)(?:\.(?P<frac>[0-9]*))?|\.(?P<frac2>[0-9]+))"
    r"(?:(?P<bin>[KMGTPE]i)|[eE](?P<exp>[+-]?[0-9]+)|(?P<dec>[numkMGTPE]?))"
)


def parse(q: str | int | float) -> Fraction:
    """The exact value of quantity ``q`` (e.g. ``parse("1.5Ki") == 1536``, ``parse("100m") == Fraction(1, 10)``)."""
    if isinstance(q, bool):
        raise ValueError(f"quantities must be strings or numbers, not {q!r}")
    if isinstance(q, int):
        return Fraction(q)
    if isinstance(q, float):
        if not math.isfinite(q):
            raise ValueError(f"quantity {q!r} is not finite")
        # the decimal the float was written as, not its binary approximation: 0.1 -> 1/10
        return Fraction(repr(q))
    if not isinstance(q, str):
        raise ValueError(f"quantities must be strings or numbers, not {type(q).__name__}")
    m = _RE.fullmatch(q)
    if m is None:
        raise ValueError(f"quantities must match the regular expression "
                         f"'^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$': {q!r}")
    whole = m["int"] or ""
    frac = m["frac"] if m["frac"] is not None else (m["frac2"] or "")
    if len(whole) + len(frac) > _MAX_DIGITS:
        raise ValueError(f"quantity {q!r} has too many digits")
    value = Fraction(int(whole or "0") * 10 ** len(frac) + int(frac or "0"), 10 ** len(frac))
    if m["bin"]:
        value *= _BINARY[m["bin"]]
    elif m["exp"] is not None:
        exp = int(m["exp"])
        if abs(exp) > _MAX_EXPONENT:
            raise ValueError(f"quantity {q!r} has an exponent out of range")
        value *= Fraction(10) ** exp
    else:
        value *= _DECIMAL[m["dec"] or ""]
    return -value if m["sign"] == "-" else value


def parse_milli(q: str | int | float) -> int:
    """``q`` in thousandths (``"100m"`` -> 100, ``"1"`` -> 1000, ``"1Ki"`` -> 1024000), rounded up."""
    return math.ceil(parse(q) * 1000)


def format_milli(milli: int) -> str:
    """The canonical short form of ``milli`` thousandths: ``1500`` -> ``"1500m"``, ``2000`` -> ``"2"``."""
    return str(milli // 1000) if milli % 1000 == 0 else f"{milli}m"
