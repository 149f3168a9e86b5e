"""LLM-as-judge over any OpenAI-compatible endpoint: a 1-5 rubric score and a short reason per answer.

Requests go through endpoint.py's `ChatClient`, made by `chat_client` from eval.judge exactly as for the
endpoint systems (the official `openai` client: eval.judge.max_retries HTTP retries with backoff, timeouts,
the key from eval.judge.api_key_env); a reply that is not in the rubric's format is asked again here
(eval.judge.format_retries times; unset: max_retries, as that key always meant).
Judge outputs are parsed robustly (JSON anywhere, code fences, "Score: 4") and cached by sha256 of
(model, prompt) in a jsonl file, so re-running a report costs no requests.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from pathlib import Path

from tunesmith.config import JudgeConfig
from tunesmith.endpoint import ChatClient, chat_client

RUBRIC = """You are grading an answer to a question against a reference answer.

Question: {question}

Reference answer: {reference}

Answer to grade: {answer}

Score the answer from 1 to 5:
5 = fully correct and complete, consistent with the reference (wording may differ)
4 = correct, with a minor omission or imprecision
3 = partly correct: some key facts right, some missing or wrong
2 = mostly wrong or off-topic, with a small correct part
1 = wrong, empty, or unrelated
Numbers, names and dates must match the reference to count as correct.

Reply with only a JSON object: {{"score": <1-5>, "reason": "<one short sentence>"}}"""

SYSTEM = "You are a strict, fair grader. You reply with JSON only."

_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL | re.IGNORECASE)
_THINK = re.compile(r"<think>.*?</think>", re.DOTALL | re.IGNORECASE)
_SCORE = re.compile(
    r"\bscore\W{0,3}\s*(?:is\s*)?[:=]?\s*\**\s*([1-5])(?:\.0+)?(?!\.?\d)(?:\s*/\s*5)?\b", re.IGNORECASE
)
_REASON = re.compile(r"\breason\W{0,3}\s*[:=]\s*(.+)", re.IGNORECASE)


def judge_prompt(question: str, reference: str, answer: str) -> str:
    """The rubric prompt for one item."""
    return RUBRIC.format(
        question=question.strip(), reference=reference.strip(), answer=answer.strip() or "(empty)"
    )


def _valid(obj: object) -> dict | None:
    """{'score': int 1..5, 'reason': str} from a decoded JSON object, or None when it is not one."""
    if not isinstance(obj, dict) or "score" not in obj:
        return None
    score = obj["score"]
    if isinstance(score, str) and re.fullmatch(r"\s*[1-5](\.0+)?\s*(/\s*5)?\s*", score):
        score = float(score.split("/")[0])
    if isinstance(score, bool) or not isinstance(score, (int, float)) or score not in (1, 2, 3, 4, 5):
        return None
    return {"score": int(score), "reason": str(obj.get("reason", "")).strip()}


def parse_judgement(text: str) -> dict | None:
    """Find {'score': 1-5, 'reason': ...} in a judge's reply: fenced/bare JSON anywhere, else 'Score: 4'."""
    text = _THINK.sub("", text or "")
    decoder = json.JSONDecoder()
    for chunk in [*_FENCE.findall(text), text]:
        for start in (i for i, ch in enumerate(chunk) if ch == "{"):
            try:
                obj, _ = decoder.raw_decode(chunk, start)
            except json.JSONDecodeError:
                continue
            found = _valid(obj)
            if found is not None:
                return found
    m = _SCORE.search(text)
    if m is None:
        return None
    reason = _REASON.search(text)
    return {"score": int(m.group(1)), "reason": reason.group(1).strip().strip('"') if reason else ""}


def cache_key(model: str, prompt: str) -> str:
    """sha256 of (model, prompt): a changed rubric or judge model never reuses an old score."""
    return hashlib.sha256(json.dumps([model, prompt]).encode()).hexdigest()


def _read_cache(path: Path) -> dict[str, dict]:
    """key -> judgement from the jsonl cache (missing file: empty; a torn last line is ignored)."""
    cache: dict[str, dict] = {}
    if not path.is_file():
        return cache
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a run killed mid-write leaves a partial last line; the item is simply judged again
        cache[row["key"]] = {"score": row["score"], "reason": row["reason"]}
    return cache


def _ask(client: ChatClient, prompt: str, attempts: int, backoff_s: float) -> dict | None:
    """One judgement, asked up to `attempts` times while the reply is not in the rubric's format (None then).

    HTTP failures are retried inside the client; one that outlasts its retries is a UserError from there."""
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}]
    for attempt in range(attempts):
        if attempt:
            time.sleep(backoff_s * 2 ** (attempt - 1))
        found = parse_judgement(client.chat(messages, max_tokens=256, temperature=0.0).text)
        if found is not None:
            return found
    return None  # the judge kept answering, just not in the rubric's format: no score for this item


def judge(cfg: JudgeConfig, items: list[dict], cache_path: Path, backoff_s: float = 1.0) -> list[dict | None]:
    """Score each {question, reference, answer}: {'score': 1-5, 'reason'} or None when the judge's
    output stayed unparseable after retries. Cached results cost no request."""
    client = chat_client(cfg, "eval.judge")  # a missing key fails before any work
    format_retries = cfg.max_retries if cfg.format_retries is None else cfg.format_retries
    cache_path = Path(cache_path)
    cache = _read_cache(cache_path)
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    results: list[dict | None] = []
    with client, cache_path.open("a") as sink:
        for item in items:
            prompt = judge_prompt(item["question"], item["reference"], item["answer"])
            key = cache_key(cfg.model, prompt)
            if key not in cache:
                found = _ask(client, prompt, format_retries + 1, backoff_s)
                if found is None:
                    results.append(None)
                    continue
                cache[key] = found
                sink.write(json.dumps({"key": key, **found}) + "\n")
                sink.flush()  # every judged item survives a crash later in the run
            results.append(dict(cache[key]))
    return results


def judge_summary(results: list[dict | None]) -> dict:
    """Mean judge score over the judged items and how many could not be judged."""
    scores = [r["score"] for r in results if r is not None]
    return {
        "judge_score": sum(scores) / len(scores) if scores else None,
        "judge_failed": sum(r is None for r in results),
    }
