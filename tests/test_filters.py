"""The filter language: parsing, validation and the reference semantics."""

from __future__ import annotations

import pytest

from m3connect.filters import (
    And,
    Eq,
    Field,
    FilterError,
    In,
    Not,
    Or,
    Range,
    RawFilter,
    matches,
    parse_filter,
)

DOC = {"lang": "ko", "year": 2019, "rating": 4.5, "draft": False, "tags": ["a", "b"], "n": 1}


def test_dict_and_field_forms_build_the_same_tree():
    from_dict = parse_filter(
        {"lang": "ko", "year": {"$gte": 2010, "$lt": 2020}, "tags": {"$in": ["a"]}}
    )
    from_fields = And((Eq("lang", "ko"), Range("year", gte=2010, lt=2020), In("tags", ("a",))))
    assert from_dict == from_fields
    assert (Field("lang") == "ko") & (Field("year") >= 2010) == And(
        (Eq("lang", "ko"), Range("year", gte=2010))
    )
    assert ~(Field("lang") == "en") == Not(Eq("lang", "en"))
    assert parse_filter({"lang": {"$ne": "en"}}) == Not(Eq("lang", "en"))
    assert parse_filter({"$or": [{"lang": "ko"}, {"draft": True}]}) == Or(
        (Eq("lang", "ko"), Eq("draft", True))
    )
    assert parse_filter({}) is None and parse_filter(None) is None


@pytest.mark.parametrize(
    "spec, expected",
    [
        ({"lang": "ko"}, True),
        ({"lang": "en"}, False),
        ({"year": 2019.0}, True),  # 1 == 1.0
        ({"n": True}, False),  # a bool never equals a number
        ({"draft": False}, True),
        ({"draft": 0}, False),
        ({"tags": "b"}, True),  # a stored list matches if any element does
        ({"tags": {"$in": ["x", "a"]}}, True),
        ({"missing": "x"}, False),
        ({"missing": {"$ne": "x"}}, True),  # Not of a condition on a missing key is true
        ({"missing": {"$gte": 0}}, False),
        ({"lang": {"$gt": 1}}, False),  # ranges compare numbers only
        ({"rating": {"$gt": 4.0, "$lte": 4.5}}, True),
        ({"rating": {"$gt": 4.5}}, False),
        ({"$not": {"lang": "ko"}}, False),
        ({"$and": [{"lang": "ko"}, {"year": {"$lt": 2000}}]}, False),
        ({"$or": [{"lang": "en"}, {"year": {"$lt": 2020}}]}, True),
        ({"lang": {"$nin": ["en", "de"]}}, True),
    ],
)
def test_reference_semantics(spec, expected):
    assert matches(parse_filter(spec), DOC) is expected


@pytest.mark.parametrize(
    "bad",
    [
        {"year": {"$regex": "19.*"}},
        {"$xor": [{"a": 1}]},
        {"year": {"$gt": "2019"}},
        {"year": {"$gt": float("nan")}},
        {"tags": {"$in": "a"}},
        {"tags": {"$in": []}},
        {"lang": ["ko"]},
        {"$or": []},
        {"": 1},
        42,
    ],
)
def test_malformed_filters_name_the_problem(bad):
    with pytest.raises(FilterError):
        parse_filter(bad)


def test_raw_filters_pass_through_untouched():
    raw = RawFilter({"term": {"x": 1}})
    assert parse_filter(raw) is raw
