"""API key settings that would silently weaken auth are refused at start, with a clear message."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bloom_runtime.engine.errors import ConfigError
from bloom_runtime.engine.settings import Settings, parse_api_keys

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("spec", [",", " , ", ",,", "  ,  ,  "])
def test_a_key_list_without_keys_is_refused(spec):
    with pytest.raises(ConfigError, match="RUNTIME_API_KEY names no key"):
        Settings.from_env({"RUNTIME_API_KEY": spec})
    with pytest.raises(ConfigError, match="RUNTIME_ADMIN_KEY names no key"):
        Settings.from_env({"RUNTIME_ADMIN_KEY": spec})


def test_unset_or_empty_means_no_keys():
    for env in ({}, {"RUNTIME_API_KEY": ""}, {"RUNTIME_API_KEY": "   "}):
        assert not Settings.from_env(env).auth_enabled


def test_a_client_key_named_like_an_admin_key_is_refused():
    with pytest.raises(ConfigError, match="'ops' is both a client key and an admin key"):
        Settings.from_env({"RUNTIME_API_KEY": "ops=client-secret-1", "RUNTIME_ADMIN_KEY": "ops=admin-secret-1"})


def test_one_secret_under_two_names_is_refused():
    with pytest.raises(ConfigError, match="same value"):
        Settings.from_env({"RUNTIME_API_KEY": "ops=shared-secret-1", "RUNTIME_ADMIN_KEY": "root=shared-secret-1"})
    with pytest.raises(ConfigError, match="same value"):
        parse_api_keys("a=shared-secret-1,b=shared-secret-1")


@pytest.mark.parametrize("secret", ["clé-secrète-1", "key-with-\u00a0nbsp", "tab\tinside-key", "ключ-доступа-1"])
def test_keys_that_no_header_can_match_are_refused(secret):
    with pytest.raises(ConfigError, match="printable ASCII"):
        Settings.from_env({"RUNTIME_API_KEY": f"ops={secret}"})


def test_settings_built_in_python_are_checked_too():
    with pytest.raises(ConfigError, match="both a client key and an admin key"):
        Settings(api_keys=parse_api_keys("ops=client-secret-1"), admin_keys=parse_api_keys("ops=admin-secret-1")).validate()


def test_valid_lists_still_parse():
    s = Settings.from_env({"RUNTIME_API_KEY": "ops=client-secret-1, ci=client-secret-2,", "RUNTIME_ADMIN_KEY": "admin-secret-1"})
    assert [k.name for k in s.api_keys] == ["ops", "ci"] and [k.name for k in s.admin_keys] == ["admin1"]


@pytest.mark.parametrize(
    "env, says",
    [
        ({"RUNTIME_API_KEY": " , "}, "RUNTIME_API_KEY names no key"),
        ({"RUNTIME_API_KEY": "ops=client-secret-1", "RUNTIME_ADMIN_KEY": "ops=admin-secret-1"}, "both a client key and an admin key"),
        ({"RUNTIME_API_KEY": "ops=pässwort-1234"}, "printable ASCII"),
    ],
)
def test_serve_refuses_to_start_with_exit_2(tmp_path, env, says):
    full = {k: v for k, v in os.environ.items() if k not in ("RUNTIME_API_KEY", "RUNTIME_ADMIN_KEY", "DATABASE_URL")}
    full.update(env)
    done = subprocess.run(
        [sys.executable, "-m", "bloom_runtime.cli", "serve", "--port", "0", "--database-url", f"sqlite:///{tmp_path}/x.db"],
        cwd=REPO, env=full, capture_output=True, text=True, timeout=60, check=False,
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and says in lines[0], done.stderr
    assert "secret" not in done.stderr and "Traceback" not in done.stderr
