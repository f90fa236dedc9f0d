"""Settings: the contract's defaults, bounds, and one clear line for a bad value."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from app.settings import QueueFullBehavior, Settings, SettingsError, load_settings, unknown_variables
from app.types import Priority
from testkit.gateway import gateway_process_cwd, gateway_process_env, refused_startup


def test_defaults_follow_the_seed() -> None:
    s = load_settings(_env_file=None)
    assert (s.max_concurrent_requests, s.max_queue_size, s.request_timeout) == (1, 100, 300)
    assert s.port == 8091 and s.api_keys == () and s.default_priority is Priority.NORMAL
    assert s.queue_full_behavior is QueueFullBehavior.REJECT
    assert s.backend == "local" and s.model_path is None  # the bundled model, with no configuration


def test_chat_template_from_a_file(tmp_path: Path) -> None:
    template = tmp_path / "t.jinja"
    template.write_text("{{ messages[0]['content'] }}")
    assert load_settings(_env_file=None, chat_template=f"@{template}").chat_template == "{{ messages[0]['content'] }}"
    assert load_settings(_env_file=None, chat_template="{{ x }}").chat_template == "{{ x }}"


def test_environment_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAX_CONCURRENT_REQUESTS", "3")
    monkeypatch.setenv("API_KEYS", " a , b,,c ")
    monkeypatch.setenv("DEFAULT_PRIORITY", "low")
    monkeypatch.setenv("QUEUE_FULL_BEHAVIOR", "wait")
    s = load_settings(_env_file=None)
    assert s.max_concurrent_requests == 3 and s.api_keys == ("a", "b", "c")
    assert s.default_priority is Priority.LOW and s.queue_full_behavior is QueueFullBehavior.WAIT


@pytest.mark.parametrize(
    ("name", "value", "words"),
    [
        ("MAX_QUEUE_SIZE", "0", "greater than or equal to 1"),
        ("MAX_CONCURRENT_REQUESTS", "many", "valid integer"),
        ("REQUEST_TIMEOUT", "-1", "greater than 0"),
        ("DEFAULT_PRIORITY", "urgent", "'high', 'normal' or 'low'"),
        ("QUEUE_FULL_BEHAVIOR", "drop", "'reject' or 'wait'"),
        ("UPSTREAM_BASE_URL", "ftp://x", "http:// or https://"),
        ("BACKEND", "cloud", "'local' or 'proxy'"),
        ("MODEL_PATH", "/nowhere/model.gguf", "no such file"),
        ("CHAT_TEMPLATE", "@/nowhere/template.jinja", "no such file"),
        ("N_CTX", "8", "greater than or equal to 64"),
    ],
)
def test_a_bad_value_names_the_variable(monkeypatch: pytest.MonkeyPatch, name: str, value: str, words: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError) as caught:
        load_settings(_env_file=None)
    message = str(caught.value)
    assert message.startswith(f"{name}:") and words in message and "\n" not in message


def test_startup_stops_with_one_line_on_a_bad_value() -> None:
    lines = refused_startup(MAX_QUEUE_SIZE="zero")
    assert len(lines) == 1 and "MAX_QUEUE_SIZE" in lines[0]


def test_reserved_high_slots_must_leave_a_slot_for_the_others() -> None:
    with pytest.raises(SettingsError, match="RESERVED_HIGH_SLOTS"):
        load_settings(_env_file=None, max_concurrent_requests=2, reserved_high_slots=2)
    assert load_settings(_env_file=None, max_concurrent_requests=2, reserved_high_slots=1).reserved_high_slots == 1


def test_env_example_names_every_setting_and_loads() -> None:
    example = Path(__file__).resolve().parent.parent / "queue-config.env.example"
    text = example.read_text()
    missing = [name.upper() for name in Settings.model_fields if f"{name.upper()}=" not in text]
    assert missing == []
    assert load_settings(_env_file=str(example)).backend == "local"


def test_a_users_env_file_and_shell_do_not_reach_the_tests(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / ".env").write_text("MAX_QUEUE_SIZE=5\nAPI_KEYS=k1\n")
    monkeypatch.chdir(tmp_path)  # as if the checkout held this .env
    monkeypatch.setenv("MAX_CONCURRENT_REQUESTS", "7")  # and the shell exported a setting
    assert load_settings().max_queue_size == 5  # what the gateway itself would read there
    env = gateway_process_env(PORT="1")
    assert "MAX_CONCURRENT_REQUESTS" not in env and env["PORT"] == "1"
    assert not (Path(gateway_process_cwd()) / ".env").exists()
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "from app.settings import load_settings; print(load_settings().max_queue_size)",
        ],
        env=env,
        cwd=gateway_process_cwd(),
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert result.stdout.split() == ["100"]


def test_credentials_in_the_url_and_an_upstream_key_are_refused_together() -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings(_env_file=None, upstream_base_url="http://u:secret@host/v1", upstream_api_key="sk-1")
    message = str(caught.value)
    assert "UPSTREAM_BASE_URL" in message and "UPSTREAM_API_KEY" in message and "\n" not in message
    assert "secret" not in message and "sk-1" not in message  # no value is shown
    assert load_settings(_env_file=None, upstream_base_url="http://u:secret@host/v1").upstream_api_key == ""


def test_a_misspelt_variable_in_env_is_named_with_the_setting_meant(tmp_path: Path) -> None:
    env = tmp_path / ".env"
    env.write_text("MAX_QUEUE_SIZ=5\nmax_concurent_requests=2\nPORT=9000\nHOME_DIR=/x\n")
    assert unknown_variables(str(env)) == [
        ("MAX_QUEUE_SIZ", "MAX_QUEUE_SIZE"),
        ("max_concurent_requests", "MAX_CONCURRENT_REQUESTS"),
    ]
    assert unknown_variables(str(tmp_path / "absent.env")) == []
