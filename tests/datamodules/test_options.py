"""Option range rules: what they accept, and the one-line message naming the option and the rule."""

import math

import pytest

from lfmri_utils.errors import InputError
from lfmri_utils.options import check_options, number, ordered_range, sequence


def test_numbers_bounds_integers_and_null():
    positive = number(0, low_open=True)
    assert positive(1e-9) and positive(3)
    assert not any(positive(v) for v in (0, -1, math.nan, math.inf, True, "1", None, [1]))
    fraction = number(0, 1, high_open=True)
    assert fraction(0) and fraction(0.99) and not fraction(1)
    size = number(8, integer=True, optional=True)
    assert size(None) and size(8) and not size(8.0) and not size(7)
    assert (positive.text, fraction.text, size.text) == ("a number > 0", "a number in [0, 1)",
                                                        "null or an integer >= 8")


def test_lists_and_ranges():
    levels = sequence(number(1, integer=True), min_len=1)
    assert levels([1, 2, 2]) and levels((1,)) and not levels([]) and not levels([1, 0]) and not levels("12")
    assert levels.text == "a non-empty list of integers >= 1"
    t0 = ordered_range(0, 1)
    assert t0([0.05, 0.3]) and t0((0.2, 0.2)) and not t0([0.3, 0.05]) and not t0([0.1, 2]) and not t0([1])


def test_the_first_bad_option_is_named_on_one_line():
    rules = {"lr": number(0, low_open=True), "t0": ordered_range(0, 1)}
    check_options({"lr": 1e-3, "t0": (0.1, 0.2)}, rules)
    message = r"^t0 must be a range \[min, max\] with min <= max, both in \[0, 1\], got \[0\.3, 0\.1\]$"
    with pytest.raises(InputError, match=message):
        check_options({"lr": 1e-3, "t0": (0.3, 0.1)}, rules)
