"""The shared comparisons: ``state.layout_problems`` (two state dicts' keys, shapes and dtypes),
``spec.spec_differences`` (two ModelSpecs, field by field) and ``StateMismatchError.listing``
(how a comparison's problems are reported)."""

from __future__ import annotations

import re
from dataclasses import fields

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from keisei_fn.errors import StateMismatchError
from keisei_fn.spec import ModelSpec, describe_spec_differences, spec_differences
from keisei_fn.state import Layout, describe_layout, layout_problems, tensor_layout
from keisei_fn.testing import model_specs

DTYPES = ("float32", "float64", "int64", "bfloat16")
KEYS = st.text("abcdefgh.", min_size=1, max_size=6)
LAYOUTS = st.tuples(st.sampled_from(DTYPES), st.lists(st.integers(0, 3), max_size=3).map(tuple))
STATE_DICTS = st.dictionaries(KEYS, LAYOUTS, max_size=12)


def named(line: str) -> int:
    """How many keys a line names (``'key'`` or ``'key' (...)`` items before any ``and N``)."""
    listed = line.split(": ", 1)[1].rsplit(" and ", 1)[0]
    return len(re.findall(r"'[^']*'(?: \([^)]*\))?(?:, |$)", listed))


@settings(max_examples=200, deadline=None)
@given(STATE_DICTS, STATE_DICTS, st.integers(1, 4))
def test_layout_problems_summarise_every_difference(
    found: dict[str, Layout], expected: dict[str, Layout], shown: int
) -> None:
    problems = layout_problems(found, expected, shown=shown)
    assert (problems == []) == (found == expected)
    assert len(problems) <= 4  # one line per kind of difference, however many keys differ
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    common = [k for k in expected if k in found]
    counts = [
        len(missing),
        len(unexpected),
        sum(found[k][1] != expected[k][1] for k in common),
        sum(found[k][0] != expected[k][0] for k in common),
    ]
    nonzero = [n for n in counts if n]
    assert len(problems) == len(nonzero)
    for line, n in zip(problems, nonzero, strict=True):
        assert line.startswith(f"{n} tensor{'s' if n > 1 else ''} ")  # how many in all
        assert named(line) == min(n, shown)  # the first ones named, the rest counted
        assert line.endswith(f" and {n - shown} more") == (n > shown)
    if missing:
        assert f"in the state: {missing[0]!r}" in problems[0]  # in the expected side's order
    assert layout_problems(found, found) == []


def test_layout_problems_take_tensors_or_layouts_and_name_both_sides() -> None:
    live = {"w": torch.zeros(2, 3), "n": torch.zeros((), dtype=torch.int64)}
    assert layout_problems(live, {k: tensor_layout(t) for k, t in live.items()}) == []
    assert layout_problems(
        {"w": ("float16", (2, 3)), "n": live["n"]},
        live,
        found_name="the checkpoint",
        expected_name="the network",
    ) == [
        "1 tensor has another dtype: 'w' (the checkpoint has float16[2, 3], the network "
        "float32[2, 3])"
    ]
    assert describe_layout(tensor_layout(live["w"])) == "float32[2, 3]"


@settings(max_examples=100, deadline=None)
@given(model_specs(), model_specs())
def test_spec_differences_are_the_differing_fields_in_order(a: ModelSpec, b: ModelSpec) -> None:
    differences = spec_differences(a, b)
    assert differences == tuple(
        (f.name, getattr(a, f.name), getattr(b, f.name))
        for f in fields(ModelSpec)
        if getattr(a, f.name) != getattr(b, f.name)
    )
    assert (differences == ()) == (a == b)
    assert spec_differences(b, a) == tuple((n, y, x) for n, x, y in differences)
    line = describe_spec_differences(a, b)
    assert (line == "") == (a == b)
    assert all(f"{n} {x!r} vs {y!r}" in line for n, x, y in differences)


def test_a_listing_is_a_header_and_a_line_per_problem() -> None:
    error = StateMismatchError.listing("state (step 3) does not fit the live objects", ["a", "b"])
    assert isinstance(error, StateMismatchError)
    assert str(error) == "state (step 3) does not fit the live objects:\n  - a\n  - b"
