from __future__ import annotations

import re
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kplane.api.quantity import format_milli, parse, parse_milli

UPSTREAM_RE = re.compile(r"([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)")

GOOD = [
    ("0", 0, 0),
    ("1", 1, 1000),
    ("100m", Fraction(1, 10), 100),
    ("0.5", Fraction(1, 2), 500),
    ("1.5", Fraction(3, 2), 1500),
    (".5", Fraction(1, 2), 500),
    ("5.", 5, 5000),
    ("+2", 2, 2000),
    ("-2", -2, -2000),
    ("-100m", Fraction(-1, 10), -100),
    ("1n", Fraction(1, 10**9), 1),  # rounded up, like upstream MilliValue()
    ("1u", Fraction(1, 10**6), 1),
    ("1500u", Fraction(3, 2000), 2),
    ("1k", 1000, 10**6),
    ("1M", 10**6, 10**9),
    ("1G", 10**9, 10**12),
    ("1T", 10**12, 10**15),
    ("1P", 10**15, 10**18),
    ("1E", 10**18, 10**21),
    ("2Ki", 2048, 2048000),
    ("1Mi", 2**20, 2**20 * 1000),
    ("1.5Gi", 3 * 2**29, 3 * 2**29 * 1000),
    ("1Ti", 2**40, 2**40 * 1000),
    ("1Pi", 2**50, 2**50 * 1000),
    ("1Ei", 2**60, 2**60 * 1000),
    ("1e3", 1000, 10**6),
    ("1E3", 1000, 10**6),
    ("1e+3", 1000, 10**6),
    ("1e-3", Fraction(1, 1000), 1),
    ("12e0", 12, 12000),
    ("0.1e1", 1, 1000),
    ("128974848", 128974848, 128974848000),
    ("129e6", 129 * 10**6, 129 * 10**9),
    ("123Mi", 123 * 2**20, 123 * 2**20 * 1000),
    ("250m", Fraction(1, 4), 250),
    ("0.001", Fraction(1, 1000), 1),
    ("0.0001", Fraction(1, 10000), 1),
    ("-0.0001", Fraction(-1, 10000), 0),  # ceil towards +inf
    ("007", 7, 7000),
]


@pytest.mark.parametrize(("q", "value", "milli"), GOOD)
def test_table(q: str, value: Fraction | int, milli: int) -> None:
    assert parse(q) == value
    assert parse_milli(q) == milli


@pytest.mark.parametrize("q", [
    "", " ", "1 ", " 1", "m", "Ki", ".", "+", "-", "1.2.3", "1K", "1ki", "1KiB", "1Mb", "1e", "1e+", "1e1.5",
    "1ee3", "1mm", "1m3", "1.5.Gi", "--1", "+-1", "1,5", "0x10", "1_000", "1Gi ", "inf", "nan", "1i", "abc",
    "1e99999", "\u0661", "1\n",
])
def test_malformed(q: str) -> None:
    with pytest.raises(ValueError):
        parse(q)
    with pytest.raises(ValueError):
        parse_milli(q)


def test_numbers() -> None:
    assert parse(3) == 3
    assert parse_milli(3) == 3000
    assert parse(0.1) == Fraction(1, 10)
    assert parse_milli(0.25) == 250
    assert parse_milli(1e3) == 10**6
    for bad in (float("inf"), float("nan"), True, None, [1]):
        with pytest.raises(ValueError):
            parse(bad)  # type: ignore[arg-type]


def test_format_milli() -> None:
    assert format_milli(2000) == "2"
    assert format_milli(1500) == "1500m"
    assert format_milli(0) == "0"


SUFFIXES: dict[str, int | Fraction] = {"": 1, "m": Fraction(1, 1000), "k": 1000, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15,
            "E": 10**18, "n": Fraction(1, 10**9), "u": Fraction(1, 10**6), "Ki": 1024, "Mi": 1024**2,
            "Gi": 1024**3, "Ti": 1024**4, "Pi": 1024**5, "Ei": 1024**6}


@given(st.integers(min_value=-(10**12), max_value=10**12), st.sampled_from(sorted(SUFFIXES)))
def test_integer_with_suffix(n: int, suffix: str) -> None:
    assert parse(f"{n}{suffix}") == n * SUFFIXES[suffix]


@given(st.integers(min_value=0, max_value=10**9), st.integers(min_value=0, max_value=10**9),
       st.integers(min_value=0, max_value=9), st.sampled_from(["", "m", "k", "Mi", "Gi"]))
def test_decimal_with_suffix(whole: int, frac: int, zeros: int, suffix: str) -> None:
    digits = "0" * zeros + str(frac)
    value = (whole + Fraction(int(digits), 10 ** len(digits))) * SUFFIXES[suffix]
    assert parse(f"{whole}.{digits}{suffix}") == value
    # milli-units: exact when whole, else rounded up, never by a whole milli-unit or more
    milli = parse_milli(f"{whole}.{digits}{suffix}")
    assert 0 <= milli - value * 1000 < 1


@given(st.integers(min_value=-(10**6), max_value=10**6), st.integers(min_value=-30, max_value=30),
       st.sampled_from(["e", "E"]), st.sampled_from(["", "+"]))
def test_exponent(n: int, exp: int, e: str, plus: str) -> None:
    sign = plus if exp >= 0 else ""
    assert parse(f"{n}{e}{sign}{exp}") == n * Fraction(10) ** exp


@given(st.integers(min_value=-(10**15), max_value=10**15))
def test_milli_roundtrip(milli: int) -> None:
    assert parse_milli(f"{milli}m") == milli
    assert parse_milli(format_milli(milli)) == milli


@given(st.text(max_size=12))
def test_arbitrary_text_only_raises_value_error(s: str) -> None:
    try:
        v = parse(s)
    except ValueError:
        return
    assert isinstance(v, Fraction)
    assert parse_milli(s) == -((-v * 1000).__floor__())


@given(st.text(alphabet="0123456789.+-eEiKMGTPnumk", max_size=10))
def test_grammar_alphabet(s: str) -> None:
    """Whatever parses also matches upstream's (looser) quantity regular expression."""
    try:
        parse(s)
    except ValueError:
        return
    assert UPSTREAM_RE.fullmatch(s)
