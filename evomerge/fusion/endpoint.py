"""A client of OpenAI-compatible servers (``/v1/chat/completions``, ``/v1/completions``), standard library only.

:class:`Endpoint` sends one request per prompt (``n`` in flight at once on a thread pool) and
returns each answer's text, cut at the first stop string, with the number of tokens the server
generated (``usage.completion_tokens``; estimated as one token per 4 bytes of text, plus one, when
the server reports no usage). Greedy by default (``temperature: 0``). Every failure is an
:class:`EvalError` naming the URL and how to fix it: a refused connection, a timeout (never a hang:
``timeout`` seconds per request), an HTTP error with the server's message, a reply that is not the
API's JSON.

Works with vLLM's and llama.cpp's servers, OpenAI and other hosted APIs (``api_key_env`` names the
environment variable holding the key, sent as ``Authorization: Bearer``), and
:mod:`evomerge.fusion.server`.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from evomerge.errors import EvalError


def cut_at_stops(text: str, stops) -> str:
    cut = min((text.find(s) for s in stops if s and s in text), default=-1)
    return text[:cut] if cut >= 0 else text


class Endpoint:
    """One model on an OpenAI-compatible server at ``base_url`` (e.g. ``http://127.0.0.1:8000/v1``)."""

    def __init__(self, base_url: str, model: str, *, api: str = "chat", api_key_env: str | None = None,
                 timeout: float = 120.0, concurrency: int = 8):
        self.base_url = base_url.rstrip("/")
        self.model, self.api, self.timeout, self.concurrency = model, api, float(timeout), max(1, int(concurrency))
        self.key = None
        if api_key_env:
            self.key = os.environ.get(api_key_env)
            if not self.key:
                raise EvalError(f"the environment variable {api_key_env} (the API key of {self.base_url}) is not set "
                                f"(fix: export {api_key_env}=<key>, or remove api_key_env for a server without keys)")

    @property
    def url(self) -> str:
        return f"{self.base_url}/{'chat/completions' if self.api == 'chat' else 'completions'}"

    def complete(self, requests: list[tuple[Any, int, list[str] | tuple[str, ...]]], *,
                 temperature: float = 0.0) -> list[tuple[str, int]]:
        """(answer text, generated tokens) per (prompt, max tokens, stop strings) request, in order:
        prompts are chat message lists for ``api: chat``, texts for ``api: completions``."""
        if not requests:
            return []
        with ThreadPoolExecutor(min(self.concurrency, len(requests))) as pool:
            return list(pool.map(lambda r: self._one(r[0], r[1], list(r[2]), temperature), requests))

    def _one(self, prompt: Any, max_tokens: int, stop: list[str], temperature: float) -> tuple[str, int]:
        body: dict[str, Any] = {"model": self.model, "max_tokens": int(max_tokens), "temperature": float(temperature)}
        body["messages" if self.api == "chat" else "prompt"] = prompt
        stops = [s for s in stop if s]
        if stops:
            body["stop"] = stops[:4]  # the OpenAI API takes at most 4; the rest are cut here
        reply = self._post(body)
        try:
            choice = reply["choices"][0]
            text = choice["message"]["content"] if self.api == "chat" else choice["text"]
            if not isinstance(text, str):
                text = "" if text is None else str(text)
        except (KeyError, IndexError, TypeError):
            raise EvalError(f"{self.url} answered without choices[0].{'message.content' if self.api == 'chat' else 'text'}"
                            f": {json.dumps(reply)[:300]} (fix: check that the server speaks the OpenAI API and "
                            f"serves model {self.model!r})") from None
        text = cut_at_stops(text, stops)
        usage = reply.get("usage") or {}
        tokens = usage.get("completion_tokens")
        if not isinstance(tokens, int) or tokens < 0:
            tokens = len(text.encode()) // 4 + 1
        return text, tokens

    def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        headers = {"Content-Type": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        req = urllib.request.Request(self.url, data=json.dumps(body).encode(), headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as err:
            detail = err.read()[:500].decode("utf-8", "replace")
            try:
                detail = json.loads(detail)["error"]["message"]
            except (ValueError, KeyError, TypeError):
                pass
            raise EvalError(f"{self.url} refused the request for model {self.model!r}: HTTP {err.code} {detail} "
                            f"(fix: check the model name and the request against the server)") from None
        except TimeoutError:
            raise EvalError(f"{self.url} did not answer within {self.timeout:g} s (fix: raise the agent's timeout, "
                            f"or check the server)") from None
        except urllib.error.URLError as err:
            reason = err.reason
            if isinstance(reason, TimeoutError):
                raise EvalError(f"{self.url} did not answer within {self.timeout:g} s (fix: raise the timeout, or "
                                f"check the server)") from None
            raise EvalError(f"cannot reach {self.url}: {reason} (fix: start the server, or correct the agent's "
                            f"endpoint)") from None
        except OSError as err:
            raise EvalError(f"the connection to {self.url} failed: {err} (fix: check the server)") from None
        try:
            reply = json.loads(raw)
        except ValueError:
            raise EvalError(f"{self.url} did not answer with JSON: {raw[:200]!r} (fix: check that endpoint is the "
                            f"API's base URL, ending in /v1)") from None
        if not isinstance(reply, dict):
            raise EvalError(f"{self.url} answered {str(reply)[:200]}, not a JSON object (fix: check the server)")
        return reply
