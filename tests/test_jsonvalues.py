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


# A call body's quick path (schema.parse_call) against the general one (decode_call(parse_json(...))):
# same arguments and timeout, or the same error code and message, for every body.
CALL_BODIES = [
    b'{"args":[1]}', b'{"args": [1, "x", 2.5, true, null, -7]}', b'{"args":[]}', b'{}', b'', b'  ',
    b'{"args":[1],"timeout":0.5}', b'{"args":[1],"timeout":99999}', b'{"timeout":1}', b'{"args":[1],"timeout":0}',
    b'{"args":[1],"timeout":-1}', b'{"args":[1],"timeout":"1"}', b'{"args":[1],"timeout":1e400}',
    b'{"args":1}', b'{"args":"x"}', b'{"args":[1],"extra":2}', b'{"args":[1]', b'{"args":[1]}}', b'[1]', b'1',
    b'null', b'{"args":[1,]}', b'{"args":[18446744073709551616]}', b'{"args":[1e400]}', b'{"args":[NaN]}',
    b'{"args":["\\ud800"]}', b'{"args":["a\\"b"]}', b'{"args":[{"base64":"AAE="}]}', b'{"args":[[1]]}',
    b'{"args":["{"]}', b'{"args":["]"]}', b'{"args":[1]} x', b'{"args":[1],"args":[2]}', b'\x00{"args":[1]}',
    b'{"args":["\xc3\xa9"]}', b'{"args":["\xff"]}', b'{"ARGS":[1]}', b'{"args":[1], "timeout": null}',
]


def _outcome(fn):
    from hlpool.service.api_errors import ApiError

    try:
        args, timeout = fn()
        return ("ok", args, [type(a) for a in args], timeout)
    except ApiError as exc:
        return ("error", exc.code, str(exc))


@pytest.mark.parametrize("body", CALL_BODIES)
def test_the_quick_call_body_path_answers_as_the_general_one(body):
    from hlpool.service.schema import decode_call, parse_call, parse_json

    quick = _outcome(lambda: parse_call(body, 30.0))
    general = _outcome(lambda: decode_call(parse_json(body), 30.0))
    assert quick == general
