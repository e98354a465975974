"""The TOML configuration contract: frozen msgspec Structs, loading and validation.

Looked up as ``--config PATH``, then ``$DISPATCHER_CONFIG``, then
``/etc/dispatcher/config.toml``; with none, the built-in table of SEED.md's five
providers is used. Keys are never literals in the file: they come from
``api_key_env`` or ``api_key_file`` (systemd credentials).
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import msgspec

from dispatcher.contract.chat import CAPABILITIES, Capability

DEFAULT_CONFIG_PATH = Path("/etc/dispatcher/config.toml")
DEFAULT_SOCKET = "/run/dispatcher/dispatcher.sock"
TASK_CLASSES: tuple[str, ...] = ("realtime", "complex", "default", "bulk")
# How a provider spells its requests; the quirks of each live in the adapters.
AdapterName = Literal["openai", "zhipu", "hunyuan", "nvidia", "siliconflow"]

Positive = Annotated[int, msgspec.Meta(ge=1)]
NonNegative = Annotated[int, msgspec.Meta(ge=0)]
Seconds = Annotated[float, msgspec.Meta(gt=0)]


class ConfigError(Exception):
    """The configuration is invalid; the message names the file, the key and the fix."""


class _Section(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    pass


class DaemonConfig(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    socket: str = DEFAULT_SOCKET
    socket_mode: str = "0660"
    socket_group: str | None = None
    state_dir: str = "/var/lib/dispatcher"
    max_frame_bytes: Positive = 16 * 1024 * 1024
    max_queued: Positive = 100_000
    max_queued_bytes: Positive = 1024 * 1024 * 1024
    max_connections: Positive = 1000  # below the unit's LimitNOFILE, with room for upstreams
    max_connections_per_uid: Positive = 256  # one Unix user cannot take every connection
    max_in_flight_per_connection: Positive = 10_000  # requests read and not yet answered
    max_reply_bytes: Positive = 64 * 1024 * 1024  # replies waiting for one slow reader
    idle_timeout_s: Seconds = 3600.0
    drain_s: Seconds = 30.0
    log_level: Literal["debug", "info", "warning", "error"] = "info"


class ProviderConfig(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    url: str
    model: str
    kind: Literal["chat", "embed"] = "chat"
    adapter: AdapterName = "openai"
    api_key_env: str | None = None
    api_key_file: str | None = None
    concurrency: Positive = 1
    rpm: NonNegative = 0
    burst: NonNegative = 0
    context_window: Positive = 128_000
    thinking: bool = False
    timeout_s: Seconds = 60.0
    daily_tokens: NonNegative = 0
    latency_s: Seconds = 1.0
    enabled: bool = True
    # What it accepts beyond plain chat: jobs that need one go only where it is.
    capabilities: list[Capability] = msgspec.field(default_factory=list)
    # Merged into every request body of this provider (a job's own `extra` wins).
    extra_body: dict[str, Any] = msgspec.field(default_factory=dict)
    # Embeddings only: texts per upstream request (texts of several jobs are packed into
    # one), the largest text accepted (estimated tokens), an optional cap on a request's
    # estimated tokens, and how long a batch may wait to fill while request tokens are scarce.
    max_batch: Positive = 32
    max_input_tokens: Positive = 8192
    max_request_tokens: Positive | None = None
    batch_linger_ms: Annotated[float, msgspec.Meta(ge=0)] = 50.0


class ClassPolicy(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    providers: list[str]
    strategy: Literal["capacity", "weighted"] = "capacity"
    weights: dict[str, float] = msgspec.field(default_factory=dict)
    priority: int | None = None
    hedge: bool = False


class RetryConfig(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    max_attempts: Positive = 6
    per_provider: Positive = 3
    backoff_base_s: Seconds = 2.0
    backoff_max_s: Seconds = 30.0


class CircuitConfig(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    failures: Positive = 5
    cooldown_s: Seconds = 30.0


class JournalConfig(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    enabled: bool = True
    keep_s: Seconds = 86_400.0
    synchronous: Literal["normal", "full"] = "normal"


class CacheConfig(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    ttl_s: Seconds = 3600.0
    max_bytes: Positive = 256 * 1024 * 1024
    redis_url: str | None = None
    # false: each owner (Unix user or client) has its own answers, so a cache hit never
    # tells one user what another asked.
    shared: bool = False
    # The per-text embedding cache in state_dir/embeddings.sqlite3 (LRU past this size).
    embed_max_bytes: Positive = 1024 * 1024 * 1024
    # Identical cacheable chat requests in flight at once share one upstream call.
    coalesce: bool = True
    # With redis_url: how long a vector stays in the shared cache (answers: ttl_s).
    embed_ttl_s: Seconds = 30 * 86_400.0


class ClusterConfig(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Several daemons sharing the same keys: their limits are taken from Redis."""

    redis_url: str | None = None
    instance_name: str | None = None  # default: the host name and the process id
    key_prefix: str = "dispatcher"
    lease_s: Seconds = 30.0  # a dead host's slots come back within this
    # While Redis is unreachable each daemon takes limit / instances; before it has ever
    # seen the others, it assumes this many.
    expected_instances: Positive = 1


class HttpConfig(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    socket: str | None = None
    listen: str | None = None  # TCP needs at least one client token, or allow_anonymous
    allow_anonymous: bool = False
    max_connections: Positive = 256
    header_timeout_s: Seconds = 10.0  # a request's line and headers must arrive within this
    body_timeout_s: Seconds = 30.0  # and its body within this


class ClientConfig(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """A client identity and its budgets.

    Who it is: its token on the HTTP front (``Authorization: Bearer``), and the Unix
    users (``uids``) or groups (``groups``, by name) that are this client on the socket.
    What it may spend, all optional (0 or absent: no limit of its own; a provider's
    limits still hold for everyone): ``rpm`` jobs sent upstream per minute,
    ``daily_tokens`` per UTC day across all providers, the ``providers`` and
    ``classes`` it may use, the highest request ``priority``, and how many of its
    jobs may wait or run at once (``max_queued``).
    """

    token_env: str | None = None
    token_file: str | None = None
    uids: list[NonNegative] = msgspec.field(default_factory=list)
    groups: list[str] = msgspec.field(default_factory=list)
    rpm: NonNegative = 0
    daily_tokens: NonNegative = 0
    providers: list[str] | None = None
    classes: list[str] | None = None
    max_priority: int | None = None
    max_queued: NonNegative = 0


class UsageConfig(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Per-day usage aggregates in ``state_dir/usage.sqlite3``, for ``dispatcher usage``."""

    keep_days: Positive = 90


class MetricsConfig(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    listen: str | None = None
    socket: str | None = None


class Config(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    daemon: DaemonConfig = msgspec.field(default_factory=DaemonConfig)
    providers: dict[str, ProviderConfig] = msgspec.field(default_factory=dict)
    classes: dict[str, ClassPolicy] = msgspec.field(default_factory=dict)
    retry: RetryConfig = msgspec.field(default_factory=RetryConfig)
    circuit: CircuitConfig = msgspec.field(default_factory=CircuitConfig)
    journal: JournalConfig = msgspec.field(default_factory=JournalConfig)
    cache: CacheConfig = msgspec.field(default_factory=CacheConfig)
    cluster: ClusterConfig = msgspec.field(default_factory=ClusterConfig)
    http: HttpConfig = msgspec.field(default_factory=HttpConfig)
    clients: dict[str, ClientConfig] = msgspec.field(default_factory=dict)
    usage: UsageConfig = msgspec.field(default_factory=UsageConfig)
    metrics: MetricsConfig = msgspec.field(default_factory=MetricsConfig)


# -- the built-in table (SEED.md) ----------------------------------------------------

# NVIDIA's NIM serves z-ai/glm4.7 behind its OpenAI-compatible API, with tool calling and
# response_format json_object; we do not rely on a json_schema mode there.
BUILTIN_PROVIDERS: dict[str, ProviderConfig] = {
    # glm-4-flash takes OpenAI-style function tools (tool_choice "auto" only, see the zhipu
    # adapter) and response_format json_object; it has no json_schema mode.
    "zhipu": ProviderConfig(
        adapter="zhipu",
        capabilities=["tools", "json_object"],
        url="https://open.bigmodel.cn/api/paas/v4/chat/completions",
        model="glm-4-flash",
        api_key_env="ZHIPU_API_KEY",
        concurrency=1,
        rpm=0,
        context_window=200_000,
        thinking=True,
        latency_s=1.03,
    ),
    # hunyuan-lite has neither function calling nor a JSON mode (Tencent offers those on
    # hunyuan-functioncall and the larger models): plain chat only.
    "hunyuan": ProviderConfig(
        adapter="hunyuan",
        url="https://api.hunyuan.cloud.tencent.com/v1/chat/completions",
        model="hunyuan-lite",
        api_key_env="HUNYUAN_API_KEY",
        concurrency=5,
        rpm=0,
        context_window=262_144,
        latency_s=1.20,
    ),
    "nvidia1": ProviderConfig(
        adapter="nvidia",
        capabilities=["tools", "json_object"],
        url="https://integrate.api.nvidia.com/v1/chat/completions",
        model="z-ai/glm4.7",
        api_key_env="NVIDIA1_API_KEY",
        concurrency=5,
        rpm=40,
        context_window=128_000,
        thinking=True,
        timeout_s=120.0,
        latency_s=7.17,
    ),
    "nvidia2": ProviderConfig(
        adapter="nvidia",
        capabilities=["tools", "json_object"],
        url="https://integrate.api.nvidia.com/v1/chat/completions",
        model="z-ai/glm4.7",
        api_key_env="NVIDIA2_API_KEY",
        concurrency=5,
        rpm=40,
        context_window=128_000,
        thinking=True,
        timeout_s=120.0,
        latency_s=2.68,
    ),
    "siliconflow": ProviderConfig(
        kind="embed",
        adapter="siliconflow",
        url="https://api.siliconflow.cn/v1/embeddings",
        model="BAAI/bge-large-zh-v1.5",
        api_key_env="SILICONFLOW_API_KEY",
        concurrency=5,
        rpm=5,
        daily_tokens=500_000,
        latency_s=0.10,
        # Our assumption, not a published limit: 32 texts per request is what we rely on.
        max_batch=32,
        # bge-large-zh-v1.5 reads at most 512 tokens per text.
        max_input_tokens=512,
    ),
}

# The seed's routing rules as a policy: which providers each class may use, in
# order of preference; the weights only matter under strategy = "weighted".
BUILTIN_CLASSES: dict[str, ClassPolicy] = {
    "realtime": ClassPolicy(providers=["zhipu", "hunyuan", "nvidia2", "nvidia1"]),
    "bulk": ClassPolicy(providers=["hunyuan", "nvidia2", "nvidia1"], weights={"hunyuan": 100.0}),
    "complex": ClassPolicy(
        providers=["nvidia1", "nvidia2", "zhipu"], weights={"nvidia1": 60.0, "nvidia2": 40.0}
    ),
    "default": ClassPolicy(
        providers=["hunyuan", "nvidia2", "nvidia1", "zhipu"],
        weights={"hunyuan": 50.0, "nvidia1": 20.0, "nvidia2": 20.0, "zhipu": 10.0},
    ),
}


def builtin_config() -> Config:
    return Config(providers=dict(BUILTIN_PROVIDERS), classes=dict(BUILTIN_CLASSES))


# -- loading -------------------------------------------------------------------------


def find_config_path(explicit: str | None, environ: Mapping[str, str]) -> Path | None:
    """``--config``, then ``$DISPATCHER_CONFIG``, then the system file if it exists."""
    if explicit:
        return Path(explicit)
    if environ.get("DISPATCHER_CONFIG"):
        return Path(environ["DISPATCHER_CONFIG"])
    if DEFAULT_CONFIG_PATH.exists():
        return DEFAULT_CONFIG_PATH
    return None


def load_config(path: Path | None) -> Config:
    """Read, validate and complete a config file (or the built-in table when ``path`` is None)."""
    if path is None:
        return builtin_config()
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file; pass --config with an existing file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read it ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return parse_config(raw, source=str(path))


def parse_config(raw: Mapping[str, Any], *, source: str = "<config>") -> Config:
    # Tables keyed by name are checked entry by entry first: msgspec's error path
    # says "providers[...]", and the user needs to know which provider is wrong.
    for table, entry_type in (("providers", ProviderConfig), ("classes", ClassPolicy)):
        entries = raw.get(table)
        if not isinstance(entries, Mapping):
            continue
        for name, entry in entries.items():
            try:
                msgspec.convert(entry, entry_type)
            except msgspec.ValidationError as exc:
                raise ConfigError(f"{source}: {_explain(str(exc), f'{table}.{name}')}") from None
    try:
        config = msgspec.convert(raw, Config)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{source}: {_explain(str(exc))}") from None
    if not config.providers:
        config = msgspec.structs.replace(config, providers=dict(BUILTIN_PROVIDERS))
    if not config.classes:
        config = msgspec.structs.replace(config, classes=_default_classes(config.providers))
    _check_references(config, source)
    return config


def _explain(message: str, prefix: str = "") -> str:
    """Turn msgspec's "... - at `$.a.b`" into "a.b: ..." with the expectation kept."""
    match = re.match(r"(?P<what>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", message)
    if match is None:  # pragma: no cover - the pattern always matches
        return message
    what, where = match["what"], (match["path"] or "").lstrip(".")
    where = ".".join(part for part in (prefix, where) if part)
    if what.startswith("Invalid enum value"):
        allowed = _CHOICES.get(where.rsplit(".", 1)[-1])
        if allowed:
            return f"{where}: {what[0].lower()}{what[1:]}; expected one of {', '.join(allowed)}"
    unknown = re.match(r"Object contains unknown field `(?P<key>[^`]+)`", what)
    if unknown:
        key = f"{where}.{unknown['key']}" if where else unknown["key"]
        return f"{key}: unknown key; remove it or check its spelling against the documentation"
    missing = re.match(r"Object missing required field `(?P<key>[^`]+)`", what)
    if missing:
        key = f"{where}.{missing['key']}" if where else missing["key"]
        return f"{key}: required key is missing"
    where = re.sub(r"\[(\d+)\]", r"[\1]", where)
    return f"{where or 'top level'}: {what[0].lower()}{what[1:]}"


_CHOICES: dict[str, tuple[str, ...]] = {
    "adapter": get_args(AdapterName),
    "kind": ("chat", "embed"),
    "strategy": ("capacity", "weighted"),
    "log_level": ("debug", "info", "warning", "error"),
    "synchronous": ("normal", "full"),
    "capabilities": CAPABILITIES,
}


def _default_classes(providers: Mapping[str, ProviderConfig]) -> dict[str, ClassPolicy]:
    chat = [name for name, p in providers.items() if p.kind == "chat"]
    classes: dict[str, ClassPolicy] = {}
    for name in TASK_CLASSES:
        builtin = BUILTIN_CLASSES[name]
        kept = [p for p in builtin.providers if p in chat]
        weights = {p: w for p, w in builtin.weights.items() if p in kept}
        classes[name] = (
            msgspec.structs.replace(builtin, providers=kept, weights=weights)
            if kept
            else ClassPolicy(providers=chat)
        )
    return classes


def _check_references(config: Config, source: str) -> None:
    for cls, policy in config.classes.items():
        for name in policy.providers:
            provider = config.providers.get(name)
            if provider is None:
                known = ", ".join(sorted(config.providers))
                raise ConfigError(
                    f"{source}: classes.{cls}.providers: unknown provider {name!r}; "
                    f"known providers are {known}"
                )
            if provider.kind != "chat":
                raise ConfigError(
                    f"{source}: classes.{cls}.providers: {name!r} is an {provider.kind} "
                    "provider; classes route chat jobs"
                )
        for name in policy.weights:
            if name not in policy.providers:
                raise ConfigError(
                    f"{source}: classes.{cls}.weights: {name!r} is not in this class's providers"
                )
    for name, provider in config.providers.items():
        if provider.api_key_env and provider.api_key_file:
            raise ConfigError(
                f"{source}: providers.{name}: set api_key_env or api_key_file, not both"
            )
        if not provider.url.startswith(("http://", "https://")):
            raise ConfigError(f"{source}: providers.{name}.url: expected an http(s) URL")
    for section, listen in (("http", config.http.listen), ("metrics", config.metrics.listen)):
        if listen is not None:
            parse_listen(listen, key=f"{source}: {section}.listen")
    _check_clients(config, source)
    if config.http.listen and not config.clients and not config.http.allow_anonymous:
        raise ConfigError(
            f"{source}: http.listen: a TCP front anyone on the host can reach needs at least "
            "one [clients.NAME] token (token_env or token_file), or http.allow_anonymous = true"
        )
    try:
        int(config.daemon.socket_mode, 8)
    except ValueError:
        raise ConfigError(
            f'{source}: daemon.socket_mode: expected an octal string such as "0660"'
        ) from None


def _check_clients(config: Config, source: str) -> None:
    """Budgets name real providers and classes, and a Unix user is one client only."""
    owner: dict[int, str] = {}
    for name, client in config.clients.items():
        key = f"{source}: clients.{name}"
        for provider in client.providers or ():
            if provider not in config.providers:
                known = ", ".join(sorted(config.providers))
                raise ConfigError(f"{key}.providers: no provider {provider!r} (known: {known})")
        for cls in client.classes or ():
            if cls not in config.classes and cls != "embed":
                known = ", ".join(sorted([*config.classes, "embed"]))
                raise ConfigError(f"{key}.classes: no class {cls!r} (known: {known})")
        for uid in client.uids:
            if uid in owner:
                raise ConfigError(
                    f"{key}.uids: uid {uid} is already clients.{owner[uid]}; "
                    "a Unix user is one client"
                )
            owner[uid] = name


def parse_listen(value: str, *, key: str = "listen") -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:8080`` for IPv6; an empty host means 127.0.0.1)."""
    host, sep, port_text = value.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    try:
        port = int(port_text)
    except ValueError:
        port = -1
    if not sep or not 0 <= port <= 65535:
        raise ConfigError(f"{key}: expected HOST:PORT such as 127.0.0.1:8080, got {value!r}")
    return host, port


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# -- keys ----------------------------------------------------------------------------


class KeyState(msgspec.Struct, frozen=True, kw_only=True):
    """Where a provider's key comes from and whether it is there; never the key itself in repr."""

    source: str
    key: str | None = msgspec.field(default=None)
    problem: str | None = None

    def __repr__(self) -> str:
        return f"KeyState(source={self.source!r}, present={self.key is not None})"

    def masked(self) -> str:
        if self.key is None:
            return f"{self.source}: {self.problem}"
        return f"{self.source} (set, {len(self.key)} chars)"


def resolve_key(provider: ProviderConfig, environ: Mapping[str, str]) -> KeyState:
    """Where the provider's key comes from and whether it is usable; the key itself only
    when it is (one line, no control characters)."""
    if provider.api_key_file:
        if _looks_like_a_key(provider.api_key_file, path=True):
            return _pasted("api_key_file")
        path = _expand(provider.api_key_file, environ)
        try:
            key = Path(path).read_text(encoding="utf-8").strip()
        except OSError as exc:
            return KeyState(source=f"file {path}", problem=f"cannot read it ({exc.strerror})")
        except UnicodeDecodeError:
            return KeyState(source=f"file {path}", problem="it is not UTF-8 text")
        return _checked(key, f"file {path}", "the file")
    if provider.api_key_env:
        if _looks_like_a_key(provider.api_key_env, path=False):
            return _pasted("api_key_env")
        key = environ.get(provider.api_key_env, "").strip()
        return _checked(key, f"${provider.api_key_env}", "the variable")
    return KeyState(source="no key configured", key="")


_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _looks_like_a_key(value: str, *, path: bool) -> bool:
    """A key pasted where a variable name or a file path belongs."""
    if path:
        return "/" not in value and "$" not in value and len(value) >= 20
    return _ENV_NAME.fullmatch(value) is None


def _pasted(field: str) -> KeyState:
    return KeyState(
        source=f"{field} (masked: it looks like a key itself)",
        problem=(
            f"{field} must name {'a file' if field == 'api_key_file' else 'an environment variable'}"
            ", not hold the key: move the key there, and rotate it if the config was shared"
        ),
    )


def _checked(key: str, source: str, where: str) -> KeyState:
    if not key:
        return KeyState(
            source=source, problem=f"{where} is empty" if "file" in where else "not set"
        )
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in key):
        return KeyState(
            source=source,
            problem=f"{where} holds more than one line or a control character; "
            "put the key alone on one line",
        )
    return KeyState(source=source, key=key)


def insecure_files(path: Path | None, config: Config, environ: Mapping[str, str]) -> list[str]:
    """Warnings for a config anyone may change, or key files anyone may read."""
    warnings = []
    if path is not None and _mode(path) & 0o002:
        warnings.append(f"{path} is world-writable: anyone on this host can change the routing")
    for name, provider in config.providers.items():
        if provider.api_key_file and not _looks_like_a_key(provider.api_key_file, path=True):
            key_path = Path(_expand(provider.api_key_file, environ))
            if _mode(key_path) & 0o004:
                warnings.append(
                    f"providers.{name}: the key file {key_path} is world-readable; "
                    f"chmod 600 {key_path}"
                )
    return warnings


def _mode(path: Path) -> int:
    try:
        return path.stat().st_mode
    except OSError:
        return 0


def _expand(path: str, environ: Mapping[str, str]) -> str:
    """Expand ``${CREDENTIALS_DIRECTORY}`` and friends from the given environment."""

    def sub(match: re.Match[str]) -> str:
        return environ.get(match[1] or match[2], match[0])

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", sub, path)


def socket_path(explicit: str | None, environ: Mapping[str, str], config: Config | None) -> str:
    """Where clients and the server find the socket: flag, environment, config, default."""
    if explicit:
        return explicit
    if environ.get("DISPATCHER_SOCKET"):
        return environ["DISPATCHER_SOCKET"]
    if config is not None:
        return config.daemon.socket
    return DEFAULT_SOCKET
