"""endpoint.ChatClient against a real HTTP server on 127.0.0.1 (tests/fake_openai.py), scripted replies."""

from __future__ import annotations

import socket
import sys
import time

import pytest

from tests.fake_openai import FakeChatServer
from tunesmith.config import UserError
from tunesmith.endpoint import ChatClient, EndpointFailed

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What was Q3 revenue?"}]


def scripted(*steps):
    """Each request takes the next step: (status, content), or ("stall", seconds) before a late 200."""
    steps = list(steps)

    def reply(body: dict) -> tuple[int, str | bytes]:
        status, content = steps.pop(0)
        if status == "stall":
            time.sleep(content)
            return 200, "too late"
        return status, content

    return reply


@pytest.fixture
def server(request):
    srv = FakeChatServer(scripted(*request.param))
    yield srv
    srv.close()


def one_line_error(kind: type, call) -> str:
    with pytest.raises(UserError) as e:
        call()
    assert type(e.value) is kind, type(e.value)
    assert "\n" not in str(e.value)
    return str(e.value)


@pytest.mark.parametrize("server", [[(200, "34 million dollars"), (200, "again")]], indirect=True)
def test_chat_returns_text_usage_latency_and_sends_only_the_settings_given(server, monkeypatch):
    monkeypatch.setenv(
        "OPENAI_API_KEY", "sk-not-for-this-server"
    )  # never sent: the key comes from api_key_env only
    with ChatClient(server.url, "gen-1", max_retries=0) as client:
        reply = client.chat(MESSAGES, max_tokens=16)
        client.chat(MESSAGES, max_tokens=8, temperature=0.7, top_p=0.9, stop=["\n\n"], seed=3)
    assert (reply.text, reply.finish_reason, reply.prompt_tokens, reply.completion_tokens, reply.retries) == (
        "34 million dollars",
        "stop",
        6,
        3,
        0,
    )
    assert reply.latency_s > 0
    first, second = server.requests
    assert first["path"] == "/v1/chat/completions" and first["auth"] is None
    assert first["body"] == {"model": "gen-1", "messages": MESSAGES, "max_tokens": 16, "temperature": 0.0}
    assert {k: second["body"][k] for k in ("temperature", "top_p", "stop", "seed")} == {
        "temperature": 0.7,
        "top_p": 0.9,
        "stop": ["\n\n"],
        "seed": 3,
    }


@pytest.mark.parametrize("server", [[(500, "overloaded"), (429, "slow down"), (200, "ok")]], indirect=True)
def test_retries_500_and_429_then_succeeds(server):
    reply = ChatClient(server.url, "m", max_retries=2).chat(MESSAGES, max_tokens=4)
    assert (reply.text, reply.retries, len(server.requests)) == ("ok", 2, 3)


@pytest.mark.parametrize("server", [[(503, "down"), (503, "down"), (200, "never asked")]], indirect=True)
def test_a_server_error_through_every_retry_is_endpoint_failed(server):
    msg = one_line_error(
        EndpointFailed,
        lambda: ChatClient(server.url, "m", max_retries=1, where="eval.judge").chat(MESSAGES, max_tokens=4),
    )
    assert msg == (
        f"eval.judge: {server.url}/chat/completions failed 2 times (HTTP 503: down; is the server up? "
        "raise eval.judge.max_retries)"
    )
    assert len(server.requests) == 2


@pytest.mark.parametrize(
    "server", [[("stall", 0.6), (200, "in time"), ("stall", 0.6), ("stall", 0.6)]], indirect=True
)
def test_a_timeout_is_retried_then_endpoint_failed(server):
    client = ChatClient(server.url, "m", timeout_s=0.2, max_retries=1, where="synth")
    assert client.chat(MESSAGES, max_tokens=4).text == "in time"
    msg = one_line_error(EndpointFailed, lambda: client.chat(MESSAGES, max_tokens=4))
    assert msg.startswith(f"synth: {server.url}/chat/completions failed 2 times (no answer within 0.2 s; ")
    assert msg.endswith("raise synth.max_retries or synth.timeout_s)")
    assert len(server.requests) == 4


@pytest.mark.parametrize("server", [[(200, "hi"), (401, "bad key")]], indirect=True)
def test_key_from_the_env_var_and_a_missing_one(server, monkeypatch):
    monkeypatch.delenv("TS_TEST_NO_SUCH_KEY", raising=False)
    msg = one_line_error(
        UserError, lambda: ChatClient(server.url, "m", api_key_env="TS_TEST_NO_SUCH_KEY", where="synth")
    )
    assert msg.startswith(
        "synth.api_key_env: environment variable TS_TEST_NO_SUCH_KEY is not set or empty (export "
    )
    monkeypatch.setenv("TS_TEST_KEY", "sk-test")
    client = ChatClient(server.url, "m", api_key_env="TS_TEST_KEY", max_retries=3)
    client.chat(MESSAGES, max_tokens=4)
    msg = one_line_error(UserError, lambda: client.chat(MESSAGES, max_tokens=4))  # 401 is not retried
    assert "answered HTTP 401 (bad key; check the key in TS_TEST_KEY)" in msg
    assert [r["auth"] for r in server.requests] == ["Bearer sk-test", "Bearer sk-test"]


def test_unreachable_endpoint_is_one_line():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = ChatClient(f"http://127.0.0.1:{port}/v1", "m", max_retries=1, where="eval.judge")
    msg = one_line_error(UserError, lambda: client.chat(MESSAGES, max_tokens=4))
    assert msg.startswith(
        f"eval.judge.base_url: cannot connect to http://127.0.0.1:{port}/v1/chat/completions ("
    )
    assert msg.endswith("; is the server running?)")


@pytest.mark.parametrize(
    "server", [[(404, "The model 'gpt-9' does not exist"), (200, b"<html>welcome</html>")]], indirect=True
)
def test_unknown_model_and_a_reply_that_is_not_a_chat_completion(server):
    client = ChatClient(server.url, "gpt-9", max_retries=2)
    msg = one_line_error(UserError, lambda: client.chat(MESSAGES, max_tokens=4))
    assert msg == (
        f"endpoint: {server.url}/chat/completions answered HTTP 404 (The model 'gpt-9' does not exist; "
        "is 'gpt-9' served there? check endpoint.model and endpoint.base_url)"
    )
    assert len(server.requests) == 1  # a 404 is not retried
    msg = one_line_error(UserError, lambda: client.chat(MESSAGES, max_tokens=4))
    assert msg.startswith(
        f"endpoint.base_url: {server.url}/chat/completions did not answer with a chat completion ("
    )


def test_without_the_openai_package_the_error_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "openai", None)  # import openai -> ImportError
    msg = one_line_error(UserError, lambda: ChatClient("http://127.0.0.1:9/v1", "m", where="eval.judge"))
    assert (
        msg
        == "eval.judge: OpenAI-compatible endpoints need the `openai` package (pip install 'tunesmith[eval]')"
    )


def _questions(source: str, first: int, n: int):
    """Questions 'Question i?' for i in [first, first + n), each from line i + 1 of `source`."""
    from tunesmith.data.formats import Example
    from tunesmith.eval.questions import Questions

    examples = [
        Example(where=f"{source}:{i + 1}", fields={"question": f"Question {i}?", "answer": "A."})
        for i in range(first, first + n)
    ]
    return Questions(examples, [], [], [f"Question {i}?" for i in range(first, first + n)], [], [])


def _answer_endpoint(url: str, concurrency: int, n_test: int, n_probe: int):
    """answer_endpoint for eval.endpoints.fake at `url`: test questions 0.., then probe questions after."""
    from tunesmith.config import load_config
    from tunesmith.eval.systems import Addons, System, answer_endpoint

    ep = f"{{base_url: '{url}', model: m, concurrency: {concurrency}, max_retries: 0}}"
    cfg = load_config(None, [f"eval.endpoints={{fake: {ep}}}", "eval.systems=[endpoint:fake]"])
    test, probe = _questions("test.jsonl", 0, n_test), _questions("train.jsonl", n_test, n_probe)
    return answer_endpoint(System("endpoint:fake", "endpoint:fake"), test, probe, Addons(), cfg)


def _index(body: dict) -> int:
    """i of the 'Question i?' asked."""
    return int(body["messages"][-1]["content"].split()[1].rstrip("?"))


def _sleep(i: int) -> float:
    # the first of each pair is slower, so replies come back out of order within every wave of requests
    return 0.4 if i % 2 == 0 else 0.2


def test_endpoint_questions_go_concurrency_at_a_time_answers_in_order_each_timed_alone():
    def reply(body: dict) -> tuple[int, str]:
        time.sleep(_sleep(_index(body)))
        return 200, f"answer {_index(body)}"

    server = FakeChatServer(reply)
    try:
        answers = _answer_endpoint(server.url, 4, n_test=6, n_probe=2)
        assert server.max_in_flight == 4  # 8 requests of 0.2-0.4 s: 4 in flight whenever 4 are left
        assert [c.text for c in answers.test] == [f"answer {i}" for i in range(6)]
        assert [c.text for c in answers.probe] == ["answer 6", "answer 7"]
        # each latency is its own request's: a second-wave answer is not charged the wave before it
        for i, latency in enumerate(answers.latencies):
            assert _sleep(i) <= latency < _sleep(i) + 0.2, (i, latency)
        assert answers.prompt_tokens == [2] * 8  # the fake counts words: "Question i?"
        serial = FakeChatServer(lambda body: (time.sleep(0.05), (200, "ok"))[1])
        try:
            _answer_endpoint(serial.url, 1, n_test=3, n_probe=0)
            assert (serial.max_in_flight, len(serial.requests)) == (1, 3)
        finally:
            serial.close()
    finally:
        server.close()


def test_a_failing_question_is_one_line_naming_endpoint_and_question_and_stops_the_rest():
    def reply(body: dict) -> tuple[int, str]:
        if _index(body) == 2:
            return 404, "The model 'm' does not exist"
        time.sleep(0.2)
        return 200, "fine"

    server = FakeChatServer(reply)
    try:
        msg = one_line_error(UserError, lambda: _answer_endpoint(server.url, 2, n_test=8, n_probe=0))
        assert msg.startswith(f"eval.endpoints.fake: {server.url}/chat/completions answered HTTP 404 (")
        assert msg.endswith(
            "check eval.endpoints.fake.model and eval.endpoints.fake.base_url) "
            "(asking test.jsonl:3: Question 2?)"
        )
        assert len(server.requests) < 8  # the questions not yet sent when it failed never were
    finally:
        server.close()
