"""The playground: one self-contained page (no external scripts, fonts or styles) served at GET /, and the
test questions it offers as one-click examples.

Two models side by side; each answer streams over SSE (fetch + ReadableStream) from /v1/chat/completions,
with token count, time to first token and total latency, and, under serve.rag, the passages retrieved for it
(the stream's first chunk carries them in `retrieval`). Kept as a Python string so it ships inside the
package without package-data configuration.
"""

from __future__ import annotations

import json
from pathlib import Path

from tunesmith.config import Config, UserError
from tunesmith.data.formats import Example, as_messages, prompt_key, to_example
from tunesmith.data.pipeline import CACHE_DIR
from tunesmith.data.rejects import Rejects
from tunesmith.data.sources import read_jsonl, read_rows
from tunesmith.data.split import split

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>tunesmith playground</title>
<style>
body { font-family: system-ui, sans-serif; margin: 0 auto; max-width: 1100px; padding: 1rem; color: #222; }
h1 { font-size: 1.3rem; margin: 0 0 .8rem; }
.row { display: flex; gap: .6rem; align-items: center; flex-wrap: wrap; margin-bottom: .6rem; }
textarea { width: 100%; box-sizing: border-box; font: inherit; padding: .5rem; }
button { font: inherit; padding: .35rem .9rem; cursor: pointer; }
.examples button { background: #eef2f7; border: 1px solid #c9d3e0; border-radius: 1rem; font-size: .85rem;
  max-width: 32rem; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
.panes { display: grid; grid-template-columns: 1fr 1fr; gap: 1rem; margin-top: 1rem; }
.pane { border: 1px solid #ccd; border-radius: .4rem; padding: .6rem; min-height: 8rem; }
.pane h2 { font-size: 1rem; margin: 0 0 .4rem; }
.answer { white-space: pre-wrap; font-family: ui-monospace, monospace; font-size: .9rem; min-height: 4rem; }
.stat { color: #667; font-size: .8rem; margin-top: .4rem; }
.error { color: #b00020; }
.passages { margin-top: .5rem; font-size: .8rem; color: #334; }
.passages li { white-space: pre-wrap; margin-bottom: .35rem; }
.passages .src { color: #778; font-size: .75rem; }
</style></head>
<body>
<h1>tunesmith playground</h1>
<div class="row">
  <label>left <select id="left-model"></select></label>
  <label>right <select id="right-model"></select></label>
  <label>max tokens <input id="max-tokens" type="number" value="128" min="1" style="width:5rem"></label>
  <label id="key-label" hidden>API key <input id="api-key" type="password" autocomplete="off"></label>
</div>
<div class="row examples" id="examples"></div>
<form id="ask">
  <textarea id="question" rows="3" placeholder="Ask both models the same question"></textarea>
  <div class="row"><button id="send" type="submit">Ask both</button></div>
</form>
<div class="panes">
  <div class="pane"><h2 id="left-name"></h2><div class="answer" id="left-answer"></div>
    <div class="stat" id="left-stat"></div><div class="passages" id="left-passages"></div></div>
  <div class="pane"><h2 id="right-name"></h2><div class="answer" id="right-answer"></div>
    <div class="stat" id="right-stat"></div><div class="passages" id="right-passages"></div></div>
</div>
<script>
const CFG = __CONFIG__;
const $ = (id) => document.getElementById(id);
for (const side of ["left", "right"]) {
  const sel = $(side + "-model");
  for (const m of CFG.models) {
    const o = document.createElement("option"); o.value = o.textContent = m; sel.appendChild(o);
  }
  sel.value = CFG.pair[side === "left" ? 0 : 1];
}
$("key-label").hidden = !CFG.auth;
for (const q of CFG.examples) {
  const b = document.createElement("button"); b.type = "button"; b.textContent = b.title = q;
  b.onclick = () => { $("question").value = q; ask(q); };  // sent as stored: trimming would change the prompt
  $("examples").appendChild(b);
}

// serve.rag: the passages the answer was given, best first (textContent only: passages are not HTML)
function showPassages(side, list) {
  const box = $(side + "-passages"); box.textContent = "";
  const det = document.createElement("details"); det.open = true;
  const sum = document.createElement("summary");
  sum.textContent = list.length ? list.length + " retrieved passages" : "no passage retrieved";
  const ol = document.createElement("ol");
  for (const p of list) {
    const li = document.createElement("li"), src = document.createElement("div");
    li.textContent = p.text; src.className = "src";
    src.textContent = p.id + " | " + p.source + " | score " + p.score.toFixed(3);
    li.appendChild(src); ol.appendChild(li);
  }
  det.append(sum, ol); box.appendChild(det);
}

function stats(t0, first, tokens, end) {
  const ttft = first === null ? "-" : Math.round(first - t0) + " ms to first token";
  return tokens + " tokens | " + ttft + " | " + Math.round(end - t0) + " ms";
}

async function run(side, question) {
  const model = $(side + "-model").value, out = $(side + "-answer"), stat = $(side + "-stat");
  $(side + "-name").textContent = model; out.textContent = ""; out.className = "answer";
  stat.textContent = "..."; $(side + "-passages").textContent = "";
  const t0 = performance.now(); let first = null, tokens = 0, pieces = 0;
  const headers = {"Content-Type": "application/json"};
  if ($("api-key").value) headers["Authorization"] = "Bearer " + $("api-key").value;
  const body = {model, messages: [{role: "user", content: question}], stream: true,
                max_tokens: Number($("max-tokens").value)};
  try {
    const res = await fetch("/v1/chat/completions", {method: "POST", headers, body: JSON.stringify(body)});
    if (!res.ok) {
      const e = await res.json().catch(() => ({}));
      throw new Error((e.error && e.error.message) || ("HTTP " + res.status));
    }
    const reader = res.body.getReader(), dec = new TextDecoder();
    let buf = "", finished = false;
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buf += dec.decode(value, {stream: true});
      let cut;
      while ((cut = buf.indexOf("\\n\\n")) >= 0) {
        const event = buf.slice(0, cut); buf = buf.slice(cut + 2);
        for (const line of event.split("\\n")) {
          if (line === "data: [DONE]") finished = true;
          if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
          const msg = JSON.parse(line.slice(6));
          if (msg.error) throw new Error(msg.error.message);  // the server failed after the stream began
          if (msg.retrieval) showPassages(side, msg.retrieval);
          const delta = msg.choices && msg.choices[0] && msg.choices[0].delta;
          if (delta && delta.content) {
            if (first === null) first = performance.now();
            out.textContent += delta.content; pieces++;
          }
          if (msg.usage) tokens = msg.usage.completion_tokens;
          stat.textContent = stats(t0, first, tokens || pieces, performance.now());
        }
      }
    }
    if (!finished) throw new Error("the answer was cut off (the stream ended without [DONE])");
    const total = (performance.now() - t0) / 1000;
    stat.textContent = stats(t0, first, tokens, performance.now()) + " total | " +
      (tokens / total).toFixed(1) + " tokens/s";
  } catch (err) {
    out.className = "answer error"; out.textContent = "error: " + err.message; stat.textContent = "";
  }
}

function ask(q) {
  if (!q.trim()) return;
  run("left", q); run("right", q);
}
$("ask").addEventListener("submit", (ev) => { ev.preventDefault(); ask($("question").value.trim()); });
</script>
</body></html>
"""


def page(models: list[str], examples: list[str], auth: bool) -> str:
    """The playground HTML with its settings inlined; default pair: base and tuned when both are served."""
    pair = ["base", "tuned"] if {"base", "tuned"} <= set(models) else [models[0], models[-1]]
    settings = {"models": models, "pair": pair, "examples": examples, "auth": auth}
    # "</" inside a JSON string would end the <script> element early; "<\\/" is the same string in JS.
    return _PAGE.replace("__CONFIG__", json.dumps(settings).replace("</", "<\\/"))


def example_questions(cfg: Config, limit: int = 5) -> list[str]:
    """A few test questions for the playground, as a user would type them: those the run's eval answered
    (eval/predictions.jsonl), else the data's test split. Never a rendered prompt: the page sends its
    question as a user message, which the server wraps in the template itself."""
    if cfg.data.format == "text":  # raw text has no questions
        return []
    preds = Path(cfg.out_dir) / "eval" / "predictions.jsonl"
    found = (
        _evaluated_questions(preds, Path(cfg.out_dir) / CACHE_DIR / "test_examples.jsonl", limit)
        if preds.is_file()
        else []
    )
    return found or _split_questions(cfg, limit)


def user_question(example: Example) -> str:
    """The last user turn of an example: what a person would type to ask it (no system prompt or template)."""
    return next((m["content"] for m in reversed(as_messages(example)) if m["role"] == "user"), "")


def _evaluated_questions(preds: Path, cached: Path, limit: int) -> list[str]:
    # predictions.jsonl rows hold `prompt` (the rendered prompt: chat markup, system prompt) and `question`
    # (prompt_key: for chat data every non-assistant turn joined); the user's own turn comes from the run's
    # data cache by `where` when it is there, else `question` stands in.
    examples = {}
    if cached.is_file():
        with cached.open(encoding="utf-8") as f:
            examples = {ex.where: ex for ex in (Example(**json.loads(line)) for line in f if line.strip())}
    found: list[str] = []
    for row in read_jsonl(preds, Rejects("fail")):  # a broken line: a UserError at its file:line
        if len(found) >= limit:
            break
        where = row.fields.get("where")
        q = (
            user_question(examples[where])
            if isinstance(where, str) and where in examples
            else row.fields.get("question")
        )
        if isinstance(q, str) and q.strip():
            found.append(q)
    return found


def _split_questions(cfg: Config, limit: int) -> list[str]:
    try:
        rejects = Rejects("skip")
        path = cfg.data.test_path or cfg.data.path
        examples = [
            e
            for row in read_rows(path, cfg.data, rejects)
            if (e := to_example(row, cfg.data.format, rejects))
        ]
        test = (
            examples
            if cfg.data.test_path
            else split(examples, cfg.data.test_size, cfg.data.seed, prompt_key)[1]
        )
    except UserError:  # no data at hand: the playground simply shows no examples
        return []
    return [q for q in (user_question(e) for e in test[: limit * 4]) if q.strip()][:limit]
