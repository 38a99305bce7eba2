"""A small OpenAI-compatible server for a local Hugging Face model (standard library HTTP server).

    python -m evomerge.fusion.server MODEL_DIR [--host 127.0.0.1] [--port 8000] [--name NAME] [--device cpu]

Serves ``GET /v1/models``, ``POST /v1/completions`` (``prompt``: a text or a list of texts) and
``POST /v1/chat/completions`` (``messages`` through the tokenizer's chat template), with
``max_tokens`` (``max_completion_tokens`` too; default 16), ``stop`` (a text or a list) and
``temperature`` 0 (greedy decoding, the evaluation backends' own: BOS, the text without special
tokens, EOS and stop strings; a temperature above 0 is refused). Replies carry ``finish_reason``
(``stop`` at EOS or a stop string, ``length`` at the token limit) and ``usage`` (prompt and
completion tokens). Errors are the API's JSON errors (400 for a bad request, 404 for another model
name or path). Requests are served one at a time (one model, one lock); for a local
Mixture-of-Agents or to test remote agents without a hosted API. :class:`ModelServer` runs it in a
thread (``with ModelServer(model, tok) as srv: srv.url``).
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from evomerge.evaluate.backends.hf import HFLM, generation_text
from evomerge.fusion.prompts import chat_ids, text_ids


class BadRequest(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class ModelServer:
    """The API over ``model`` / ``tokenizer`` on ``host:port`` (port 0: a free one), served by a
    background thread between :meth:`start` and :meth:`stop` (or as a context manager)."""

    def __init__(self, model, tokenizer, *, name: str = "local", host: str = "127.0.0.1", port: int = 0):
        self.lm = HFLM(model, tokenizer, 16, None)
        self.tok, self.name = tokenizer, name
        self.lock = threading.Lock()
        self.requests = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                if self.path.rstrip("/") == "/v1/models":
                    return self._send(200, {"object": "list", "data": [{"id": server.name, "object": "model",
                                                                         "owned_by": "evomerge"}]})
                self._send(404, _error(f"no route {self.path}", "not_found"))

            def do_POST(self):
                try:
                    length = int(self.headers.get("Content-Length") or 0)
                    try:
                        body = json.loads(self.rfile.read(length) or b"{}")
                    except ValueError:
                        raise BadRequest(400, "the request body is not JSON") from None
                    if not isinstance(body, dict):
                        raise BadRequest(400, "the request body must be a JSON object")
                    route = self.path.rstrip("/")
                    if route == "/v1/completions":
                        return self._send(200, server.completions(body))
                    if route == "/v1/chat/completions":
                        return self._send(200, server.chat(body))
                    raise BadRequest(404, f"no route {self.path}")
                except BadRequest as err:
                    self._send(err.status, _error(str(err), "invalid_request_error"))
                except Exception as err:  # noqa: BLE001 - the client gets the reason, the server stays up
                    self._send(500, _error(f"{type(err).__name__}: {err}", "server_error"))

            def _send(self, status: int, payload: dict) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def start(self) -> ModelServer:
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="evomerge-server", daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        if self.thread is not None:
            self.thread.join(timeout=10)

    def __enter__(self) -> ModelServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ the API

    def _params(self, body: dict) -> tuple[int, list[str]]:
        if body.get("model") not in (None, self.name):
            raise BadRequest(404, f"the model {body.get('model')!r} does not exist; this server serves {self.name!r}")
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens", 16))
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise BadRequest(400, f"max_tokens must be a whole number >= 1, got {max_tokens!r}")
        temperature = body.get("temperature", 0)
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or temperature != 0:
            raise BadRequest(400, f"this server decodes greedily: temperature must be 0, got {temperature!r}")
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise BadRequest(400, f"stop must be a text or a list of texts, got {body.get('stop')!r}")
        return max_tokens, [s for s in stop if s]

    def _generate(self, ids: list[int], max_tokens: int, stop: list[str]) -> tuple[str, str, int]:
        ids = ids[-max(1, self.lm.max_len - max_tokens):]
        with self.lock:
            self.requests += 1
            out = self.lm.generate_tokens([(ids, max_tokens, stop)])[0]
        text = generation_text(self.tok, out, self.tok.eos_token_id, stop)
        eos = self.tok.eos_token_id
        finished = (eos is not None and eos in out) or any(s in self.tok.decode(out, skip_special_tokens=True)
                                                           for s in stop)
        return text, "stop" if finished else "length", len(out)

    def completions(self, body: dict) -> dict[str, Any]:
        max_tokens, stop = self._params(body)
        prompts = body.get("prompt")
        prompts = [prompts] if isinstance(prompts, str) else prompts
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise BadRequest(400, "prompt must be a text or a non-empty list of texts")
        choices, used, made = [], 0, 0
        for i, p in enumerate(prompts):
            ids = text_ids(self.tok, p)
            text, reason, n = self._generate(ids, max_tokens, stop)
            choices.append({"index": i, "text": text, "finish_reason": reason, "logprobs": None})
            used, made = used + len(ids), made + n
        return {"id": f"cmpl-{time.time_ns()}", "object": "text_completion", "created": int(time.time()),
                "model": self.name, "choices": choices,
                "usage": {"prompt_tokens": used, "completion_tokens": made, "total_tokens": used + made}}

    def chat(self, body: dict) -> dict[str, Any]:
        max_tokens, stop = self._params(body)
        msgs = body.get("messages")
        if (not isinstance(msgs, list) or not msgs or not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                                               and isinstance(m.get("content"), str) for m in msgs)):
            raise BadRequest(400, "messages must be a non-empty list of {role, content} objects with text content")
        try:
            ids = chat_ids(self.tok, [{"role": m["role"], "content": m["content"]} for m in msgs], self.name)
        except Exception as err:  # noqa: BLE001 - a template that refuses the turns is the client's error
            raise BadRequest(400, f"the chat template cannot render these messages: {err}") from None
        text, reason, n = self._generate(ids, max_tokens, stop)
        return {"id": f"chatcmpl-{time.time_ns()}", "object": "chat.completion", "created": int(time.time()),
                "model": self.name, "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                                 "finish_reason": reason}],
                "usage": {"prompt_tokens": len(ids), "completion_tokens": n, "total_tokens": len(ids) + n}}


def _error(message: str, kind: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "code": None}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m evomerge.fusion.server", description=__doc__.splitlines()[0])
    ap.add_argument("model", help="model folder (HF checkpoint with tokenizer)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--name", default=None, help="the model's name in the API (default: the folder name)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    from pathlib import Path

    from evomerge.errors import EvomergeError
    from evomerge.evaluate import load_model

    try:
        model, tok = load_model(args.model, args.device)
    except EvomergeError as err:
        print(f"error: {err}", flush=True)
        return 2
    srv = ModelServer(model, tok, name=args.name or Path(args.model).name, host=args.host, port=args.port)
    print(f"serving {args.model} as {srv.name!r} at {srv.url}", flush=True)
    try:
        srv.httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        srv.httpd.server_close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
