"""``servelm serve --replicas N``: N engine replicas on Ray Serve behind one OpenAI-compatible endpoint.

Two deployments make one Serve application::

    HTTP ─▶ Ray Serve proxy ─▶ ApiServer (today's FastAPI app, create_app) ─▶ handle ─▶ EngineReplica × N
                                          RemoteEngine                    prefix-aware router

The API tier is the single-process server's own app: the routes, auth, limits, guard and pipeline run there
unchanged, over a :class:`RemoteEngine` that has ``AsyncEngine``'s public face. Each :class:`EngineReplica`
owns one ``AsyncEngine`` (on a GPU host, one GPU through ``ray_actor_options``). Requests reach the replicas
through a ``DeploymentHandle`` whose router is Ray's own ``PrefixCacheAffinityRouter``: the router needs
the prompt when it picks a replica, and a request the proxy forwards as HTTP carries no body at that point,
which is why the engine sits behind a handle rather than behind the proxy directly.

A stream stays on its replica; closing it (the client hung up) cancels the replica's generator, which aborts
the request there and frees its KV blocks. A replica that dies ends its streams with an error event
(``EngineDeadError`` reaches the stream encoder) and Ray Serve starts a new one; new requests go to the
survivors. With ``--max-replicas`` Ray Serve autoscales the engine replicas on ongoing requests; one that
leaves drains its streams first. Each scrape of ``/metrics`` asks every engine replica for its figures
(``DeploymentHandle.broadcast``), so one scrape shows them all, labelled by replica.
"""
from __future__ import annotations

import asyncio
import logging
import math
import os
import signal
import threading
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, fields
from types import SimpleNamespace

from ray import serve

from servelm.engine import AsyncEngine, EngineConfig, EngineDeadError, EngineStats, RequestOutput, SamplingParams

log = logging.getLogger("servelm.deploy")

APP_NAME = "servelm"
ENGINE_DEPLOYMENT = "EngineReplica"
# Ray's prefix-cache-affinity router. Imported from its defining module: ``ray.serve.llm`` re-exports it
# but imports pyarrow and the rest of ray[llm] on the way, which ray[serve] does not install.
PREFIX_ROUTER = ("ray.llm._internal.serve.routing_policies.prefix_aware.prefix_aware_router."
                 "PrefixCacheAffinityRouter")


def routing_key(prompt_ids: list[int]) -> str:
    """Returns the prompt's token ids as a string, one character per token.

    The prefix router matches character prefixes; spelled this way a shared prefix of the string is exactly a
    shared prefix of tokens, the unit the replicas' KV caches reuse, and no detokenizing is needed. Ids at or
    above 0xD800 skip the surrogate range, which is not valid text."""
    return "".join(chr(i if i < 0xD800 else i + 0x800) for i in prompt_ids)


@dataclass(slots=True)
class EngineCall:
    """One request from the API tier to an engine replica. ``prompt`` is what the router reads
    (``routing_key`` of the ids); the replica runs ``prompt_ids``."""

    prompt: str
    prompt_ids: list[int]
    params: SamplingParams
    request_id: str


@dataclass(slots=True)
class ReplicaCounts:
    """What one engine replica served since it started: the per-replica series of ``/metrics``."""

    requests: int = 0
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0  # found in this replica's prefix cache
    streams_running: int = 0


class EngineReplica:
    """One Serve replica owning one ``AsyncEngine``."""

    async def __init__(self, engine_config: EngineConfig):
        self.engine = AsyncEngine(engine_config)
        await self.engine.start()
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.counts = ReplicaCounts()

    def describe(self) -> dict:
        """Returns what the API tier needs to serve this model: name, context window, tokenizer, vocab size,
        this replica's id and its engine statistics."""
        eng = self.engine.engine
        return {"model_name": eng.model_name, "max_model_len": eng.max_model_len, "tokenizer": eng.tokenizer,
                "vocab_size": eng.model_config.vocab_size, "replica": self.replica, "stats": self.engine.stats()}

    def snapshot(self) -> tuple[str, EngineStats, ReplicaCounts]:
        """Returns this replica's id, engine statistics and counts (the API tier asks every replica at each
        scrape of ``/metrics``)."""
        return self.replica, self.engine.stats(), self.counts

    async def generate(self, call: EngineCall):
        """Yields ``(replica id, RequestOutput, EngineStats or None)``; the stats come with the last output."""
        c = self.counts
        c.requests += 1
        c.streams_running += 1
        try:
            async for out in self.engine.generate(call.prompt_ids, call.params, request_id=call.request_id):
                if out.finished:
                    c.prompt_tokens += len(out.prompt_token_ids)
                    c.cached_prompt_tokens += out.num_cached_tokens
                yield self.replica, out, (self.engine.stats() if out.finished else None)
        finally:
            c.streams_running -= 1

    def check_health(self) -> None:
        """Ray Serve's health check: raising marks the replica unhealthy, and Serve replaces it."""
        if not self.engine.is_running:
            raise RuntimeError("the engine's step loop is not running")

    async def __del__(self):
        await self.engine.shutdown()


class RemoteEngine:
    """``AsyncEngine``'s public face (start, generate, abort, stats, tokenizer, model name, context window)
    over the engine replicas' handle, for ``create_app``.

    Tokenizing and chat templates run here, in the API tier, with the replicas' own tokenizer; ``engine``
    carries the grammar compiler the structured-output check uses. Per-replica series (requests, prompt
    tokens, prefix-cache hits, streams running; label ``replica``) go to the app's registry through
    :meth:`bind_metrics`; :meth:`refresh_stats`, run before each scrape, asks every replica for them, so one
    scrape of any API replica shows every engine replica."""

    def __init__(self, handle):
        self.handle = handle.options(stream=True)
        self._describe = handle
        self.engine = None
        self._tokenizer = None
        self._model_name = ""
        self._max_model_len = 0
        self._stats: dict[str, EngineStats] = {}
        self._running = False
        self._streams: dict[str, object] = {}
        self._counts: dict[str, ReplicaCounts] = {}

    def bind_metrics(self, registry) -> None:
        """Registers the per-replica series (label ``replica``) on ``registry``."""
        registry.register(_ReplicaCollector(self._counts))

    async def refresh_stats(self, timeout_s: float = 5.0) -> None:
        """Asks every live engine replica for its statistics and counts. A replica that does not answer within
        ``timeout_s`` (dying, or gone) drops out of the series until it answers again."""
        try:
            answers = await self._describe.broadcast("snapshot").results_async(timeout_s=timeout_s,
                                                                               return_exceptions=True)
        except Exception as e:  # no replica reachable: keep the last figures, /ready reports the engine
            log.warning("no engine replica answered the metrics broadcast: %s", e)
            return
        live = [a for a in answers if isinstance(a, tuple)]
        if not live:
            return
        self._stats.clear()
        self._counts.clear()
        for replica, stats, counts in live:
            self._stats[replica], self._counts[replica] = stats, counts

    async def start(self) -> None:
        """Asks one replica for the model's description and loads the tokenizer it sends.

        Raises ``EngineDeadError`` when no replica answers."""
        try:
            info = await self._describe.describe.remote()
        except Exception as e:
            raise EngineDeadError(f"no engine replica answered: {e}") from e
        from servelm.engine.structured_output import GrammarCompiler

        self._tokenizer = info["tokenizer"]
        self._model_name, self._max_model_len = info["model_name"], info["max_model_len"]
        self._stats[info["replica"]] = info["stats"]
        self.engine = SimpleNamespace(grammars=GrammarCompiler(self._tokenizer, info["vocab_size"]),
                                      model_name=self._model_name, max_model_len=self._max_model_len)
        self._running = True

    async def shutdown(self) -> None:
        self._running = False

    @property
    def is_running(self) -> bool:
        return self._running

    @property
    def healthy(self) -> bool:
        return self._running

    @property
    def tokenizer(self):
        return self._tokenizer

    async def get_tokenizer(self):
        return self._tokenizer.hf

    @property
    def model_name(self) -> str:
        return self._model_name

    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    def stats(self) -> EngineStats:
        """Returns the replicas' last reported statistics, summed (each replica reports with every finished
        request). Raises ``EngineDeadError`` before :meth:`start`."""
        if not self._stats:
            raise EngineDeadError("the engine replicas have not answered yet")
        return _sum_stats(list(self._stats.values()))

    async def generate(self, prompt, params: SamplingParams | None = None, request_id: str | None = None, *,
                       sampling_params: SamplingParams | None = None) -> AsyncIterator[RequestOutput]:
        """Streams one request's outputs from the replica the router picks (as ``AsyncEngine.generate``).

        ``prompt`` is token ids or a text (tokenized here). Raises what the replica raised
        (``InvalidRequestError``, ``RequestFailedError``), and ``EngineDeadError`` when the replica dies."""
        from ray.exceptions import RayActorError, RayTaskError

        params = params or sampling_params or SamplingParams()
        if not self._running:
            raise EngineDeadError("the engine is not running")
        ids = prompt if isinstance(prompt, list) else self._tokenizer.encode(prompt, add_special_tokens=True)
        rid = request_id or uuid.uuid4().hex
        response = self.handle.generate.remote(EngineCall(routing_key(ids), list(ids), params, rid))
        self._streams[rid] = response
        replica = None
        try:
            async for replica_id, out, stats in response:
                replica = replica_id
                if stats is not None:
                    self._stats[replica] = stats
                yield out
        except RayTaskError as e:  # the replica raised: give the caller the engine's own exception
            raise e.as_instanceof_cause().cause if isinstance(e.cause, Exception) else e from None
        except RayActorError as e:
            self._stats.pop(replica, None)
            self._counts.pop(replica, None)
            raise EngineDeadError(f"engine replica {replica or '?'} died mid-request") from e
        finally:
            self._streams.pop(rid, None)
            response.cancel()  # a stream closed early (the client hung up) aborts on its replica

    async def abort(self, request_id: str) -> None:
        """Aborts a request on its replica (cancels its stream there)."""
        response = self._streams.get(request_id)
        if response is not None:
            response.cancel()



class _ReplicaCollector:
    """The per-replica series, from the counts :meth:`RemoteEngine.refresh_stats` last collected."""

    def __init__(self, counts: dict[str, ReplicaCounts]):
        self.counts = counts

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        families = {
            "requests": CounterMetricFamily("servelm:replica_requests", "Requests served, per engine replica.",
                                            labels=["replica"]),
            "prompt_tokens": CounterMetricFamily("servelm:replica_prompt_tokens", "Prompt tokens, per engine "
                                                 "replica.", labels=["replica"]),
            "cached_prompt_tokens": CounterMetricFamily(
                "servelm:replica_cached_prompt_tokens", "Prompt tokens found in the replica's prefix cache, per "
                "engine replica.", labels=["replica"]),
            "streams_running": GaugeMetricFamily("servelm:replica_streams_running", "Streams running, per engine "
                                                 "replica.", labels=["replica"])}
        for replica, counts in list(self.counts.items()):
            for name, family in families.items():
                family.add_metric([replica], getattr(counts, name))
        yield from families.values()


def _sum_stats(parts: list[EngineStats]) -> EngineStats:
    total = {f.name: sum(getattr(s, f.name) for s in parts) for f in fields(EngineStats)
             if f.name not in ("kv_usage", "prefix_hit_rate", "healthy")}
    total["kv_usage"] = total["kv_blocks_used"] / max(total["kv_blocks_total"], 1)
    total["prefix_hit_rate"] = total["prefix_cache_hits"] / max(total["prefix_cache_queries"], 1)
    total["healthy"] = all(s.healthy for s in parts)
    return EngineStats(**total)


@serve.ingress()
class ApiServer:
    """The API tier: ``create_app`` over a :class:`RemoteEngine` on the engine replicas' handle."""

    def __init__(self, settings, engine_handle):
        self.settings, self.engine_handle = settings, engine_handle

    def __serve_build_asgi_app__(self):
        from servelm.server.app import create_app
        from servelm.server.logs import setup_logging

        setup_logging(self.settings.log_level)
        engine = RemoteEngine(self.engine_handle)
        app = create_app(self.settings, engine)
        engine.bind_metrics(app.state.servelm.metrics.registry)
        return app


def scaling_problem(settings) -> str | None:
    """Returns what is wrong with the replica settings (--replicas, --min-replicas, --max-replicas) in words
    that say what to change, or None."""
    lo, hi = settings.min_replicas, settings.max_replicas
    if lo is not None and hi is None:
        return "--min-replicas needs --max-replicas (the most replicas autoscaling may start)"
    if hi is not None and lo is not None and lo > hi:
        return f"--min-replicas {lo} is above --max-replicas {hi}"
    if hi is not None and settings.replicas is not None and not (lo or 1) <= settings.replicas <= hi:
        return (f"--replicas {settings.replicas} (the replicas to start with when autoscaling) must lie between "
                f"--min-replicas {lo or 1} and --max-replicas {hi}")
    return None


def engine_deployment_options(settings, num_gpus: float = 0) -> dict:
    """Returns the engine replicas' Serve deployment options: a fixed ``settings.replicas``, or, with
    ``settings.max_replicas``, an ``autoscaling_config`` on ongoing requests per replica."""
    from ray.serve.config import AutoscalingConfig, RequestRouterConfig

    if settings.max_replicas is not None:
        lo = settings.min_replicas if settings.min_replicas is not None else 1
        scaling = {"autoscaling_config": AutoscalingConfig(
            min_replicas=lo, max_replicas=settings.max_replicas,
            initial_replicas=settings.replicas if settings.replicas is not None else max(lo, 1),
            # a replica is busy when its batch is full: scale so that each runs about max_num_seqs streams
            target_ongoing_requests=settings.target_ongoing_requests or settings.max_num_seqs,
            # scale down slowly: a new replica costs a model load, and LLM load comes in bursts
            downscale_delay_s=300)}
    else:
        scaling = {"num_replicas": settings.replicas}
    return {
        **scaling,
        "max_ongoing_requests": settings.max_num_seqs + settings.max_queue,
        "ray_actor_options": {"num_cpus": settings.replica_num_cpus, "num_gpus": num_gpus},
        "health_check_period_s": 5,
        # Graceful drain: a replica leaving (scale-down, a rolling update) takes no new requests and has this
        # long to finish its streams before Serve stops it.
        "graceful_shutdown_timeout_s": settings.shutdown_timeout_s,
        "request_router_config": RequestRouterConfig(
            request_router_class=PREFIX_ROUTER,
            # Prefix affinity while the replicas' queues differ by fewer than this many requests; past it the
            # router falls back to the less loaded of two (power of two choices).
            request_router_kwargs={"imbalanced_threshold": settings.router_imbalanced_threshold})
        if settings.request_router == "prefix_cache_affinity" else RequestRouterConfig()}


def build_app(settings, engine_config: EngineConfig, num_gpus: float = 0):
    """Returns the Serve application (bound deployments) for the engine replicas ``settings`` asks for."""
    engine = serve.deployment(EngineReplica, name=ENGINE_DEPLOYMENT).options(
        **engine_deployment_options(settings, num_gpus))
    api = serve.deployment(ApiServer, name="ApiServer").options(
        num_replicas=settings.api_replicas, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=10_000)
    return api.bind(settings, engine.bind(engine_config))


def app_builder(args: dict):
    """Returns the Serve application for a Serve config file or a KubeRay ``RayService`` (``import_path:
    servelm.deploy.ray_serve:app_builder``): ``args`` holds server settings by their snake_case names
    (``replicas``, ``min_replicas``, ``max_replicas``, ...), over ``SERVELM_*`` environment variables, and
    optionally ``replica_num_gpus`` (GPUs per engine replica; default 1 on a cluster that has GPUs, else 0).

    Raises ``ValueError`` when the settings are invalid or the replica bounds impossible."""
    import ray

    from servelm.server.cli import engine_settings
    from servelm.server.settings import ServerSettings

    args = dict(args or {})
    gpus = args.pop("replica_num_gpus", None)
    settings = ServerSettings(**args)
    if not (settings.replicas or settings.max_replicas):
        settings.replicas = 1
    if problem := scaling_problem(settings):
        raise ValueError(problem)
    if gpus is None:
        gpus = settings.tensor_parallel_size if ray.cluster_resources().get("GPU", 0) >= 1 else 0
    return build_app(settings, EngineConfig(model=settings.model, **engine_settings(settings)), float(gpus))


def _bootstrap_admin_key(settings) -> str | None:
    """Returns a new ``admin`` key when the key store has none (a first start), else None. Made here, in
    the driver, so that the key is printed to this terminal and not into a replica's log file."""
    from servelm.server.keys import open_key_store

    store = open_key_store(settings)
    try:
        return store.create("admin", ("admin",))[0] if store.count() == 0 else None
    finally:
        store.close()


def serve_on_ray(settings, engine_config: EngineConfig) -> int:
    """Runs the application on the Ray cluster at ``settings.ray_address`` (default: a local one started here)
    until SIGINT/SIGTERM; returns the exit status."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if settings.ray_address:
        ray.init(address=settings.ray_address, log_to_driver=False)
    else:
        # Logical CPUs: the replicas' shares plus one for the router's prefix-tree actor, which Ray places
        # like any default actor (it needs a whole free CPU to start and holds none after).
        most = settings.max_replicas or settings.replicas
        cpus = max(os.cpu_count() or 1, math.ceil(most * settings.replica_num_cpus) + 1)
        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    num_gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
    admin_key = None if settings.no_auth else _bootstrap_admin_key(settings)
    serve.start(http_options={"host": settings.host, "port": settings.port})
    serve.run(build_app(settings, engine_config, num_gpus * settings.tensor_parallel_size),
              name=APP_NAME, route_prefix="/")
    count = (f"{settings.min_replicas or 1} to {settings.max_replicas}" if settings.max_replicas
             else str(settings.replicas))
    print(f"servelm: {count} engine replicas on Ray Serve at http://{settings.host}:{settings.port}", flush=True)
    if admin_key:  # printed here, never logged: the replicas' output goes to Ray's log files
        print(f"First start: created an admin API key (shown only now; store it):\n\n{admin_key}\n", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    serve.delete(APP_NAME)
    serve.shutdown()
    ray.shutdown()
    return 0
