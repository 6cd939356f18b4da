"""``servelm serve`` and ``servelm keys ...``: ``register(subparsers)`` adds both to the main CLI."""
from __future__ import annotations

import argparse
import errno
import json
import os
import socket
import sys

_S = argparse.SUPPRESS  # unset flags must not override the config file or environment


def register(subparsers) -> None:
    """Adds the ``serve`` and ``keys`` commands to an argparse ``subparsers`` object."""
    p = subparsers.add_parser("serve", help="Run the OpenAI-compatible HTTP server.",
                              description="Serve a model over an OpenAI-compatible HTTP API. Flags override "
                                          "SERVELM_* environment variables, which override --config.")
    p.add_argument("--config", help="YAML file with any setting below (snake_case keys; default: none).")
    p.add_argument("--model", default=_S, help="Model path (GGUF/HF dir) or 'dummy:<arch>' (default: the embedded SmolLM2).")
    p.add_argument("--served-model-name", default=_S, help="Name clients pass as 'model' (default: the model's own name).")
    p.add_argument("--host", default=_S, help="Interface to bind; 0.0.0.0 for all.")
    p.add_argument("--port", type=int, default=_S, help="Port.")
    p.add_argument("--no-auth", action="store_true", default=_S, help="Accept requests without an API key.")
    p.add_argument("--address", dest="ray_address", default=_S,
                   help="With --replicas: the Ray cluster to join (ray://head:10001 or auto; default: a local one).")
    p.add_argument("--redis-url", default=_S, help="redis://host:port/0 to share rate limits across replicas (default: none, limits kept in memory).")
    p.add_argument("--data-dir", default=_S, help="Where keys, reviews and RAG collections live (default: $SERVELM_DATA_DIR, else ~/.local/share/servelm).")
    p.add_argument("--log-prompts", action="store_true", default=_S, help="Include prompts in request logs.")
    p.add_argument("--log-level", default=_S, choices=["debug", "info", "warning", "error"], help="Log level.")
    p.add_argument("--max-num-seqs", type=int, default=_S, help="Requests the engine runs at once.")
    p.add_argument("--max-queue", type=int, default=_S, help="Requests that may wait beyond those; more get 503.")
    p.add_argument("--max-model-len", type=int, default=_S, help="Context window to serve, in tokens (default: the model's).")
    p.add_argument("--kv-cache-memory-bytes", type=int, default=_S,
                   help="Memory for the KV cache (default: 1 GiB on CPU; on CUDA, 90%% of GPU memory less the weights).")
    p.add_argument("--kv-cache-memory", dest="kv_cache_memory_bytes", type=int, default=_S,
                   help=argparse.SUPPRESS)  # the spelling 'generate'/'chat' had; one name now
    p.add_argument("--dtype", default=_S, help="auto, float32, bfloat16 or float16 (default: auto).")
    p.add_argument("--tensor-parallel-size", type=int, default=_S, help="GPUs to split the model over.")
    p.add_argument("--enforce-eager", action="store_true", default=_S, help="CUDA: no CUDA graphs (a baseline).")
    p.add_argument("--quantization", default=_S,
                   help="int8, int4, nf4 or nf4-dq (weight-only); +lm_head or +lm_head:int8 for the output layer (default: none).")
    p.add_argument("--quant-calibration", default=_S, metavar="TEXT_FILE",
                   help="nf4/nf4-dq: search block scales weighted by activations on this text (default: none).")
    p.add_argument("--speculative-config", default=_S, metavar="JSON",
                   help='Speculative decoding, vLLM\'s shape: \'{"method": "ngram", "num_speculative_tokens": 4}\' '
                        '(see docs/speculative.md; default: none).')
    p.add_argument("--request-timeout", dest="request_timeout_s", type=float, default=_S,
                   help="Seconds before a request is stopped.")
    p.add_argument("--shutdown-timeout", dest="shutdown_timeout_s", type=float, default=_S,
                   help="Seconds shutdown waits for in-flight requests.")
    p.add_argument("--max-body-bytes", type=int, default=_S, help="Larger request bodies get 413.")
    p.add_argument("--allowed-origins", type=_str_list, default=_S,
                   help='CORS origins, a JSON list (as vLLM) or comma list; [] for none.')
    p.add_argument("--allowed-methods", type=_str_list, default=_S, help='CORS methods.')
    p.add_argument("--allowed-headers", type=_str_list, default=_S, help='CORS request headers.')
    p.add_argument("--allow-credentials", action="store_true", default=_S, help="CORS: allow credentials.")
    p.add_argument("--no-embeddings", dest="embedding_model", action="store_const", const=None, default=_S,
                   help="Do not load the embedding model.")
    p.add_argument("--no-rag", dest="rag", action="store_false", default=_S, help="Do not serve the RAG routes.")
    p.add_argument("--rag-data-dir", default=_S, help="Where RAG collections live (default DATA_DIR/rag).")
    p.add_argument("--pg-url", default=_S, help="postgresql://... (with pgvector) to keep collections in PostgreSQL (default: none, FAISS files in the data directory).")
    p.add_argument("--rag-max-file-bytes", type=int, default=_S, help="Larger uploaded documents get 413.")
    p.add_argument("--policy", default=_S, help="Guard policy YAML (default: the shipped policy, docs/safety.md).")
    p.add_argument("--no-guard", action="store_true", default=_S,
                   help="Serve without guardrails (no input/output scanning, no review queue).")
    p.add_argument("--strategy", dest="default_strategy", default=_S,
                   choices=["zero_shot", "few_shot", "chain_of_thought"],
                   help="Prompt strategy for requests that name none (default: the messages as sent).")
    p.add_argument("--fallback", default=_S, choices=["static", "none"],
                   help="static (default): a circuit breaker around the engine, and the static message for the "
                        "failures fallback_on names (none by default: errors keep their 503); none: neither.")
    p.add_argument("--fallback-message", default=_S, help="The static fallback's text.")
    p.add_argument("--enable-fault-injection", action="store_true", default=_S,
                   help="TEST ONLY: POST /v1/admin/fault {\"engine\": \"stop\"|\"start\"} stops/starts the engine; "
                        "a request with the header x-servelm-fault: sample[:N] fails inside the step (after N tokens).")
    _add_setting_flags(p)
    _show_defaults(p)
    p.set_defaults(func=_serve)

    # --config/--data-dir are accepted before or after the action ("keys --data-dir D list" or "keys list --data-dir D").
    where = argparse.ArgumentParser(add_help=False)
    where.add_argument("--config", default=_S, help="YAML settings file, as for serve (for data_dir; default: none).")
    where.add_argument("--data-dir", default=_S, help="Where the key store lives (default: $SERVELM_DATA_DIR, else ~/.local/share/servelm).")
    where.add_argument("--pg-url", default=_S, help="postgresql://...: the key store of servers run with --pg-url (default: none, the data directory's).")
    k = subparsers.add_parser("keys", help="Manage API keys.", parents=[where])
    ks = k.add_subparsers(dest="keys_command", required=True)
    c = ks.add_parser("create", help="Create a key and print it once.", parents=[where])
    c.add_argument("--name", required=True, help="A name for the key (shown in logs, listings and revoke).")
    c.add_argument("--scopes", default="chat,embeddings,models", help="Comma list of chat,embeddings,models,rag,admin (default: chat,embeddings,models).")
    c.add_argument("--rpm", type=int, default=0, help="Requests per minute; 0 = unlimited (default: 0).")
    c.add_argument("--tpm", type=int, default=0, help="Tokens per minute, prompt + completion; 0 = unlimited (default: 0).")
    c.add_argument("--json", action="store_true", help="Print the record and key as JSON.")
    ls = ks.add_parser("list", help="List keys (never the keys themselves).", parents=[where])
    ls.add_argument("--all", action="store_true", help="Include revoked keys.")
    r = ks.add_parser("revoke", help="Revoke a key by name.", parents=[where])
    r.add_argument("name", help="The key's name.")
    k.set_defaults(func=_keys)


def _add_setting_flags(p: argparse.ArgumentParser) -> None:
    """Adds ``--<name>`` for every scalar ServerSettings field that has no hand-written flag above, so a
    setting declared in settings.py reaches the command line as it reaches YAML and the environment."""
    import typing

    from servelm.server.settings import ServerSettings

    taken = {a.dest for a in p._actions}
    for name, field in ServerSettings.model_fields.items():
        if name in taken:
            continue
        kinds = [t for t in typing.get_args(field.annotation) or (field.annotation,) if t is not type(None)]
        if len(kinds) != 1 or kinds[0] not in (bool, int, float, str):
            continue  # lists and choices keep to YAML and the environment
        flag = "--" + name.replace("_", "-")
        help_text = (field.description or "").replace("%", "%%") or None
        if kinds[0] is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=_S, help=help_text)
        else:
            p.add_argument(flag, type=kinds[0], default=_S, help=help_text)


def _show_defaults(p: argparse.ArgumentParser) -> None:
    """Appends ``(default: X)`` from ``ServerSettings`` (where each default is declared) to the help of every
    flag whose help does not say its default yet."""
    from servelm.server.settings import ServerSettings

    fields = ServerSettings.model_fields
    for action in p._actions:
        if (action.dest in fields and action.nargs != 0  # an on/off flag is off unless given
                and action.help not in (None, argparse.SUPPRESS) and "default" not in action.help):
            default = fields[action.dest].get_default(call_default_factory=True)
            if default is None:
                continue
            shown = json.dumps(default) if isinstance(default, list) or " " in str(default) else default
            action.help = f"{action.help.rstrip('.')} (default: {shown})."


def _str_list(value: str) -> list[str]:
    """Returns a flag's list: a JSON list ('["http://a", "http://b"]', as vLLM takes it) or 'a,b'."""
    if value.lstrip().startswith("["):
        try:
            items = json.loads(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a JSON list: {value}") from None
        if not isinstance(items, list) or not all(isinstance(x, str) for x in items):
            raise argparse.ArgumentTypeError(f"not a JSON list of strings: {value}")
        return items
    return [x.strip() for x in value.split(",") if x.strip()]


def _check_port_free(host: str, port: int) -> None:
    """Exits with a clear message when ``host:port`` cannot be bound (already in use, no permission),
    before the model loads rather than after."""
    if port == 0:
        return
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT is no conflict
            s.bind((host, port))
    except OSError as e:
        hint = " (is another server running there? choose another --port)" if e.errno == errno.EADDRINUSE else ""
        sys.exit(f"servelm serve: cannot listen on {host}:{port}: {e.strerror or e}{hint}")


def _settings(args: argparse.Namespace, fields: tuple[str, ...]):
    from pydantic import ValidationError

    from servelm.server.settings import ServerSettings

    overrides = {f: getattr(args, f) for f in fields if hasattr(args, f)}
    try:
        return ServerSettings.load(getattr(args, "config", None), **overrides)
    except FileNotFoundError as e:
        sys.exit(f"servelm: {e}")
    except ValidationError as e:
        err = e.errors()[0]
        sys.exit(f"servelm: bad setting {'.'.join(map(str, err['loc']))}: {err['msg']}")




def engine_settings(settings) -> dict:
    """Returns the server settings that configure the engine (``EngineConfig`` keyword arguments), those set."""
    fields = ("max_num_seqs", "max_model_len", "kv_cache_memory_bytes", "enable_prefix_caching", "dtype",
              "quantization", "quant_calibration", "tensor_parallel_size", "enforce_eager", "speculative_config")
    return {f: getattr(settings, f) for f in fields if getattr(settings, f) is not None}


def _serve(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from servelm.server.settings import ServerSettings

    settings = _settings(args, tuple(ServerSettings.model_fields))
    if settings.model and not settings.model.startswith("dummy:") and not os.path.exists(settings.model):
        sys.exit(f"servelm serve: model not found: {settings.model} (give a .gguf file, a Hugging Face model "
                 "directory or dummy:<arch>; leave --model out for the embedded SmolLM2)")
    _check_port_free(settings.host, settings.port)
    engine_kwargs = engine_settings(settings)
    if settings.speculative_config is not None:  # a bad config fails here, before the model loads
        from servelm.engine.speculative import SpeculativeConfig

        try:
            SpeculativeConfig.parse(settings.speculative_config)
        except ValueError as e:
            sys.exit(f"servelm serve: {e}")
    if settings.replicas or settings.max_replicas or settings.min_replicas is not None:
        from servelm.deploy.ray_serve import scaling_problem, serve_on_ray
        from servelm.engine import EngineConfig

        if problem := scaling_problem(settings):
            sys.exit(f"servelm serve: {problem}")

        return serve_on_ray(settings, EngineConfig(model=settings.model, **engine_kwargs))
    import uvicorn

    from servelm.engine import AsyncEngine, EngineConfig
    from servelm.server.app import create_app
    from servelm.server.logs import setup_logging

    setup_logging(settings.log_level)
    engine = AsyncEngine(EngineConfig(model=settings.model, **engine_kwargs))
    from servelm.prompts import UnknownStrategyError
    from servelm.safety import PolicyError

    try:
        app = create_app(settings, engine)
    except (PolicyError, UnknownStrategyError) as e:
        sys.exit(f"servelm serve: {e}")
    admission = app.state.servelm.admission

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            admission.draining = True  # /ready turns 503 so load balancers stop sending
            super().handle_exit(sig, frame)

    # h11 and asyncio, named: ray[serve] installs httptools and uvloop, which uvicorn's "auto" would pick
    # instead of the parser and loop this server is tested with.
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_config=None, access_log=False,
                            timeout_graceful_shutdown=settings.shutdown_timeout_s, lifespan="on",
                            http="h11", loop="asyncio")
    Server(config).run()
    return 0


def _keys(args: argparse.Namespace) -> int:
    from servelm.server.keys import open_key_store

    settings = _settings(args, ("data_dir", "pg_url"))
    store = open_key_store(settings)
    try:
        if args.keys_command == "create":
            try:
                key, rec = store.create(args.name, args.scopes, args.rpm, args.tpm)
            except ValueError as e:
                sys.exit(f"servelm keys create: {e}")
            if args.json:
                print(json.dumps(rec.public() | {"key": key}))
            else:
                print(f"Created key '{rec.name}' (scopes {','.join(rec.scopes)}, rpm {rec.rpm or 'unlimited'}, "
                      f"tpm {rec.tpm or 'unlimited'}). It is shown only now:\n{key}")
        elif args.keys_command == "list":
            rows = store.list(include_revoked=args.all)
            print(f"{'NAME':<20} {'HINT':<20} {'SCOPES':<28} {'RPM':>6} {'TPM':>8} STATUS")
            for r in rows:
                print(f"{r.name:<20} {r.hint:<20} {','.join(r.scopes):<28} {r.rpm:>6} {r.tpm:>8} "
                      f"{'revoked' if r.revoked_at else 'active'}")
        elif args.keys_command == "revoke":
            if not store.revoke(args.name):
                sys.exit(f"servelm keys revoke: no active key named {args.name!r}")
            print(f"Revoked key '{args.name}'.")
    finally:
        store.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    """Runs ``serve`` or ``keys`` (the standalone entry of ``python -m servelm.server``)."""
    parser = argparse.ArgumentParser(prog="servelm")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args) or 0
