"""Numbers in every written form, the first thing issue #10 pointed at.

"…with 7 billion parameter…" never worked in float16 while "seven billion" sometimes did, and
"just putting an integer into the prompt" triggered the NaN: so `numbers()` draws digits, spelled
words, units, dates, scientific notation, special values and more (see `NUMBER_FORMS`), with the
plain integer first so that shrinking heads to "0". `spell_number` and `roman_numeral` are the
plain converters the forms use.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterable

from hypothesis import strategies as st
from hypothesis.strategies import SearchStrategy

from fuzz.strategies.vocabulary import _select, _uniform_one_of

_DIGITS = "0123456789"

_ONES = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
    "nineteen",
)
_TENS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")
_SCALES = ((10**12, "trillion"), (10**9, "billion"), (10**6, "million"), (10**3, "thousand"))
_ORDINAL_WORDS = (
    "first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth",
    "eleventh", "twelfth", "twentieth", "hundredth", "thousandth", "millionth",
)
_ROMAN = (
    (1000, "M"), (900, "CM"), (500, "D"), (400, "CD"), (100, "C"), (90, "XC"), (50, "L"),
    (40, "XL"), (10, "X"), (9, "IX"), (5, "V"), (4, "IV"), (1, "I"),
)
_UNITS = (
    "B", "M", "K", "GB", "GiB", "MB", "MiB", "kB", "TB", "ms", "s", "µs", "ns", "min", "h",
    "GHz", "MHz", "Hz", "W", "kW", "V", "mA", "°C", "°F", "K", "km", "m", "cm", "mm", "nm",
    "kg", "g", "mg", "L", "mL", "mol", "Pa", "bar", "dB", "px", "fps", "TFLOPS", "tok/s",
    "km/h", "mph", "bit", "x",
)
_MONTHS = (
    "January", "February", "March", "April", "May", "June", "July", "August", "September",
    "October", "November", "December",
)
# Numbers with a story: float16's max (65504) and its neighbours, IEEE specials, integer limits,
# float artefacts. The first is the plainest.
_SPECIAL_NUMBERS = (
    "0.1", "65504", "65505", "65535", "65536", "-0", "-0.0", "NaN", "nan", "inf", "-inf",
    "Infinity", "1e308", "3.4028235e38", "2147483647", "4294967296", "9007199254740993",
    "3.141592653589793", "2.718281828", "6.02214076e23", "1e-45", "5.96e-8",
    "0.30000000000000004",
)


def spell_number(n: int) -> str:
    """American English words for an integer, e.g. 7_000_000_000 -> 'seven billion'."""
    if n < 0:
        return "minus " + spell_number(-n)
    if n < 20:
        return _ONES[n]
    if n < 100:
        tens, ones = divmod(n, 10)
        return _TENS[tens] + (f"-{_ONES[ones]}" if ones else "")
    if n < 1000:
        hundreds, rest = divmod(n, 100)
        return f"{_ONES[hundreds]} hundred" + (f" {spell_number(rest)}" if rest else "")
    if n >= 1000 * _SCALES[0][0]:
        raise ValueError(f"spell_number: {n} is too large (limit {1000 * _SCALES[0][0] - 1})")
    for scale, word in _SCALES:
        if n >= scale:
            head, rest = divmod(n, scale)
            return f"{spell_number(head)} {word}" + (f" {spell_number(rest)}" if rest else "")
    raise AssertionError("unreachable")


def roman_numeral(n: int) -> str:
    """Roman numeral for 1 <= n <= 3999, e.g. 2024 -> 'MMXXIV'."""
    if not 1 <= n <= 3999:
        raise ValueError(f"roman_numeral: {n} is outside 1..3999")
    parts = []
    for value, letters in _ROMAN:
        count, n = divmod(n, value)
        parts.append(letters * count)
    return "".join(parts)


def _ordinal(n: int) -> str:
    suffix = "th" if n % 100 in (11, 12, 13) else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _format_date(day: dt.date, style: str) -> str:
    month = _MONTHS[day.month - 1]
    return {
        "iso": f"{day:%Y-%m-%d}",
        "dmy": f"{day:%d/%m/%Y}",
        "mdy": f"{day:%m/%d/%Y}",
        "dotted": f"{day:%d.%m.%Y}",
        "us_long": f"{month} {day.day}, {day.year}",
        "eu_long": f"{day.day} {month} {day.year}",
        "month_year": f"{month[:3]} {day.year}",
    }[style]


def _format_time(moment: dt.datetime, style: str) -> str:
    hour12 = moment.hour % 12 or 12
    meridiem = "am" if moment.hour < 12 else "pm"
    return {
        "hm": f"{moment:%H:%M}",
        "hms": f"{moment:%H:%M:%S}",
        "twelve_hour": f"{hour12}:{moment:%M} {meridiem}",
        "millis": f"{moment:%H:%M:%S}.{moment.microsecond // 1000:03d}",
        "iso": f"{moment:%Y-%m-%dT%H:%M:%S}Z",
        "log": f"{moment:%Y-%m-%d %H:%M:%S}",
    }[style]


def _join(*parts: str) -> str:
    return "".join(parts)


def _digit_string(min_size: int, max_size: int) -> SearchStrategy[str]:
    return st.text(alphabet=_DIGITS, min_size=min_size, max_size=max_size)


def _decimal() -> SearchStrategy[str]:
    # "0.0" is the simplest decimal; the fraction keeps leading zeros ("3.05") as free digits.
    return st.builds(lambda whole, frac: f"{whole}.{frac}", st.integers(0, 10**6),
                     _digit_string(1, 8))


def _quantity() -> SearchStrategy[str]:
    """A short plain magnitude: '7', '3.5', '640'."""
    return st.one_of(
        st.integers(0, 999).map(str),
        st.builds(lambda whole, tenths: f"{whole}.{tenths}", st.integers(0, 999),
                  st.integers(0, 99)),
    )


def _scientific() -> SearchStrategy[str]:
    mantissa = st.one_of(
        st.integers(1, 9).map(str),
        st.builds(lambda lead, frac: f"{lead}.{frac}", st.integers(1, 9), _digit_string(1, 6)),
    )
    styles = st.sampled_from(("{m}e{s}{x}", "{m}E{s}{x}", "{m} × 10^{s}{x}", "{m}x10^{s}{x}"))
    return st.builds(
        lambda style, m, s, x: style.format(m=m, s=s, x=x),
        styles, mantissa, st.sampled_from(("", "-", "+")), st.integers(0, 308),
    )


def _hexadecimal() -> SearchStrategy[str]:
    return st.builds(lambda n, upper: f"0x{n:X}" if upper else f"0x{n:x}",
                     st.integers(0, 2**64 - 1), st.booleans())


def _thousands() -> SearchStrategy[str]:
    # Comma, space, underscore, dot (European), apostrophe (Swiss), narrow and plain no-break
    # space: each tokenizes differently.
    separators = st.sampled_from((",", " ", "_", ".", "'", "\u202f", "\u00a0"))
    return st.builds(lambda n, sep: f"{n:,}".replace(",", sep), st.integers(1000, 10**15),
                     separators)


def _negative() -> SearchStrategy[str]:
    # ASCII hyphen-minus and the Unicode minus sign tokenize differently.
    body = st.one_of(st.integers(1, 10**9).map(str), _decimal())
    return st.builds(_join, st.sampled_from(("-", "−")), body)


def _fraction() -> SearchStrategy[str]:
    return st.one_of(
        st.builds(lambda a, b: f"{a}/{b}", st.integers(0, 99), st.integers(1, 99)),
        st.sampled_from(("½", "¼", "¾", "⅓", "⅔", "⅛")),
        st.builds(lambda whole, a, b: f"{whole} {a}/{b}", st.integers(1, 99),
                  st.integers(1, 9), st.integers(2, 16)),
        st.sampled_from(("one half", "a third", "two thirds", "three quarters", "one eighth")),
    )


def _percentage() -> SearchStrategy[str]:
    return st.builds(_join, _quantity(), st.sampled_from(("%", " %", " percent")))


def _ordinals() -> SearchStrategy[str]:
    return st.one_of(st.integers(1, 10**4).map(_ordinal), st.sampled_from(_ORDINAL_WORDS))


def _spelled() -> SearchStrategy[str]:
    scale_words = st.sampled_from(("thousand", "million", "billion", "trillion"))
    return st.one_of(
        st.integers(0, 10**12).map(spell_number),
        # "seven billion" (sometimes worked in issue #10) and "7 billion" (never did).
        st.builds(lambda n, scale: f"{spell_number(n)} {scale}", st.integers(1, 999), scale_words),
        st.builds(lambda q, scale: f"{q} {scale}", _quantity(), scale_words),
    )


def _roman() -> SearchStrategy[str]:
    return st.builds(lambda n, lower: roman_numeral(n).lower() if lower else roman_numeral(n),
                     st.integers(1, 3999), st.booleans())


def _unit() -> SearchStrategy[str]:
    return st.builds(_join, _quantity(), st.sampled_from(("", " ")), st.sampled_from(_UNITS))


def _currency() -> SearchStrategy[str]:
    prefixed = st.builds(_join, st.sampled_from(("$", "€", "£", "¥", "₹", "₩")), _quantity(),
                         st.sampled_from(("", "K", "M", "B", " million", " billion")))
    suffixed = st.builds(_join, _quantity(), st.sampled_from((" USD", " EUR", " JPY", " BTC")))
    return st.one_of(prefixed, suffixed)


def _power() -> SearchStrategy[str]:
    superscripts = str.maketrans("0123456789-", "⁰¹²³⁴⁵⁶⁷⁸⁹⁻")
    return st.builds(
        lambda base, style, exponent: (
            f"{base}{exponent.translate(superscripts)}" if style == "sup"
            else f"{base}{style}{exponent}"
        ),
        st.integers(2, 10), st.sampled_from(("^", "**", "sup")),
        st.builds(_join, st.sampled_from(("", "-")), st.integers(0, 64).map(str)),
    )


def _version() -> SearchStrategy[str]:
    return st.builds(
        lambda prefix, parts, suffix: prefix + ".".join(map(str, parts)) + suffix,
        st.sampled_from(("", "v")), st.lists(st.integers(0, 99), min_size=2, max_size=4),
        st.sampled_from(("", "-rc1", "-beta.2", "a1", ".dev0", "+cu121")),
    )


def _ip_address() -> SearchStrategy[str]:
    return st.builds(
        lambda octets, tail: ".".join(map(str, octets)) + tail,
        st.lists(st.integers(0, 255), min_size=4, max_size=4),
        st.sampled_from(("", "/24", ":8080", ":443")),
    )


def _date() -> SearchStrategy[str]:
    styles = st.sampled_from(("iso", "dmy", "mdy", "dotted", "us_long", "eu_long", "month_year"))
    days = st.dates(min_value=dt.date(1900, 1, 1), max_value=dt.date(2099, 12, 31))
    return st.builds(_format_date, days, styles)


def _time() -> SearchStrategy[str]:
    styles = st.sampled_from(("hm", "hms", "twelve_hour", "millis", "iso", "log"))
    moments = st.datetimes(min_value=dt.datetime(1970, 1, 1),
                           max_value=dt.datetime(2099, 12, 31, 23, 59, 59))
    return st.builds(_format_time, moments, styles)


def _number_range() -> SearchStrategy[str]:
    return st.builds(lambda a, sep, b: f"{a}{sep}{b}", st.integers(0, 999),
                     st.sampled_from(("-", "–", " to ", "..", "~")), st.integers(0, 9999))


_NUMBER_FORM_BUILDERS: dict[str, Callable[[], SearchStrategy[str]]] = {
    # Digit strings, not st.integers: a trigger digit inside "287" shrinks to "7" by deleting
    # characters, which integer shrinking (toward 0 by value) cannot do.
    "integer": lambda: _digit_string(1, 2),
    "big_integer": lambda: _digit_string(3, 19),
    "negative": _negative,
    "decimal": _decimal,
    "fraction": _fraction,
    "percentage": _percentage,
    "ordinal": _ordinals,
    "spelled": _spelled,
    "roman": _roman,
    "unit": _unit,
    "currency": _currency,
    "thousands": _thousands,
    "scientific": _scientific,
    "hex": _hexadecimal,
    "power": _power,
    "version": _version,
    "ip_address": _ip_address,
    "date": _date,
    "time": _time,
    "range": _number_range,
    "digit_run": lambda: _digit_string(10, 128),
    "special": lambda: st.sampled_from(_SPECIAL_NUMBERS),
}
# Simplest form first: `numbers()` shrinks toward an integer, and an integer toward "0".
NUMBER_FORMS: tuple[str, ...] = tuple(_NUMBER_FORM_BUILDERS)


def numbers(forms: Iterable[str] | str | None = None) -> SearchStrategy[str]:
    """Draw a number written in one of `NUMBER_FORMS` (all of them when `forms` is None).

    Forms: small and big integers, negatives (ASCII and Unicode minus), decimals, fractions
    (1/2, ½, 1 3/4, two thirds), percentages, ordinals (21st, twelfth), spelled-out numbers
    ("seven billion", "7 billion", "forty-two"), roman numerals, units (7B, 3.5 GHz, 12 ms,
    64 GiB), currency, thousands separators (1,000,000 and 1 000 000 and 1'000), scientific
    notation (1.5e-3, 6.02E23, 6 × 10^23), hex (0x1F), powers (2^10, 10⁻⁶), versions (v2.13.0),
    IPv4 addresses, dates (2024-03-15, 15/03/2024, March 15, 2024), times (14:30, 2:30 pm, ISO),
    ranges (3-5), long digit runs, and special values (65504, NaN, inf, 1e-45).

    Shrinks toward the first selected form and, within a form, toward its smallest value:
    with all forms, toward the integer "0". Raises ValueError naming the valid forms for an
    unknown one.
    """
    names = _select(forms, NUMBER_FORMS, "number form")
    return _uniform_one_of(_NUMBER_FORM_BUILDERS[name]() for name in names)

