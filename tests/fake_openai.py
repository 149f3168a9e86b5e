"""A real local HTTP server speaking OpenAI's POST /v1/chat/completions, for the judge and synth clients."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeChatServer:
    """Answers each POST with `reply(body) -> (status, content)`; records every request as {path, auth, body}.

    A 200 carries `usage` counted in words (prompt: every message's words; completion: the content's); content
    given as bytes is sent as it is (text/html), for servers that answer with something else than JSON.
    `max_in_flight` is the most requests it was answering at once (each request has its own thread).
    """

    def __init__(self, reply: Callable[[dict], tuple[int, str]]):
        self.requests: list[dict] = []
        self.in_flight = self.max_in_flight = 0
        lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's naming)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append(
                    {"path": self.path, "auth": self.headers.get("Authorization"), "body": body}
                )
                with lock:
                    outer.in_flight += 1
                    outer.max_in_flight = max(outer.max_in_flight, outer.in_flight)
                try:
                    status, content = reply(body)
                finally:
                    with lock:
                        outer.in_flight -= 1
                prompt = sum(len(m["content"].split()) for m in body["messages"])
                answer = {
                    "id": "x",
                    "object": "chat.completion",
                    "created": 0,
                    "model": body["model"],
                    "choices": [
                        {
                            "index": 0,
                            "finish_reason": "stop",
                            "message": {"role": "assistant", "content": content},
                        }
                    ],
                    "usage": {
                        "prompt_tokens": prompt,
                        "completion_tokens": len(str(content).split()),
                        "total_tokens": prompt + len(str(content).split()),
                    },
                }
                data = (
                    content
                    if isinstance(content, bytes)
                    else json.dumps(answer if status == 200 else {"error": {"message": content}}).encode()
                )
                try:
                    self.send_response(status)
                    self.send_header(
                        "Content-Type", "text/html" if isinstance(content, bytes) else "application/json"
                    )
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (a stalled reply)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
