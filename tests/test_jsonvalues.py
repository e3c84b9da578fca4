"""hlpool values <-> JSON (no KVM needed)."""

import json
import math

import pytest

from hlpool.errors import CallError
from hlpool.service.jsonvalues import from_json, to_json


@pytest.mark.parametrize("value", [None, True, 1, -2.5, "s", b"\x00\xff", [1, [b"x"]], {"a": {"b": b""}}])
def test_round_trip(value):
    assert from_json(json.loads(json.dumps(to_json(value), allow_nan=False))) == value


def test_non_finite_floats_are_valid_json():
    text = json.dumps(to_json([math.inf, -math.inf, math.nan]), allow_nan=False)
    inf, minus_inf, nan = from_json(json.loads(text))
    assert inf == math.inf and minus_inf == -math.inf and math.isnan(nan)


@pytest.mark.parametrize("bad", [{"base64": "!!"}, {"float": "huge"}])
def test_malformed_tagged_values(bad):
    with pytest.raises(CallError):
        from_json(bad)


def test_ordinary_dicts_with_those_keys_stay_dicts():
    assert from_json({"base64": 1}) == {"base64": 1}
    assert from_json({"float": "nan", "other": 1}) == {"float": "nan", "other": 1}
