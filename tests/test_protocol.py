import pytest
from pydantic import ValidationError

from common.protocol import DraftDist, SamplingParams, VerifyRequest, VerifyResponse, Timing, validation_message


def test_round_trip():
    req = VerifyRequest(session_id="s1", seq=3, base_len=10, append=[1, 2], draft=[5, 6, 7],
                        draft_dists=[DraftDist(ids=[5, 9], probs=[0.75, 0.25]), DraftDist(ids=[6], probs=[1.0]),
                                     DraftDist(ids=[7, 8], probs=[0.5, 0.5])],
                        sampling=SamplingParams(temperature=0.7, seed=4), rtt_ms=12.5)
    again = VerifyRequest.model_validate_json(req.model_dump_json())
    assert again == req
    resp = VerifyResponse(session_id="s1", seq=3, accepted=2, next_token=11, committed_len=15,
                          timing=Timing(queue_ms=0.1, compute_ms=20, server_ms=21))
    assert VerifyResponse.model_validate_json(resp.model_dump_json()) == resp


@pytest.mark.parametrize("bad, field", [
    ({"seq": "1"}, "seq"),                         # wrong type (strict: no coercion)
    ({"draft": ["2"]}, "draft.0"),                 # a string for a token id (an empty draft is fine: round 0)
    ({"draft": [-1]}, "draft.0"),                  # negative id
    ({"surprise": 1}, "surprise"),                 # unknown field
    ({"base_len": 0, "append": []}, None),         # first round without a prompt
    ({"session_id": "a b"}, "session_id"),         # bad session id
    ({"sampling": {"temperature": 0.5}}, None),    # sampling without draft_dists
    ({"reuse_cache": 1}, "reuse_cache"),           # int for bool
])
def test_rejects_bad_requests(bad, field):
    base = {"session_id": "s", "seq": 0, "base_len": 0, "append": [1], "draft": [2]}
    with pytest.raises(ValidationError) as e:
        VerifyRequest.model_validate(base | bad)
    message, first = validation_message(e.value)
    assert message
    if field:
        assert first == field


def test_draft_dist_checks():
    with pytest.raises(ValidationError, match="sum"):
        DraftDist(ids=[1, 2], probs=[0.5, 0.2])
    with pytest.raises(ValidationError, match="repeat"):
        DraftDist(ids=[1, 1], probs=[0.5, 0.5])
    with pytest.raises(ValidationError, match="not in draft_dists"):
        VerifyRequest(session_id="s", seq=0, base_len=0, append=[1], draft=[3],
                      draft_dists=[DraftDist(ids=[4], probs=[1.0])], sampling=SamplingParams(temperature=1.0))
