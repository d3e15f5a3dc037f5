"""The official anthropic and openai SDKs, unmodified, through the llmd gateway.

Started by run.sh, which provides LLMD_GATEWAY (http://127.0.0.1:PORT), LLMD_GATEWAY_KEY,
SDK_PROFILE_KEY (the key llmd holds for every profile) and FAKE_ADMIN (the fake
providers' record of what they received). After each test the fakes must have seen the
profile's key on every request, and the gateway key on none.
"""

import json
import os
import urllib.request

import anthropic
import openai
import pytest

BASE = os.environ["LLMD_GATEWAY"]
KEY = os.environ["LLMD_GATEWAY_KEY"]
PROFILE_KEY = os.environ["SDK_PROFILE_KEY"]
ADMIN = os.environ["FAKE_ADMIN"]

# The fakes answer a last message containing this with a call of the first tool.
USE_TOOL = "use the tool"
SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}},
    "required": ["city"],
}
ANTHROPIC_TOOL = {"name": "get_weather", "description": "Weather of a city", "input_schema": SCHEMA}
OPENAI_TOOL = {
    "type": "function",
    "function": {"name": "get_weather", "description": "Weather of a city", "parameters": SCHEMA},
}
# Which fake answered, by profile.
SPEAKER = {"an": "anthropic", "oa": "openai", "gm": "gemini"}


def recorded():
    with urllib.request.urlopen(ADMIN + "/requests", timeout=10) as r:
        return json.load(r)


@pytest.fixture(autouse=True)
def keys_checked():
    urllib.request.urlopen(urllib.request.Request(ADMIN + "/reset", method="POST"), timeout=10)
    yield
    for r in recorded():
        values = list(r["headers"].values())
        assert not any(KEY in v for v in values), f"gateway key reached the provider: {r['path']}"
        assert KEY not in r["path"]
        assert any(PROFILE_KEY in v for v in values), f"no profile key on {r['path']}"


def claude():
    return anthropic.Anthropic(base_url=f"{BASE}/p/an", api_key=KEY, max_retries=0, timeout=30)


def oai(profile):
    return openai.OpenAI(base_url=f"{BASE}/p/{profile}/v1", api_key=KEY, max_retries=0, timeout=30)


def test_anthropic_messages_with_a_tool_call():
    c = claude()
    ask = {"role": "user", "content": USE_TOOL}
    m = c.messages.create(model="claude-x", max_tokens=100, tools=[ANTHROPIC_TOOL], messages=[ask])
    assert m.stop_reason == "tool_use"
    call = next(b for b in m.content if b.type == "tool_use")
    assert (call.name, call.input) == ("get_weather", {"city": "Paris"})
    result = {"type": "tool_result", "tool_use_id": call.id, "content": "sunny"}
    m = c.messages.create(
        model="claude-x",
        max_tokens=100,
        tools=[ANTHROPIC_TOOL],
        messages=[ask, {"role": "assistant", "content": m.content}, {"role": "user", "content": [result]}],
    )
    assert m.content[0].text == "The tool said: sunny"
    assert m.usage.input_tokens > 0


def test_anthropic_messages_streaming_with_a_tool_call():
    c = claude()
    with c.messages.stream(model="claude-x", max_tokens=100, messages=[{"role": "user", "content": "hi"}]) as s:
        text = "".join(s.text_stream)
    assert text == "Hello from anthropic"
    with c.messages.stream(
        model="claude-x",
        max_tokens=100,
        tools=[ANTHROPIC_TOOL],
        messages=[{"role": "user", "content": USE_TOOL}],
    ) as s:
        kinds = [e.type for e in s]
        final = s.get_final_message()
    assert "input_json" in kinds, kinds
    call = next(b for b in final.content if b.type == "tool_use")
    assert (call.name, call.input) == ("get_weather", {"city": "Paris"})
    assert final.stop_reason == "tool_use"


def test_anthropic_wrong_key_is_an_authentication_error():
    c = anthropic.Anthropic(base_url=f"{BASE}/p/an", api_key="llmd-gw-wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError):
        c.messages.create(model="claude-x", max_tokens=10, messages=[{"role": "user", "content": "hi"}])
    assert recorded() == []


@pytest.mark.parametrize("profile", ["oa", "an", "gm"])
def test_chat_completions_with_a_tool_call(profile):
    c = oai(profile)
    ask = {"role": "user", "content": USE_TOOL}
    r = c.chat.completions.create(model="m", messages=[ask], tools=[OPENAI_TOOL])
    assert r.choices[0].finish_reason == "tool_calls"
    call = r.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    r = c.chat.completions.create(
        model="m",
        tools=[OPENAI_TOOL],
        messages=[
            ask,
            r.choices[0].message.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": call.id, "content": "sunny"},
        ],
    )
    assert r.choices[0].message.content == "The tool said: sunny"
    assert r.usage.total_tokens > 0


@pytest.mark.parametrize("profile", ["oa", "an", "gm"])
def test_chat_completions_streaming_with_a_tool_call(profile):
    c = oai(profile)
    chunks = c.chat.completions.create(
        model="m", stream=True, messages=[{"role": "user", "content": "hi"}]
    )
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == f"Hello from {SPEAKER[profile]}"
    chunks = c.chat.completions.create(
        model="m",
        stream=True,
        stream_options={"include_usage": True},
        tools=[OPENAI_TOOL],
        messages=[{"role": "user", "content": USE_TOOL}],
    )
    name, args, finish, usage = "", "", None, None
    for ch in chunks:
        if ch.usage:
            usage = ch.usage
        for choice in ch.choices:
            for t in choice.delta.tool_calls or []:
                name += t.function.name or "" if t.function else ""
                args += t.function.arguments or "" if t.function else ""
            finish = choice.finish_reason or finish
    assert name == "get_weather"
    assert json.loads(args) == {"city": "Paris"}
    assert finish == "tool_calls"
    if profile != "oa":
        # The translated route always reports usage when asked.
        assert usage is not None and usage.total_tokens > 0


def test_openai_embeddings():
    r = oai("oa").embeddings.create(model="text-embedding-3-small", input=["one", "two"])
    assert len(r.data) == 2
    assert len(r.data[0].embedding) > 0


def test_openai_wrong_key_is_an_authentication_error():
    c = openai.OpenAI(base_url=f"{BASE}/p/oa/v1", api_key="llmd-gw-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        c.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    assert recorded() == []


@pytest.mark.parametrize("profile", ["gm", "oa"])
def test_anthropic_sdk_on_other_providers_through_the_translated_route(profile):
    c = anthropic.Anthropic(base_url=f"{BASE}/p/{profile}", api_key=KEY, max_retries=0, timeout=30)
    with c.messages.stream(
        model="m", max_tokens=100, tools=[ANTHROPIC_TOOL], messages=[{"role": "user", "content": USE_TOOL}]
    ) as s:
        final = s.get_final_message()
    call = next(b for b in final.content if b.type == "tool_use")
    assert (call.name, call.input) == ("get_weather", {"city": "Paris"})
    m = c.messages.create(model="m", max_tokens=100, messages=[{"role": "user", "content": "hi"}])
    assert m.content[0].text == f"Hello from {SPEAKER[profile]}"
