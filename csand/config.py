"""Configuration: TOML file + ``CSAND_<SECTION>__<KEY>`` environment overrides + secret files.

Everything is validated at start-up into one immutable :class:`Settings`; any problem stops
csand with one message that names the offending key (``action_network.api_key: ...``), because an
operator reading ``journalctl`` should not have to guess.

Secrets (API keys, the OAuth client secret, the PostgreSQL URL) may be given inline, as
``<name>_file`` pointing at a file, or through systemd credentials: a file named
``<section>_<name>`` (for example ``action_network_api_key``, ``store_url``) in
``$CREDENTIALS_DIRECTORY``.
"""

from __future__ import annotations

import os
import re
import tomllib
import urllib.parse
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

DEFAULT_CONFIG_PATH = Path("/etc/csand/config.toml")
# The webhook endpoint trusts any body whose HMAC verifies with this secret: an empty or short
# one (an empty environment variable, a truncated file) would let anyone forge events.
MIN_WEBHOOK_SECRET_LENGTH = 16
# Commands that only read the database (status, dead) must work for an operator whose shell has
# no systemd credentials: for them a missing secret is not an error.
_SECRETS_REQUIRED: ContextVar[bool] = ContextVar("csand_secrets_required", default=True)
Positive = Annotated[float, Field(gt=0)]


class ConfigError(Exception):
    """A configuration problem, already phrased for the operator."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @field_validator("url", mode="after", check_fields=False)
    @classmethod
    def _url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/")


class ControlShiftSettings(_Section):
    url: str
    api_key: SecretStr | None = None
    api_key_file: Path | None = None
    client_id: str | None = None  # OAuth2 client credentials, the legacy alternative to api_key
    client_secret: SecretStr | None = None
    client_secret_file: Path | None = None
    poll_interval: Positive = 30.0
    reconcile_interval: Positive = 3600.0
    requests_per_minute: Positive = 1000.0
    # Steady-state polling (incremental cycles and sweeps) uses at most this share of
    # requests_per_minute; the rest is left to webhook processing and the operator's commands.
    poll_budget_share: Annotated[float, Field(gt=0, le=1)] = 0.5
    timeout: Positive = 30.0
    org_slug: str | None = None  # read from /api/v1/organisation when not set
    webhook_secret: SecretStr | None = None  # enables POST /webhooks/controlshift
    webhook_secret_file: Path | None = None
    global_unsubscribes: bool = True  # org-wide unsubscribes make the AN person unsubscribed
    webhook_url: str | None = None  # csand's endpoint as registered in CS, to watch its health
    webhook_check_interval: Positive = 600.0
    # Where petitions, creators and signatures come from: "rest" walks the REST API (its cost
    # grows with the number of petitions); "bulk" reads ControlShift's bulk-data exports (new
    # rows each minute, everything each night; needs webhooks), with REST only for events and
    # a light check. README: "Which source".
    source: Literal["rest", "bulk"] = "rest"
    # With source = "bulk": a problem when no incremental / no nightly full signatures file
    # arrived for this long (seconds).
    bulk_stale_incremental: Positive = 1800.0
    bulk_stale_full: Positive = 30 * 3600.0


class ActionNetworkSettings(_Section):
    url: str = "https://actionnetwork.org/api/v2"
    api_key: SecretStr | None = None
    api_key_file: Path | None = None
    requests_per_second: Positive = 4.0
    timeout: Positive = 30.0


class HttpSettings(_Section):
    listen: str | None = None  # "127.0.0.1:8080"; no listener when absent

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str | None) -> str | None:
        if value is None:
            return value
        host, sep, port = value.rpartition(":")
        if not sep or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError("must be HOST:PORT, for example 127.0.0.1:8080")
        return value


class SyncSettings(_Section):
    workers: Annotated[int, Field(ge=1, le=64)] = 4
    origin_system: str = "Controlshift Petition"
    event_origin_system: str = "Controlshift Event"
    # Events, their hosts and attendees (and calendars as event campaigns), besides petitions.
    events: bool = True
    max_attempts: Annotated[int, Field(ge=1)] = 100
    retry_base: Positive = 2.0
    retry_cap: Positive = 900.0
    lease_seconds: Positive = 300.0
    shutdown_grace: Positive = 10.0
    auth_recheck_interval: Positive = 60.0
    # additional_fields → AN custom fields: "all", "none", a list of ControlShift short names, or
    # a table from ControlShift name to AN name (only those).
    custom_fields: Literal["all", "none"] | list[str] | dict[str, str] = "all"
    # phone_number → "custom_field" (AN custom field phone_number), "mobile" (AN's native mobile
    # number, E.164; SMS subscribed only on an explicit SMS opt-in) or "off".
    phone: Literal["custom_field", "mobile", "off"] = "custom_field"
    phone_country: str | None = None  # ISO 3166 code for numbers written without +; for mobile
    # Activities older than this are recorded as seen and not synced (switching from another
    # integration that already synced them): an ISO date (midnight UTC) or time, or "now" (the
    # first start with it, remembered). Org-wide unsubscribes are applied whatever their age.
    history_start: str | None = None

    @field_validator("history_start")
    @classmethod
    def _history_start(cls, value: str | None) -> str | None:
        from datetime import UTC, datetime

        from csand.model import history_start

        history_start(value, datetime.now(UTC))  # raises ValueError with the reason
        return value.strip() if value is not None else None

    @field_validator("phone_country")
    @classmethod
    def _country(cls, value: str | None) -> str | None:
        if value is None:
            return value
        import phonenumbers

        code = value.strip().upper()
        if code not in phonenumbers.SUPPORTED_REGIONS:
            raise ValueError(f"{value!r} is not a country code phone numbers know (e.g. GB, US, AU)")
        return code

    @model_validator(mode="after")
    def _mobile_needs_country(self) -> SyncSettings:
        if self.phone == "mobile" and self.phone_country is None:
            raise ValueError("phone = \"mobile\" needs phone_country: the country of numbers "
                             "written without + (for example \"GB\")")
        return self

    def options(self) -> Any:
        """The pure rules' view of these settings (:class:`csand.sync.rules.SyncOptions`)."""
        from csand.sync.rules import SyncOptions

        chosen: Any = self.custom_fields
        if isinstance(chosen, list):
            chosen = tuple(chosen)
        return SyncOptions(custom_fields=chosen, phone=self.phone,
                           phone_country=self.phone_country)


POSTGRES_SCHEMES = ("postgresql://", "postgres://")
BOTH_STORES = "set either path (SQLite) or url (PostgreSQL), not both"


class StoreSettings(_Section):
    # SQLite (the default): one process on one machine. Exclusive with url / url_file.
    path: Path = Path("/var/lib/csand/csand.db")
    # PostgreSQL: any number of instances share the work. A secret (it holds the password):
    # inline, url_file, the systemd credential store_url, or CSAND_STORE__URL.
    url: SecretStr | None = None
    url_file: Path | None = None
    pool_size: Annotated[int, Field(ge=1)] = 10  # PostgreSQL connections per instance
    # This instance's name in a cluster (csand status, leases, heartbeats). None: the host name,
    # so two instances on one machine need distinct names.
    instance: str | None = None
    # Days a finished item's and a processed webhook's personal data is kept (then pruned).
    retention_days: Positive = 30.0

    @field_validator("url", mode="after")
    @classmethod
    def _url(cls, value: Any) -> Any:  # overrides _Section's http(s) check; see _check_store
        return value

    @field_validator("instance")
    @classmethod
    def _instance(cls, value: str | None) -> str | None:
        if value is None:
            return value
        value = value.strip()
        if not value or len(value) > 60 or any(c.isspace() or not c.isprintable() for c in value):
            raise ValueError("must be 1 to 60 characters without spaces (default: the host name)")
        return value

    @property
    def postgres_url(self) -> str | None:
        """The PostgreSQL URL in clear (for the connection only), None for SQLite."""
        return self.url.get_secret_value() if self.url is not None else None


class AuditSettings(_Section):
    """``csand audit``: the shares of each service's budget it may take beside the daemon."""

    an_share: Annotated[float, Field(gt=0, le=1)] = 0.25  # of requests_per_second (1 of 4)
    cs_share: Annotated[float, Field(gt=0, le=1)] = 0.25  # of requests_per_minute
    sample: Annotated[int, Field(ge=1)] = 300  # activities checked by default


class LogSettings(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="CSAND_", env_nested_delimiter="__", extra="forbid", frozen=True,
    )

    controlshift: ControlShiftSettings
    action_network: ActionNetworkSettings = ActionNetworkSettings()
    sync: SyncSettings = SyncSettings()
    store: StoreSettings = StoreSettings()
    log: LogSettings = LogSettings()
    http: HttpSettings = HttpSettings()
    audit: AuditSettings = AuditSettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The TOML file arrives as init kwargs; the environment overrides it.
        return (env_settings, init_settings)

    @field_validator("controlshift", "action_network", "store", mode="after")
    @classmethod
    def _secrets(cls, section: _Section, info: ValidationInfo) -> _Section:
        return _resolve_secrets(section, info.field_name or "")

    def secrets(self) -> list[str]:
        """Every secret value, for the log redactor."""
        values = [
            self.controlshift.api_key, self.controlshift.client_secret,
            self.controlshift.webhook_secret, self.action_network.api_key, self.store.url,
        ]
        found = [v.get_secret_value() for v in values if v is not None]
        if self.store.url is not None:
            found += url_passwords(self.store.url.get_secret_value())
        return found


def url_passwords(url: str) -> list[str]:
    """The password of a PostgreSQL URL as written and decoded (userinfo or ?password=)."""
    try:
        parts = urllib.parse.urlsplit(url)
        raw = [parts.netloc.rpartition("@")[0].partition(":")[2]] if "@" in parts.netloc else []
        raw += urllib.parse.parse_qs(parts.query).get("password", [])
    except ValueError:
        return []
    found = {p for r in raw for p in (r, urllib.parse.unquote(r)) if p}
    return sorted(found)


def _read_secret(path: Path, key: str, *, required: bool = False) -> SecretStr | None:
    """``required``: even for read-only commands (they need the store's URL to read it)."""
    try:
        value = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        if not required and not _SECRETS_REQUIRED.get():
            return None
        raise ValueError(f"{key}: cannot read {path}: {exc.strerror or exc}") from None
    if not value:
        raise ValueError(f"{key}: {path} is empty")
    return SecretStr(value)


def _resolve_secrets(section: _Section, name: str) -> _Section:
    updates: dict[str, Any] = {}
    if name == "store":
        secret_names = ["url"]
    else:
        secret_names = ["api_key"] + (
            ["client_secret", "webhook_secret"] if name == "controlshift" else [])
    creds = os.environ.get("CREDENTIALS_DIRECTORY")
    sources: dict[str, str] = {}
    for key in secret_names:
        file = getattr(section, f"{key}_file")
        if file is not None:
            sources[key] = f"{key}_file: {file}"
            updates[key] = _read_secret(Path(file), f"{key}_file", required=name == "store")
        elif getattr(section, key) is None and creds and (Path(creds) / f"{name}_{key}").is_file():
            sources[key] = f"{key}: systemd credential {name}_{key}"
            updates[key] = _read_secret(Path(creds) / f"{name}_{key}", key,
                                        required=name == "store")
    section = section.model_copy(update=updates)
    if name == "store":
        _check_store(section, sources.get("url", "url:"))  # type: ignore[arg-type]
        return section
    if not _SECRETS_REQUIRED.get():
        return section
    if name == "controlshift":
        _check_webhook_secret(section, sources.get("webhook_secret", "webhook_secret:"))
    if name == "action_network" and section.api_key is None:  # type: ignore[attr-defined]
        raise ValueError("api_key is required (or api_key_file, or a systemd credential)")
    if name == "controlshift":
        cs: ControlShiftSettings = section  # type: ignore[assignment]
        if cs.api_key is None and not (cs.client_id and cs.client_secret):
            raise ValueError(
                "api_key is required (or client_id and client_secret for OAuth)"
            )
        if cs.source == "bulk" and cs.webhook_secret is None:
            raise ValueError(
                "source = \"bulk\" needs webhook_secret (or webhook_secret_file): ControlShift "
                "announces its bulk-data files only by webhook")
    return section


def _check_store(store: StoreSettings, source: str) -> None:
    """One store: SQLite ``path`` or PostgreSQL ``url`` (from any source), never both.

    ``path`` has a default, so only an explicitly set one (file or environment) conflicts.
    Messages never quote the URL: it holds the password.
    """
    if store.url is None and store.url_file is None:
        return
    if "path" in store.model_fields_set:
        # "store: ..." (no key prefix, see _describe): the conflict is the section's.
        raise ValueError(BOTH_STORES if source == "url:" else f"{BOTH_STORES} ({source})")
    url = store.postgres_url or ""
    if url.startswith(POSTGRES_SCHEMES):
        return
    if source == "url:":  # inline or CSAND_STORE__URL
        raise ValueError("url: must start with postgresql:// or postgres://")
    raise ValueError(f"{source} does not hold a URL starting with postgresql:// or postgres://")


def _check_webhook_secret(section: _Section, source: str) -> None:
    secret: SecretStr | None = section.webhook_secret  # type: ignore[attr-defined]
    if secret is None:
        return
    length = len(secret.get_secret_value().strip())
    if length < MIN_WEBHOOK_SECRET_LENGTH:
        got = "is empty" if length == 0 else f"has only {length}"
        # "<key>: ..." is shown as "controlshift.<key>: ..." (see _describe).
        raise ValueError(
            f"{source} {got}; the webhook signing secret must be at least "
            f"{MIN_WEBHOOK_SECRET_LENGTH} characters (copy it from the endpoint in ControlShift)"
        )


def load(path: Path | str | None = None, *, env: bool = True, secrets: bool = True,
         **overrides: Any) -> Settings:
    """Read, merge and validate; raise :class:`ConfigError` with a one-line reason.

    ``secrets=False`` accepts missing API keys (and unreadable secret files), for commands that
    only read csand's own database.
    """
    token = _SECRETS_REQUIRED.set(secrets)
    try:
        return _load(path, env=env, **overrides)
    finally:
        _SECRETS_REQUIRED.reset(token)


def _load(path: Path | str | None, *, env: bool, **overrides: Any) -> Settings:
    path = Path(path) if path is not None else DEFAULT_CONFIG_PATH
    data: dict[str, Any] = {}
    if path.exists():
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    elif not any(k.startswith("CSAND_") for k in os.environ) or not env:
        raise ConfigError(f"{path}: no such config file (see config.example.toml)")
    for section, values in overrides.items():
        data.setdefault(section, {}).update(values)
    try:
        if env:
            return Settings(**data)
        return Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, path)) from None


_NAMED_KEY = re.compile(r"^(\w+): (.*)$", re.DOTALL)


def _describe(exc: ValidationError, path: Path) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            message = "unknown key"
        elif err["type"] == "missing":
            message = "missing (required)"
        elif len(err["loc"]) == 1 and (named := _NAMED_KEY.match(message)):
            key, message = f"{key}.{named.group(1)}", named.group(2)
        lines.append(f"{key}: {message}")
    return f"invalid configuration in {path}: " + "; ".join(lines)
