"""``servelm generate`` and ``servelm chat``: a model from a terminal, streaming.

Both run through a server when one is given (``--url``) or found running on this machine's default
port, so they start at once instead of loading a model of their own; else they load the model here
(``--local`` forces that). Ctrl-C during an answer stops that answer only; in ``chat``, a second Ctrl-C
at the prompt, or Ctrl-D, quits.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import uuid
from collections.abc import Iterator

from servelm.engine.cli import add_engine_args, engine_config

DEFAULT_URL = "http://127.0.0.1:8000"  # where `servelm serve` listens by default


def register(sub: argparse._SubParsersAction) -> None:
    """Adds the ``generate`` and ``chat`` commands to an argparse ``subparsers`` object."""
    g = sub.add_parser("generate", help="complete one prompt, streaming to stdout")
    g.add_argument("prompt", help="the text to continue (no chat template; see 'servelm chat')")
    _common_args(g)
    g.set_defaults(func=_generate)
    c = sub.add_parser("chat", help="multi-turn chat in the terminal with the model's chat template",
                       description="Chat in the terminal. Ctrl-C stops an answer; Ctrl-C twice or Ctrl-D quits.")
    c.add_argument("--system", default=None, help="system prompt (default: the chat template's own)")
    _common_args(c)
    c.set_defaults(func=_chat)


def _common_args(p: argparse.ArgumentParser) -> None:
    s = p.add_argument_group("where the model runs")
    s.add_argument("--url", default=None,
                   help=f"a running servelm (or other OpenAI-compatible) server to use, e.g. {DEFAULT_URL} "
                        f"(default: {DEFAULT_URL} if a servelm server answers there and no --model is given, "
                        "else the model is loaded here)")
    s.add_argument("--api-key", default=None,
                   help="the server's API key (default: $SERVELM_API_KEY, else $OPENAI_API_KEY)")
    s.add_argument("--local", action="store_true", help="load the model here even if a server is running")
    add_engine_args(p.add_argument_group("model flags (when the model is loaded here)"))
    q = p.add_argument_group("sampling")
    q.add_argument("--max-tokens", type=int, default=256, help="most tokens per answer (default: 256)")
    q.add_argument("--temperature", type=float, default=0.7, help="0 for greedy (default: 0.7)")
    q.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (default: 0.95)")
    q.add_argument("--seed", type=int, default=None, help="sampling seed (default: none, a new one each time)")


class CommandError(Exception):
    """A problem the user can fix (unreachable server, missing key, prompt too long); the message says how."""


# ---------------------------------------------------------------------------------------------- backends
class LocalModel:
    """The model loaded in this process (``servelm.engine.LLMEngine``)."""

    def __init__(self, args: argparse.Namespace):
        from servelm.engine.llm_engine import LLMEngine

        self.engine = LLMEngine(engine_config(args, show_progress=True))
        self.name = self.engine.model_name
        self.args = args

    def _run(self, prompt: str, stop: "_StopFlag") -> Iterator[str]:
        from servelm.engine.sampling_params import InvalidRequestError, SamplingParams

        a = self.args
        params = SamplingParams(max_tokens=a.max_tokens, temperature=a.temperature, top_p=a.top_p, seed=a.seed)
        rid = uuid.uuid4().hex
        try:
            self.engine.add_request(rid, prompt, params)
        except InvalidRequestError as e:  # e.g. the conversation outgrew the context window
            raise CommandError(str(e)) from None
        while self.engine.has_unfinished_requests():
            if stop.requested:  # between two steps, so the engine's state stays whole
                self.engine.abort_request(rid)
                return
            for out in self.engine.step():
                yield out.outputs[0].delta_text

    def complete(self, prompt: str, stop: "_StopFlag") -> Iterator[str]:
        return self._run(prompt, stop)

    def chat(self, messages: list[dict], stop: "_StopFlag") -> Iterator[str]:
        return self._run(self.engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True), stop)

    def close(self) -> None:
        self.engine.shutdown()


class RemoteModel:
    """A server's OpenAI-compatible API (``/v1/completions`` and ``/v1/chat/completions``, streamed)."""

    def __init__(self, url: str, api_key: str | None, args: argparse.Namespace):
        import openai

        self._openai = openai
        self.url = url.rstrip("/")
        base = self.url if self.url.endswith("/v1") else self.url + "/v1"
        # the SDK insists on a key; a --no-auth server ignores it
        self.client = openai.OpenAI(base_url=base, api_key=api_key or "none", max_retries=0, timeout=600)
        self.args = args
        try:
            self.name = self.client.models.list().data[0].id
        except openai.AuthenticationError:
            raise CommandError(f"{self.url} needs an API key: pass --api-key or set SERVELM_API_KEY "
                               "(make one with 'servelm keys create --name NAME')") from None
        except openai.APIConnectionError:
            raise CommandError(f"no server answers at {self.url} (start one with 'servelm serve', or leave "
                               "--url out to load the model here)") from None

    def _sampling(self) -> dict:
        a = self.args
        return {"model": self.name, "max_tokens": a.max_tokens, "temperature": a.temperature, "top_p": a.top_p,
                "seed": a.seed, "stream": True}

    def _stream(self, make, delta) -> Iterator[str]:
        import httpx

        try:
            stream = make()
        except self._openai.APIStatusError as e:
            raise CommandError(_api_message(e)) from None
        except self._openai.APIConnectionError:
            raise CommandError(f"lost the server at {self.url}") from None
        try:
            for chunk in stream:
                if chunk.choices:
                    yield delta(chunk.choices[0]) or ""
        except (self._openai.APIError, httpx.HTTPError) as e:  # the connection dropped, or an error event
            raise CommandError(f"the answer broke off: {e}") from None
        finally:
            stream.close()  # also on Ctrl-C: the server sees the disconnect and stops generating

    def complete(self, prompt: str, stop: "_StopFlag") -> Iterator[str]:
        return self._stream(lambda: self.client.completions.create(prompt=prompt, **self._sampling()),
                            lambda c: c.text)

    def chat(self, messages: list[dict], stop: "_StopFlag") -> Iterator[str]:
        return self._stream(lambda: self.client.chat.completions.create(messages=messages, **self._sampling()),
                            lambda c: c.delta.content)

    def close(self) -> None:
        self.client.close()


def _api_message(e) -> str:
    """Returns the message of an OpenAI-style error body, else the SDK's own text."""
    body = e.body if isinstance(e.body, dict) else {}
    err = body.get("error", body) if isinstance(body.get("error", body), dict) else {}
    return err.get("message") or str(e)


def find_server(url: str = DEFAULT_URL) -> bool:
    """Returns whether a ready servelm server answers at ``url`` (its /ready names a model)."""
    import httpx

    try:
        r = httpx.get(url.rstrip("/") + "/ready", timeout=1.0)
        return r.status_code == 200 and "model" in r.json()
    except (httpx.HTTPError, ValueError):
        return False


def open_model(args: argparse.Namespace) -> LocalModel | RemoteModel:
    """Returns the server's API when ``--url`` is given or a servelm server runs at the default URL (and no
    ``--model`` or ``--local`` asks for a model here), else the model loaded here."""
    key = args.api_key or os.environ.get("SERVELM_API_KEY") or os.environ.get("OPENAI_API_KEY")
    if args.url:
        return RemoteModel(args.url, key, args)
    if not args.local and args.model is None and find_server():
        try:
            model = RemoteModel(DEFAULT_URL, key, args)
        except CommandError as e:
            print(f"servelm: found a server at {DEFAULT_URL} but cannot use it: {e}; loading the model here "
                  "instead", file=sys.stderr)
        else:
            print(f"servelm: using the server at {DEFAULT_URL} (--local loads the model here instead)",
                  file=sys.stderr)
            return model
    return LocalModel(args)


# ----------------------------------------------------------------------------------------- Ctrl-C
class _StopFlag:
    """While an answer streams, SIGINT (Ctrl-C) sets ``requested`` instead of raising at an arbitrary point;
    the local engine checks it between steps. A streamed HTTP answer is read in a blocking call, so there
    the signal still raises KeyboardInterrupt (closing the connection is safe anywhere)."""

    def __init__(self, raise_too: bool):
        self.requested = False
        self.raise_too = raise_too

    def __enter__(self) -> "_StopFlag":
        self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.requested = True
        if self.raise_too:
            raise KeyboardInterrupt

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGINT, self._old)


def _answer(pieces_for, model) -> tuple[str, bool]:
    """Streams one answer to stdout; returns its text and whether Ctrl-C stopped it."""
    text = ""
    with _StopFlag(raise_too=isinstance(model, RemoteModel)) as stop:
        pieces = pieces_for(stop)
        try:
            for piece in pieces:
                text += piece
                sys.stdout.write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:
            pass
        finally:
            pieces.close()  # a remote answer's connection closes, so the server stops generating
    if stop.requested:
        sys.stdout.write(" [stopped]")
    sys.stdout.write("\n")
    sys.stdout.flush()
    return text, stop.requested


# ---------------------------------------------------------------------------------------- commands
def _generate(args: argparse.Namespace) -> int:
    try:
        model = open_model(args)
        try:
            _answer(lambda stop: model.complete(args.prompt, stop), model)
        finally:
            model.close()
    except CommandError as e:
        print(f"servelm generate: {e}", file=sys.stderr)
        return 2
    return 0


def _chat(args: argparse.Namespace) -> int:
    try:
        model = open_model(args)
    except CommandError as e:
        print(f"servelm chat: {e}", file=sys.stderr)
        return 2
    messages: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    print(f"Chatting with {model.name}. Ctrl-C stops an answer; Ctrl-C twice or Ctrl-D quits.", file=sys.stderr)
    interrupted = False  # the last thing the user did was Ctrl-C
    try:
        while True:
            try:
                user = input("you> ").strip()
            except EOFError:
                print(file=sys.stderr)
                break
            except KeyboardInterrupt:
                if interrupted:
                    print(file=sys.stderr)
                    break
                interrupted = True
                print("\n(Ctrl-C again or Ctrl-D to quit)", file=sys.stderr)
                continue
            interrupted = False
            if not user:
                continue
            messages.append({"role": "user", "content": user})
            sys.stdout.write("assistant> ")
            sys.stdout.flush()
            try:
                reply, interrupted = _answer(lambda stop: model.chat(messages, stop), model)
            except CommandError as e:
                print(f"error: {e}", file=sys.stderr)
                messages.pop()
                continue
            messages.append({"role": "assistant", "content": reply})  # a stopped answer as far as it got
    finally:
        model.close()
    return 0
