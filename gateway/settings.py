"""Gateway settings: defaults < YAML config file (`--config` or SALORA_CONFIG) < SALORA_* environment
variables < command-line flags. Nested fields take `__` in the environment (SALORA_LIMITS__MAX_TOKENS).
With nothing set, the gateway serves the embedded model, open to local callers."""

from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from gateway.adapters.config import LifecycleConfig
from gateway.canary.config import CanaryConfig
from salora.errors import SaLoRAError
from salora.modeldir import EMBEDDED, EMBEDDED_UNALIGNED, model_id, salora_home

EMBEDDED_MODELS = (EMBEDDED, EMBEDDED_UNALIGNED)
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$"  # tenant and adapter names


class TenantConfig(BaseModel):
    """A tenant declared in the config; its key is given only as a SHA-256 hex digest."""

    model_config = {"extra": "forbid"}

    name: str = Field(pattern=NAME_PATTERN)
    key_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    adapters: list[str] = ["*"]
    rpm: int | None = Field(default=None, gt=0)
    tpm: int | None = Field(default=None, gt=0)


class Limits(BaseModel):
    """Per-request bounds; anything larger is refused before it reaches the engine."""

    model_config = {"extra": "forbid"}

    max_body_bytes: int = Field(default=1 << 20, gt=0)  # every request but an adapter upload (lifecycle.max_upload_bytes)
    max_header_bytes: int = Field(default=16 << 10, ge=1024)  # request line + headers, counted as they arrive (431 above)
    max_tokens: int = Field(default=2048, gt=0)  # the most a request may ask for
    default_max_tokens: int = Field(default=256, gt=0)  # when a request does not say
    max_messages: int = Field(default=256, gt=0)  # messages in one chat request
    max_concurrent_streams: int = Field(default=16, gt=0)  # open streamed answers per tenant (429 above)
    # with `redis_url` (replicas, docs/replicas.md): what a replica does while Redis does not answer
    redis_down: Literal["closed", "share"] = "closed"  # closed: 503 for limited tenants; share: limit/replicas each
    replicas: int = Field(default=1, gt=0)  # the replicas sharing the limits, for `redis_down: share`

    @model_validator(mode="after")
    def _default_within_max(self) -> Limits:
        if self.default_max_tokens > self.max_tokens:  # else every request that does not say would be a 400
            raise ValueError(f"default_max_tokens ({self.default_max_tokens}) is above max_tokens ({self.max_tokens})")
        return self


class Timeouts(BaseModel):
    """Bounds on one generation, on every engine, so a hung engine ends a request with an error
    instead of holding it (and its client) forever."""

    model_config = {"extra": "forbid"}

    first_token_s: float = Field(default=120.0, gt=0)  # until the first token (queueing and prefill included)
    total_s: float = Field(default=900.0, gt=0)  # a whole answer


class VLLMConfig(BaseModel):
    """One vLLM deployment: one or more replicas of `vllm serve` (or any OpenAI-compatible server) on
    the same model. See docs/vllm.md."""

    model_config = {"extra": "forbid"}

    urls: list[str] = Field(min_length=1)  # each replica's base URL, e.g. http://vllm-0:8000
    model: str | None = None  # the upstream's --served-model-name; default: what its /v1/models lists first
    adapter_dir: Path | None = None  # the adapter volume shared with vLLM, as this gateway sees it; None: no adapters
    upstream_adapter_dir: str | None = None  # the same volume as vLLM sees it; default: adapter_dir
    max_loras: int = Field(default=4, gt=0)  # adapters kept on each replica: vLLM's --max-loras
    api_key: SecretStr | None = None  # vLLM's --api-key
    health_path: str = "/health"
    health_interval_s: float = Field(default=5.0, gt=0)
    connect_timeout_s: float = Field(default=5.0, gt=0)
    request_timeout_s: float = Field(default=600.0, gt=0)  # the longest pause between two bytes of an answer
    max_connections: int = Field(default=1000, gt=0)  # pooled connections to all replicas together
    drain_timeout_s: float = Field(default=30.0, ge=0)  # how long an unload waits for requests on the adapter

    @field_validator("urls")
    @classmethod
    def _http_urls(cls, v: list[str]) -> list[str]:
        for url in v:
            if not re.match(r"^https?://[^/\s]+(/\S*)?$", url):
                raise ValueError(f"{url!r} is not an http(s) URL")
        return [url.rstrip("/") for url in v]

    @field_validator("adapter_dir")
    @classmethod
    def _expand_dir(cls, v: Path | None) -> Path | None:
        return v.expanduser() if v is not None else None


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SALORA_", env_nested_delimiter="__", extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    model: str = EMBEDDED  # a model directory, `embedded` (the aligned demo base) or `embedded-unaligned`
    model_name: str | None = None  # the id clients send as `model`; default from `model`
    engine: str = "local"  # `local` (in process), `vllm` (the `vllm:` section) or a name under `engines`
    vllm: VLLMConfig | None = None
    engines: dict[str, VLLMConfig] = {}  # more vLLM deployments, by name, for `routes`
    routes: dict[str, str] = {}  # model name -> engine: served whole by that engine's model (e.g. a merged SaLoRA model)
    adapters: dict[str, Path] = {}  # name -> PEFT adapter directory, loaded at start
    tenants: list[TenantConfig] = []
    admin_key: SecretStr | None = None
    allow_open: bool = False  # serve with no admin key and no tenants on a non-loopback host (no authentication)
    metrics_key: SecretStr | None = None  # a bearer token for /metrics only (Prometheus); the admin key works too
    state_dir: Path = Field(default_factory=lambda: salora_home() / "gateway")
    db_url: str | None = None  # SQLite (default: under state_dir) or PostgreSQL for several replicas
    redis_url: SecretStr | None = None  # rate limits and stream slots shared by replicas (docs/replicas.md)
    limits: Limits = Limits()
    rate_window_s: float = Field(default=60.0, gt=0)  # the "minute" of rpm/tpm (short in tests)
    max_batch_size: int = Field(default=48, gt=0)
    max_model_len: int = Field(default=2048, gt=0)
    lifecycle: LifecycleConfig = LifecycleConfig()  # adapter uploads, re-probes (docs/lifecycle.md)
    canary: CanaryConfig = CanaryConfig()  # the safety gate every uploaded adapter passes (docs/lifecycle.md)
    timeouts: Timeouts = Timeouts()  # per generation, every engine (docs/gateway.md, "Failure handling")
    request_log: Literal["off", "text", "json"] = "off"  # one log line per chat request (docs/gateway.md)
    shutdown_timeout_s: float = Field(default=25.0, ge=0)  # SIGTERM: how long requests in flight may still run

    @field_validator("model")
    @classmethod
    def _model_exists(cls, v: str) -> str:
        if v in EMBEDDED_MODELS:
            return v
        path = Path(v).expanduser()
        if not (path / "config.json").is_file():
            raise ValueError(f"{v}: not a model directory (no config.json) nor one of {', '.join(EMBEDDED_MODELS)}")
        return str(path)

    @field_validator("adapters")
    @classmethod
    def _adapters_exist(cls, v: dict[str, Path]) -> dict[str, Path]:
        for name, path in v.items():
            if not re.match(NAME_PATTERN, name):
                raise ValueError(f"adapter name {name!r} must match {NAME_PATTERN}")
            if not (path.expanduser() / "adapter_config.json").is_file():
                raise ValueError(f"adapter {name}: {path} is not a PEFT adapter directory (no adapter_config.json)")
        return {name: path.expanduser() for name, path in v.items()}

    @field_validator("state_dir")
    @classmethod
    def _expand_home(cls, v: Path) -> Path:
        return v.expanduser()

    @model_validator(mode="after")
    def _engines_known(self) -> Settings:
        for name in self.engines:
            if name in ("local", "vllm") or not re.match(NAME_PATTERN, name):
                raise ValueError(f"engine name {name!r} must match {NAME_PATTERN} and not be `local` or `vllm`")
        if self.served_model_id in self.adapters:
            raise ValueError(f"adapter {self.served_model_id!r} has the name of the served model")
        known = self.engine_names
        if self.engine not in known:
            raise ValueError(f"engine {self.engine!r} is not one of {', '.join(known)} (`vllm` needs a `vllm:` section)")
        for model, engine in self.routes.items():
            if not re.match(NAME_PATTERN, model):
                raise ValueError(f"route name {model!r} must match {NAME_PATTERN}")
            if model in self.adapters or model == self.served_model_id:
                raise ValueError(f"route {model!r} is also the name of an adapter or of the model")
            if engine not in known:
                raise ValueError(f"route {model!r}: engine {engine!r} is not one of {', '.join(known)}")
        return self

    @model_validator(mode="after")
    def _not_open_by_accident(self) -> Settings:
        """With no admin key and no tenants every caller is served without a key: that is for a
        developer's own machine, so any other host needs `allow_open` said out loud."""
        if self.admin_key is None and not self.tenants and not self.allow_open and not _loopback(self.host):
            raise ValueError(f"host {self.host!r} is not a loopback address, and with no admin_key and no tenants the "
                             "gateway would serve anyone without a key: set SALORA_ADMIN_KEY (or tenants), or "
                             "allow_open: true")
        return self

    @property
    def engine_names(self) -> list[str]:
        return ["local", *(["vllm"] if self.vllm else []), *self.engines]

    @property
    def served_model_id(self) -> str:
        if self.model_name:
            return self.model_name
        return model_id(self.model) if self.model in EMBEDDED_MODELS else Path(self.model).resolve().name

    @property
    def database_url(self) -> str:
        return self.db_url or f"sqlite:///{self.state_dir / 'gateway.db'}"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, env_settings, YamlConfigSettingsSource(settings_cls)


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _check_yaml(path: Path) -> None:
    """The config file must be YAML holding a mapping from setting names: anything else (a list, a
    scalar, a number as a key) would fail deep inside pydantic-settings with an unhelpful exception."""
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:  # a YAML message spans lines; the error is one line
        raise SaLoRAError(f"config {path}: not valid YAML ({' '.join(str(e).split())})") from e
    if document is not None and not (isinstance(document, dict) and all(isinstance(k, str) for k in document)):
        raise SaLoRAError(f"config {path}: must be a mapping of setting names to values")


def load_settings(config: str | Path | None = None, **overrides: Any) -> Settings:
    """Settings from an optional YAML file, the environment and explicit overrides; every problem
    becomes one SaLoRAError line."""
    path = config or os.environ.get("SALORA_CONFIG")
    cls = Settings
    if path:
        if not Path(path).is_file():
            raise SaLoRAError(f"config {path}: no such file")
        _check_yaml(Path(path))
        cls = type("FileSettings", (Settings,), {"model_config": {**Settings.model_config, "yaml_file": str(path)}})
    try:
        return cls(**overrides)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'settings'}: {err['msg']}" for err in e.errors())
        raise SaLoRAError(f"invalid settings: {problems}") from e
