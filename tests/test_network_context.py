"""The network-aware prompt (switches.network_context_prompt): the status words, where the block and the
instruction go, prefix stability, the switch off, and the user's RTT from X-Client-RTT. No models."""
import asyncio
import types

import aiohttp
import pytest
from aiohttp.test_utils import make_mocked_request

from common.chat_template import CHATML, ChatTemplate
from edge.network_context import SYSTEM_INSTRUCTION, network_block, status_word, with_network_context
from edge.node import EdgeNode
from edge.user_rtt import BadClientRtt, header_rtt_ms, user_rtt_ms


def test_status_words_at_the_boundaries():
    assert [status_word(ms) for ms in (0, 99, 100, 300, 301, 2000)] == \
        ["Excellent", "Excellent", "Normal", "Normal", "Poor", "Poor"]
    assert status_word(99.6) == "Normal"           # the rounded RTT decides: the block shows 100 ms
    assert network_block(700.4) == "\n\n<network_context>\nRTT: 700 ms\nStatus: Poor\n</network_context>"


CONVERSATION = [{"role": "user", "content": "first question"}, {"role": "assistant", "content": "an answer"},
                {"role": "user", "content": "second question"}]


def test_block_goes_on_the_last_user_message_only_and_the_input_is_not_changed():
    before = [dict(m) for m in CONVERSATION]
    out = with_network_context(CONVERSATION, 250.0)
    assert CONVERSATION == before
    assert out[0] == {"role": "system", "content": SYSTEM_INSTRUCTION}
    assert out[1:3] == CONVERSATION[:2]                          # earlier turns untouched
    assert out[3] == {"role": "user", "content": "second question" + network_block(250.0)}
    assert "RTT: " not in "".join(m["content"] for m in out[:3])
    assert with_network_context(CONVERSATION, None)[1:] == CONVERSATION   # unknown RTT: instruction only


def test_the_request_s_own_system_message_follows_the_instruction_in_one_system_message():
    msgs = [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "hello"}]
    out = with_network_context(msgs, 20.0)
    assert [m["role"] for m in out] == ["system", "user"]
    assert out[0]["content"] == SYSTEM_INSTRUCTION + "\n\nAnswer in French."


def test_the_instruction_is_the_same_bytes_for_every_user():
    template = ChatTemplate(CHATML)
    a = template.render(with_network_context([{"role": "user", "content": "Write a haiku."}], 15.0))
    b = template.render(with_network_context([{"role": "user", "content": "Explain TCP."}], 900.0))
    c = template.render(with_network_context([{"role": "system", "content": "Be formal."},
                                              {"role": "user", "content": "Hi"}], 250.0))
    system = template.render([{"role": "system", "content": SYSTEM_INSTRUCTION}], add_generation_prompt=False)
    assert a.startswith(system) and b.startswith(system)       # a shared prefix: cached once for everyone
    assert c.startswith(system[:system.index("<|im_end|>")])   # ... up to where the request's own system text begins


def _node(switch: bool):
    """EdgeNode.encode_messages as the node runs it, with ChatML and a tokenizer that returns the text."""
    return types.SimpleNamespace(network_context=switch, template=ChatTemplate(CHATML),
                                 runner=types.SimpleNamespace(tokenize=lambda text: text))


def test_switch_off_leaves_the_prompt_unchanged_byte_for_byte():
    plain = ChatTemplate(CHATML).render(CONVERSATION)
    off = _node(False)
    assert EdgeNode.encode_messages(off, CONVERSATION, user_rtt_ms=700.0) == plain
    assert EdgeNode.encode_messages(off, CONVERSATION) == plain
    on = EdgeNode.encode_messages(_node(True), CONVERSATION, user_rtt_ms=700.0)
    assert on != plain and on.count("RTT: 700 ms") == 1 and "Status: Poor" in on
    with pytest.raises(ValueError, match="role"):               # bad messages are still named
        EdgeNode.encode_messages(_node(True), [{"role": "robot", "content": "x"}], user_rtt_ms=1.0)


def test_user_rtt_from_the_header_or_none():
    assert header_rtt_ms(None) is None and header_rtt_ms("250") == 250.0 and header_rtt_ms(" 12.5 ms") == 12.5
    for bad in ("fast", "-3", "nan", "inf"):
        with pytest.raises(BadClientRtt, match="X-Client-RTT"):
            header_rtt_ms(bad)
    assert user_rtt_ms(make_mocked_request("POST", "/", headers={"X-Client-RTT": "700"})) == 700.0


def test_the_edge_api_passes_the_header_on_and_refuses_a_bad_one():
    from tests.test_openai_api import FakeNode, chat, serving

    async def main():
        node = FakeNode()
        async with serving(node) as (http, url):
            async with http.post(url + "/v1/chat/completions", json=chat(), headers={"X-Client-RTT": "321"}) as r:
                assert r.status == 200
            assert node.user_rtt_ms == 321.0
            async with http.post(url + "/v1/chat/completions", json=chat()) as r:   # no header: the socket's RTT
                assert r.status == 200
            assert node.user_rtt_ms is not None and 0 <= node.user_rtt_ms < 1000   # loopback TCP_INFO
            async with http.post(url + "/v1/chat/completions", json=chat(), headers={"X-Client-RTT": "soon"}) as r:
                body = await r.json()
                assert r.status == 400 and body["error"]["param"] == "X-Client-RTT"
    asyncio.run(main())
