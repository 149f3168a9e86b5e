"""The judge against a real HTTP server on 127.0.0.1 speaking the chat/completions schema; scripted replies"""

from __future__ import annotations

import time

import pytest

from tests.fake_openai import FakeChatServer
from tunesmith.config import JudgeConfig, UserError
from tunesmith.eval.judge import judge, judge_summary, parse_judgement

ITEM = {"question": "What was Q3 revenue?", "reference": "$34 million", "answer": "34 million dollars"}


def scripted(script: list):
    """A reply function: each request takes the next (status, content) or "stall" (past the client timeout)"""
    script = list(script)

    def reply(body: dict) -> tuple[int, str]:
        step = script.pop(0)
        if step == "stall":
            time.sleep(0.6)
            return 200, '{"score": 1, "reason": "too late"}'
        return step

    return reply


@pytest.fixture
def server(request):
    srv = FakeChatServer(scripted(request.param))
    yield srv
    srv.close()


def cfg_for(srv: FakeChatServer, **extra) -> JudgeConfig:
    return JudgeConfig(base_url=srv.url, model="judge-1", timeout_s=extra.pop("timeout_s", 5.0), **extra)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"score": 4, "reason": "close"}', {"score": 4, "reason": "close"}),
        (
            'Sure!\n```json\n{"score": 5, "reason": "exact"}\n```\nHope this helps.',
            {"score": 5, "reason": "exact"},
        ),
        (
            'Here: {"reason": "wrong number", "score": "2"} trailing words {',
            {"score": 2, "reason": "wrong number"},
        ),
        ("<think>score 1? no</think>Score: 3\nReason: partly right", {"score": 3, "reason": "partly right"}),
        ("**Score:** 4/5", {"score": 4, "reason": ""}),
        ('{"score": 7, "reason": "out of range"}', None),
        ('{"score": 4.5}', None),
        ("Score: 10", None),
        ("I cannot grade this.", None),
    ],
)
def test_parse_judgement(text, expected):
    assert parse_judgement(text) == expected


@pytest.mark.parametrize(
    "server",
    [[(200, '{"score": 5, "reason": "exact"}'), (200, '```json\n{"score": 2, "reason": "off"}\n```')]],
    indirect=True,
)
def test_judge_scores_and_caches(server, tmp_path):
    cache = tmp_path / "judge_cache.jsonl"
    items = [ITEM, {**ITEM, "answer": "12 million"}]
    got = judge(cfg_for(server), items, cache)
    assert got == [{"score": 5, "reason": "exact"}, {"score": 2, "reason": "off"}]
    assert len(server.requests) == 2
    req = server.requests[0]
    assert req["path"] == "/v1/chat/completions" and req["body"]["model"] == "judge-1"
    assert "34 million dollars" in req["body"]["messages"][-1]["content"] and req["auth"] is None
    assert len(cache.read_text().splitlines()) == 2
    # second call: everything from the cache, zero requests (the script is empty: any request would fail)
    assert judge(cfg_for(server), items, cache) == got
    assert len(server.requests) == 2
    assert judge_summary([*got, None]) == {"judge_score": 3.5, "judge_failed": 1}


@pytest.mark.parametrize(
    "server",
    [[(200, "garbage, no score"), (500, "boom"), "stall", (200, 'Verdict {"score": 4, "reason": "ok"}')]],
    indirect=True,
)
def test_judge_retries_malformed_5xx_and_timeouts(server, tmp_path):
    got = judge(cfg_for(server, max_retries=3, timeout_s=0.3), [ITEM], tmp_path / "c.jsonl", backoff_s=0.01)
    assert got == [{"score": 4, "reason": "ok"}]
    assert len(server.requests) == 4


@pytest.mark.parametrize(
    "server", [[(200, "nope"), (200, "still nope"), (200, '{"score": 3, "reason": "r"}')]], indirect=True
)
def test_judge_gives_none_after_malformed_retries_and_does_not_cache_it(server, tmp_path):
    cache = tmp_path / "c.jsonl"
    assert judge(cfg_for(server, max_retries=1), [ITEM], cache, backoff_s=0.01) == [None]
    assert len(server.requests) == 2 and cache.read_text() == ""
    # the failure was not cached: the next run asks again
    assert judge(cfg_for(server, max_retries=0), [ITEM], cache) == [{"score": 3, "reason": "r"}]


@pytest.mark.parametrize("server", [[(503, "down"), (503, "down")]], indirect=True)
def test_judge_persistent_server_error_is_a_user_error(server, tmp_path):
    with pytest.raises(UserError, match=r"eval\.judge: .* failed 2 times \(HTTP 503"):
        judge(cfg_for(server, max_retries=1), [ITEM], tmp_path / "c.jsonl", backoff_s=0.01)


@pytest.mark.parametrize("server", [[(401, "bad key")]], indirect=True)
def test_judge_auth_header_and_non_retryable_status(server, tmp_path, monkeypatch):
    monkeypatch.setenv("TS_TEST_JUDGE_KEY", "sk-test")
    with pytest.raises(UserError, match="HTTP 401"):
        judge(cfg_for(server, api_key_env="TS_TEST_JUDGE_KEY"), [ITEM], tmp_path / "c.jsonl")
    assert len(server.requests) == 1 and server.requests[0]["auth"] == "Bearer sk-test"


def test_judge_missing_api_key_env_is_a_user_error(tmp_path, monkeypatch):
    monkeypatch.delenv("TS_TEST_NO_SUCH_KEY", raising=False)
    cfg = JudgeConfig(base_url="http://127.0.0.1:9/v1", model="m", api_key_env="TS_TEST_NO_SUCH_KEY")
    with pytest.raises(UserError, match="TS_TEST_NO_SUCH_KEY is not set") as e:
        judge(cfg, [ITEM], tmp_path / "c.jsonl")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "server", [[(503, "busy"), (200, "no score here"), (200, '{"score": 3, "reason": "r"}')]], indirect=True
)
def test_judge_format_retries_apart_from_http_retries(server, tmp_path):
    # the 503 is retried by the client (max_retries=1); the malformed reply is not asked again
    # (format_retries=0), although max_retries alone would have asked it once more
    cfg = cfg_for(server, max_retries=1, format_retries=0)
    assert judge(cfg, [ITEM], tmp_path / "c.jsonl", backoff_s=0.01) == [None]
    assert len(server.requests) == 2
