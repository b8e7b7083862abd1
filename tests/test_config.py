"""Configuration loading (csand.config): TOML, environment overrides, secret files."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from csand import config
from csand.config import ConfigError, Settings

REPO_ROOT = Path(__file__).resolve().parent.parent

MINIMAL = """
[controlshift]
url = "https://org.controlshiftlabs.com/"
api_key = "cs_toml_key"

[action_network]
api_key = "an_toml_key"
requests_per_second = 2.5
"""


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("CSAND_") or name == "CREDENTIALS_DIRECTORY":
            monkeypatch.delenv(name)


def write(tmp_path: Path, text: str, name: str = "config.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def load_text(tmp_path: Path, text: str) -> Settings:
    return config.load(write(tmp_path, text))


def error_for(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, text)
    return str(info.value)


# ---------------------------------------------------------------- the documented keys


def test_example_config_in_the_repo_loads() -> None:
    s = config.load(REPO_ROOT / "config.example.toml")
    cs, an, sync = s.controlshift, s.action_network, s.sync
    assert cs.url == "https://example.controlshiftlabs.com"
    assert cs.api_key is not None and cs.api_key.get_secret_value() == "cs_..."
    assert (cs.poll_interval, cs.reconcile_interval, cs.requests_per_minute, cs.timeout) == (
        30.0, 3600.0, 1000.0, 30.0)
    assert cs.org_slug is None and cs.client_id is None
    assert an.url == "https://actionnetwork.org/api/v2"
    assert an.api_key is not None and an.api_key.get_secret_value() == "..."
    assert (an.requests_per_second, an.timeout) == (4.0, 30.0)
    assert (sync.workers, sync.origin_system, sync.max_attempts) == (4, "Controlshift Petition", 100)
    assert (sync.retry_base, sync.retry_cap, sync.lease_seconds) == (2.0, 900.0, 300.0)
    assert (sync.shutdown_grace, sync.auth_recheck_interval) == (10.0, 60.0)
    assert s.store.path == Path("/var/lib/csand/csand.db")
    assert s.store.retention_days == 30
    assert (s.log.level, s.log.format) == ("info", "auto")


def _example_keys() -> dict[str, set[str]]:
    """Every key config.example.toml shows, set or commented out, by section."""
    keys: dict[str, set[str]] = {}
    section = None
    for line in (REPO_ROOT / "config.example.toml").read_text().splitlines():
        if match := re.match(r"^\[(\w+)\]", line):
            section = match.group(1)
            keys.setdefault(section, set())
        elif section and (match := re.match(r"^#?\s*(\w+)\s*=", line)):
            keys[section].add(match.group(1))
    return keys


def test_every_setting_is_documented_in_the_example() -> None:
    documented = _example_keys()
    missing = [
        f"{section}.{key}"
        for section, field in Settings.model_fields.items()
        for key in field.annotation.model_fields  # type: ignore[union-attr]
        if key not in documented.get(section, set())
    ]
    assert missing == []


def test_defaults_and_normalised_url(tmp_path: Path) -> None:
    s = load_text(tmp_path, MINIMAL)
    assert s.controlshift.url == "https://org.controlshiftlabs.com"
    assert s.action_network.url == "https://actionnetwork.org/api/v2"
    assert s.action_network.requests_per_second == 2.5
    assert s.sync.workers == 4
    assert s.log.level == "info"
    assert sorted(s.secrets()) == ["an_toml_key", "cs_toml_key"]
    with pytest.raises(ValidationError):
        s.sync.workers = 8  # type: ignore[misc]


def test_documented_optional_keys_are_accepted(tmp_path: Path) -> None:
    s = load_text(tmp_path, MINIMAL.replace(
        'api_key = "cs_toml_key"', 'api_key = "cs_toml_key"\norg_slug = "my-org"'))
    assert s.controlshift.org_slug == "my-org"


def test_oauth_client_credentials_instead_of_an_api_key(tmp_path: Path) -> None:
    secret = write(tmp_path, "oauth-secret\n", "cs_secret")
    s = load_text(tmp_path, MINIMAL.replace(
        'api_key = "cs_toml_key"', f'client_id = "cid"\nclient_secret_file = "{secret}"'))
    assert s.controlshift.api_key is None
    assert s.controlshift.client_id == "cid"
    assert s.controlshift.client_secret is not None
    assert s.controlshift.client_secret.get_secret_value() == "oauth-secret"
    assert "oauth-secret" in s.secrets()


# ---------------------------------------------------------------- environment and secret files


def test_environment_overrides_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CSAND_ACTION_NETWORK__API_KEY", "an_env_key")
    monkeypatch.setenv("CSAND_SYNC__WORKERS", "8")
    s = load_text(tmp_path, MINIMAL)
    assert s.action_network.api_key is not None
    assert s.action_network.api_key.get_secret_value() == "an_env_key"
    assert s.action_network.requests_per_second == 2.5  # the rest of the section still applies
    assert s.sync.workers == 8
    assert s.controlshift.api_key is not None
    assert s.controlshift.api_key.get_secret_value() == "cs_toml_key"


def test_environment_alone_without_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CSAND_CONTROLSHIFT__URL", "https://cs.example.org")
    monkeypatch.setenv("CSAND_CONTROLSHIFT__API_KEY", "cs_env")
    monkeypatch.setenv("CSAND_ACTION_NETWORK__API_KEY", "an_env")
    s = config.load(tmp_path / "absent.toml")
    assert s.controlshift.url == "https://cs.example.org"


def test_bad_environment_value_names_the_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CSAND_CONTROLSHIFT__POLL_INTERVAL", "often")
    assert "controlshift.poll_interval" in error_for(tmp_path, MINIMAL)


def test_api_key_file(tmp_path: Path) -> None:
    key = write(tmp_path, "  an_file_key\n", "an_key")
    s = load_text(tmp_path, MINIMAL.replace('api_key = "an_toml_key"', f'api_key_file = "{key}"'))
    assert s.action_network.api_key is not None
    assert s.action_network.api_key.get_secret_value() == "an_file_key"


def test_systemd_credentials_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "action_network_api_key").write_text("an_credential\n")
    (creds / "controlshift_api_key").write_text("cs_credential\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    s = load_text(tmp_path, '[controlshift]\nurl = "https://cs.example.org"\n')
    assert s.action_network.api_key is not None and s.controlshift.api_key is not None
    assert s.action_network.api_key.get_secret_value() == "an_credential"
    assert s.controlshift.api_key.get_secret_value() == "cs_credential"


def test_inline_key_wins_over_a_credential(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "action_network_api_key").write_text("an_credential\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    s = load_text(tmp_path, MINIMAL)
    assert s.action_network.api_key is not None
    assert s.action_network.api_key.get_secret_value() == "an_toml_key"


# ---------------------------------------------------------------- errors name the key


def test_missing_action_network_key(tmp_path: Path) -> None:
    message = error_for(tmp_path, '[controlshift]\nurl = "https://cs.example.org"\napi_key = "k"\n')
    assert "action_network" in message and "api_key" in message


def test_missing_controlshift_section_and_url(tmp_path: Path) -> None:
    assert "controlshift: missing (required)" in error_for(tmp_path, '[action_network]\napi_key = "k"\n')
    message = error_for(tmp_path, MINIMAL.replace('url = "https://org.controlshiftlabs.com/"', ""))
    assert "controlshift.url: missing (required)" in message


def test_missing_controlshift_credentials(tmp_path: Path) -> None:
    message = error_for(tmp_path, MINIMAL.replace('api_key = "cs_toml_key"', 'client_id = "cid"'))
    assert "controlshift" in message and "api_key" in message


@pytest.mark.parametrize(("section", "line", "key"), [
    ("sync", "workers = \"many\"", "sync.workers"),
    ("sync", "workers = 0", "sync.workers"),
    ("log", "level = \"loud\"", "log.level"),
    ("controlshift", "poll_interval = -1", "controlshift.poll_interval"),
    ("store", "path = 12", "store.path"),
])
def test_wrong_type_names_the_key(tmp_path: Path, section: str, line: str, key: str) -> None:
    text = MINIMAL.replace(f"[{section}]", f"[{section}]\n{line}") if f"[{section}]" in MINIMAL \
        else MINIMAL + f"\n[{section}]\n{line}\n"
    assert f"{key}:" in error_for(tmp_path, text)


def test_retention_days_defaults_to_30_and_must_be_positive(tmp_path: Path) -> None:
    assert load_text(tmp_path, MINIMAL).store.retention_days == 30
    week = load_text(tmp_path, MINIMAL + "\n[store]\nretention_days = 7\n")
    assert week.store.retention_days == 7
    for bad in ("0", "-1", '"forever"'):
        message = error_for(tmp_path, MINIMAL + f"\n[store]\nretention_days = {bad}\n")
        assert "store.retention_days:" in message


def test_url_without_scheme(tmp_path: Path) -> None:
    message = error_for(tmp_path, MINIMAL.replace("https://org.controlshiftlabs.com/", "org.example"))
    assert "controlshift.url: must start with http:// or https://" in message


@pytest.mark.parametrize(("text", "key"), [
    (MINIMAL + "\n[sync]\nwrokers = 3\n", "sync.wrokers"),
    (MINIMAL.replace("[action_network]", "[action_network]\napikey = \"x\""), "action_network.apikey"),
    (MINIMAL + "\n[metrics]\nport = 9100\n", "metrics"),
])
def test_unknown_key(tmp_path: Path, text: str, key: str) -> None:
    assert f"{key}: unknown key" in error_for(tmp_path, text)


@pytest.mark.parametrize("kind", ["missing", "directory", "empty"])
def test_unreadable_secret_file(tmp_path: Path, kind: str) -> None:
    target = tmp_path / "secret"
    if kind == "directory":
        target.mkdir()
    elif kind == "empty":
        target.write_text("\n")
    message = error_for(tmp_path, MINIMAL.replace('api_key = "an_toml_key"', f'api_key_file = "{target}"'))
    assert "action_network" in message and "api_key_file" in message
    assert str(target) in message


def test_invalid_toml(tmp_path: Path) -> None:
    assert "not valid TOML" in error_for(tmp_path, "[controlshift\nurl=")


def test_missing_file_without_environment(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such config file"):
        config.load(tmp_path / "absent.toml")


def test_error_never_shows_the_secret(tmp_path: Path) -> None:
    message = error_for(tmp_path, MINIMAL + "\n[sync]\nworkers = \"many\"\n")
    assert "an_toml_key" not in message and "cs_toml_key" not in message


def test_http_listen_is_validated(tmp_path: Path) -> None:
    assert load_text(tmp_path, MINIMAL + '\n[http]\nlisten = "127.0.0.1:8080"\n').http.listen == "127.0.0.1:8080"
    assert "http.listen" in error_for(tmp_path, MINIMAL + '\n[http]\nlisten = "8080"\n')


def test_read_only_commands_load_without_secrets(tmp_path: Path) -> None:
    config_file = tmp_path / "config.toml"
    config_file.write_text('[controlshift]\nurl = "https://cs.example"\n'
                      '[action_network]\napi_key_file = "/nonexistent/key"\n'
                      f'[store]\npath = "{tmp_path / "csand.db"}"\n')
    settings = config.load(config_file, secrets=False)
    assert settings.action_network.api_key is None
    with pytest.raises(ConfigError, match="api_key"):
        config.load(config_file)


# ---------------------------------------------------------------- the webhook signing secret

GOOD_WEBHOOK_SECRET = "whsec-0123456789abcdef"


def _with_webhook_secret(line: str) -> str:
    return MINIMAL.replace('api_key = "cs_toml_key"', f'api_key = "cs_toml_key"\n{line}')


def test_a_long_enough_webhook_secret_is_accepted(tmp_path: Path) -> None:
    s = load_text(tmp_path, _with_webhook_secret(f'webhook_secret = "{GOOD_WEBHOOK_SECRET}"'))
    assert s.controlshift.webhook_secret is not None
    assert s.controlshift.webhook_secret.get_secret_value() == GOOD_WEBHOOK_SECRET


@pytest.mark.parametrize("value", ["", "   ", "short-secret", "x" * 15, " " * 10 + "y" * 15])
def test_an_empty_or_short_inline_webhook_secret_is_refused(tmp_path: Path, value: str) -> None:
    # Otherwise the endpoint accepts any body signed with the HMAC of an empty (or guessable) key.
    message = error_for(tmp_path, _with_webhook_secret(f'webhook_secret = "{value}"'))
    assert "controlshift.webhook_secret:" in message and "16 characters" in message
    assert "\n" not in message
    if value.strip():
        assert value.strip() not in message  # the secret itself is never echoed


@pytest.mark.parametrize("value", ["", "  ", "too-short"])
def test_an_empty_or_short_webhook_secret_from_the_environment_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value: str,
) -> None:
    monkeypatch.setenv("CSAND_CONTROLSHIFT__WEBHOOK_SECRET", value)
    message = error_for(tmp_path, MINIMAL)
    assert "controlshift.webhook_secret:" in message and "16 characters" in message


@pytest.mark.parametrize("content", ["\n", "   \n", "too-short\n"])
def test_an_empty_or_short_webhook_secret_file_is_refused(tmp_path: Path, content: str) -> None:
    secret = write(tmp_path, content, "webhook_secret")
    message = error_for(tmp_path, _with_webhook_secret(f'webhook_secret_file = "{secret}"'))
    assert "controlshift.webhook_secret_file:" in message and str(secret) in message
    assert "too-short" not in message


@pytest.mark.parametrize("content", ["\n", "too-short\n"])
def test_an_empty_or_short_webhook_secret_credential_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, content: str,
) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "controlshift_webhook_secret").write_text(content)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    message = error_for(tmp_path, MINIMAL)
    assert "controlshift.webhook_secret:" in message and "controlshift_webhook_secret" in message


def test_a_webhook_secret_file_and_credential_of_16_characters_are_accepted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    secret = write(tmp_path, " " + "s" * 16 + "\n", "webhook_secret")
    s = load_text(tmp_path, _with_webhook_secret(f'webhook_secret_file = "{secret}"'))
    assert s.controlshift.webhook_secret is not None
    assert s.controlshift.webhook_secret.get_secret_value() == "s" * 16
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "controlshift_webhook_secret").write_text("c" * 16 + "\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    s = load_text(tmp_path, MINIMAL)
    assert s.controlshift.webhook_secret is not None
    assert s.controlshift.webhook_secret.get_secret_value() == "c" * 16


def test_csand_run_refuses_a_short_webhook_secret_in_one_line(tmp_path: Path) -> None:
    config_file = write(tmp_path, _with_webhook_secret('webhook_secret = ""') + (
        f'\n[store]\npath = "{tmp_path / "csand.db"}"\n'))
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("CSAND_") and k != "CREDENTIALS_DIRECTORY"}
    done = subprocess.run(
        [sys.executable, "-m", "csand", "run", "--config", str(config_file)],
        capture_output=True, text=True, timeout=30, env=env,
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "controlshift.webhook_secret:" in lines[0], done.stderr
    assert not (tmp_path / "csand.db").exists()  # refused before anything started


# ---------------------------------------------------------------- the store: SQLite or PostgreSQL

PG_PASSWORD = "pg-s3cret-pw"
PG_URL = f"postgresql://csand:{PG_PASSWORD}@db.example.org:5432/csand"


def test_sqlite_stays_the_default(tmp_path: Path) -> None:
    store = load_text(tmp_path, MINIMAL).store
    assert store.path == Path("/var/lib/csand/csand.db")
    assert store.url is None and store.postgres_url is None
    assert (store.pool_size, store.instance) == (10, None)


def test_postgresql_url_pool_size_and_instance(tmp_path: Path) -> None:
    s = load_text(tmp_path, MINIMAL + f'\n[store]\nurl = "{PG_URL}"\npool_size = 4\n'
                  'instance = "csand-b"\n')
    assert s.store.postgres_url == PG_URL
    assert (s.store.pool_size, s.store.instance) == (4, "csand-b")
    assert PG_PASSWORD not in repr(s.store) and PG_PASSWORD not in str(s)


def test_the_url_and_its_password_are_secrets_for_the_log_redactor(tmp_path: Path) -> None:
    s = load_text(tmp_path, MINIMAL + '\n[store]\nurl = "postgres://csand:p%40ss%2Fw@db/csand"\n')
    assert "postgres://csand:p%40ss%2Fw@db/csand" in s.secrets()
    assert "p%40ss%2Fw" in s.secrets() and "p@ss/w" in s.secrets()  # as written and decoded
    query = load_text(tmp_path, MINIMAL + '\n[store]\nurl = "postgresql://db/x?password=qpw99"\n')
    assert "qpw99" in query.secrets()


@pytest.mark.parametrize("url", ["mysql://u:pw-xyz@db/csand", "db.example.org/csand",
                                 "https://u:pw-xyz@db/csand"])
def test_the_url_must_be_a_postgresql_url(tmp_path: Path, url: str) -> None:
    message = error_for(tmp_path, MINIMAL + f'\n[store]\nurl = "{url}"\n')
    assert "store.url: must start with postgresql:// or postgres://" in message
    assert "pw-xyz" not in message and url not in message


def test_path_and_url_together_are_refused_in_one_line(tmp_path: Path) -> None:
    message = error_for(tmp_path, MINIMAL + f'\n[store]\npath = "{tmp_path / "x.db"}"\n'
                        f'url = "{PG_URL}"\n')
    assert message.endswith("store: set either path (SQLite) or url (PostgreSQL), not both")
    assert "\n" not in message and PG_PASSWORD not in message


def test_path_and_url_file_together_are_refused(tmp_path: Path) -> None:
    url_file = write(tmp_path, PG_URL + "\n", "store_url")
    message = error_for(tmp_path, MINIMAL + f'\n[store]\npath = "{tmp_path / "x.db"}"\n'
                        f'url_file = "{url_file}"\n')
    assert "store: set either path (SQLite) or url (PostgreSQL), not both" in message
    assert str(url_file) in message and PG_PASSWORD not in message


def test_the_default_path_does_not_conflict_with_a_url(tmp_path: Path) -> None:
    s = load_text(tmp_path, MINIMAL + f'\n[store]\nurl = "{PG_URL}"\nretention_days = 7\n')
    assert s.store.postgres_url == PG_URL


def test_url_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CSAND_STORE__URL", PG_URL)
    assert load_text(tmp_path, MINIMAL).store.postgres_url == PG_URL
    # It overrides a URL in the file ...
    other = "postgresql://other:pw@elsewhere/csand"
    assert load_text(tmp_path, MINIMAL + f'\n[store]\nurl = "{other}"\n').store.postgres_url \
        == PG_URL
    # ... but not a SQLite path in it: that config names two stores, which is refused.
    message = error_for(tmp_path, MINIMAL + f'\n[store]\npath = "{tmp_path / "x.db"}"\n')
    assert "store: set either path (SQLite) or url (PostgreSQL), not both" in message
    assert PG_PASSWORD not in message


def test_an_environment_path_with_a_file_url_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CSAND_STORE__PATH", str(tmp_path / "x.db"))
    message = error_for(tmp_path, MINIMAL + f'\n[store]\nurl = "{PG_URL}"\n')
    assert "store: set either path (SQLite) or url (PostgreSQL), not both" in message


def test_url_file(tmp_path: Path) -> None:
    url_file = write(tmp_path, f"  {PG_URL}\n", "store_url")
    s = load_text(tmp_path, MINIMAL + f'\n[store]\nurl_file = "{url_file}"\n')
    assert s.store.postgres_url == PG_URL
    assert PG_URL in s.secrets() and PG_PASSWORD in s.secrets()


def test_url_file_is_needed_even_by_read_only_commands(tmp_path: Path) -> None:
    # Without it they would silently open the default SQLite path instead.
    config_file = write(tmp_path, MINIMAL + f'\n[store]\nurl_file = "{tmp_path / "absent"}"\n')
    with pytest.raises(ConfigError, match=r"store\.url_file: cannot read"):
        config.load(config_file, secrets=False)


@pytest.mark.parametrize(("content", "expected"), [
    ("\n", "is empty"),
    ("mysql://u:pw-xyz@db/x\n", "does not hold a URL starting with postgresql://"),
])
def test_a_bad_url_file(tmp_path: Path, content: str, expected: str) -> None:
    url_file = write(tmp_path, content, "store_url")
    message = error_for(tmp_path, MINIMAL + f'\n[store]\nurl_file = "{url_file}"\n')
    assert "store.url_file:" in message and expected in message and str(url_file) in message
    assert "pw-xyz" not in message


def test_url_as_a_systemd_credential(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "store_url").write_text(PG_URL + "\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    s = load_text(tmp_path, MINIMAL)
    assert s.store.postgres_url == PG_URL and PG_PASSWORD in s.secrets()
    inline = "postgresql://inline:pw@db/x"  # an inline URL wins, as for the API keys
    assert load_text(tmp_path, MINIMAL + f'\n[store]\nurl = "{inline}"\n').store.postgres_url \
        == inline
    (creds / "store_url").write_text("sqlite:///x.db\n")
    message = error_for(tmp_path, MINIMAL)
    assert "store.url: systemd credential store_url does not hold a URL" in message


@pytest.mark.parametrize(("line", "key"), [
    ("pool_size = 0", "store.pool_size"),
    ('instance = ""', "store.instance"),
    ('instance = "two words"', "store.instance"),
])
def test_bad_pool_size_and_instance(tmp_path: Path, line: str, key: str) -> None:
    assert f"{key}:" in error_for(tmp_path, MINIMAL + f"\n[store]\n{line}\n")


def _sync_config(tmp_path, sync: str):
    path = tmp_path / "config.toml"
    path.write_text('[controlshift]\nurl = "https://cs.example.org"\napi_key = "k"\n'
                    '[action_network]\napi_key = "a"\n[sync]\n' + sync, encoding="utf-8")
    return path


def test_custom_fields_and_phone_settings_become_the_rules_options(tmp_path) -> None:
    from csand import config as config_mod

    s = config_mod.load(_sync_config(tmp_path, ""), env=False)
    assert (s.sync.options().custom_fields, s.sync.options().phone) == ("all", "custom_field")
    s = config_mod.load(_sync_config(tmp_path, 'custom_fields = ["ward"]\nphone = "off"\n'),
                        env=False)
    assert (s.sync.options().custom_fields, s.sync.options().phone) == (("ward",), "off")
    s = config_mod.load(_sync_config(
        tmp_path, 'custom_fields = { ward = "Ward" }\nphone = "mobile"\nphone_country = "gb"\n'),
        env=False)
    assert s.sync.options().custom_fields == {"ward": "Ward"}
    assert s.sync.options().phone_country == "GB"


def test_mobile_without_a_country_or_an_unknown_country_is_refused_in_one_line(tmp_path) -> None:
    import pytest

    from csand import config as config_mod

    with pytest.raises(config_mod.ConfigError, match='needs phone_country') as refused:
        config_mod.load(_sync_config(tmp_path, 'phone = "mobile"\n'), env=False)
    assert "\n" not in str(refused.value)
    with pytest.raises(config_mod.ConfigError, match="sync.phone_country: 'XX' is not a country"):
        config_mod.load(_sync_config(tmp_path, 'phone = "mobile"\nphone_country = "XX"\n'),
                        env=False)
    with pytest.raises(config_mod.ConfigError, match="sync.phone"):
        config_mod.load(_sync_config(tmp_path, 'phone = "sms"\n'), env=False)


def test_poll_budget_share_defaults_to_half_and_must_be_a_share(tmp_path: Path) -> None:
    assert load_text(tmp_path, MINIMAL).controlshift.poll_budget_share == 0.5
    whole = MINIMAL.replace("[controlshift]", "[controlshift]\npoll_budget_share = 1")
    assert load_text(tmp_path, whole).controlshift.poll_budget_share == 1.0
    for bad in ("0", "-0.5", "1.5", '"half"'):
        text = MINIMAL.replace("[controlshift]", f"[controlshift]\npoll_budget_share = {bad}")
        assert "controlshift.poll_budget_share:" in error_for(tmp_path, text)


def test_bulk_source_needs_the_webhook_secret(tmp_path: Path) -> None:
    bulk = MINIMAL.replace('api_key = "cs_toml_key"', 'api_key = "cs_toml_key"\nsource = "bulk"')
    message = error_for(tmp_path, bulk)
    assert "source = \"bulk\" needs webhook_secret" in message
    s = load_text(tmp_path, bulk.replace(
        'source = "bulk"', 'source = "bulk"\nwebhook_secret = "0123456789abcdef"'))
    assert s.controlshift.source == "bulk"
    assert load_text(tmp_path, MINIMAL).controlshift.source == "rest"
    assert "source" in error_for(tmp_path, bulk.replace('"bulk"', '"csv"'))
