"""Settings from a TOML file, POLICYD_* variables and flags, and how errors read."""

from __future__ import annotations

from pathlib import Path

import pytest

from policyd import stores
from policyd.config import ConfigError, Endpoint, load_settings
from policyd.model import Mode
from policyd.stores.dms import DmsOptions
from policyd.stores.files import TexthashOptions


def problems(**kwargs: object) -> list[str]:
    with pytest.raises(ConfigError) as raised:
        load_settings(**kwargs)  # type: ignore[arg-type]
    return raised.value.problems


def test_defaults_with_one_map() -> None:
    settings = load_settings(environ={"POLICYD_MAPS": "dms:/srv/dms"})
    assert settings.maps == [DmsOptions(type="dms", path=Path("/srv/dms"))]
    assert settings.mode is Mode.AUTHENTICATED
    assert [str(e) for e in settings.listen] == ["inet:127.0.0.1:10040"]
    assert settings.owned_action == "OK"
    assert settings.idle_timeout >= 1000  # outlast Postfix's max_idle and max_ttl


def test_later_sources_win(tmp_path: Path) -> None:
    config = tmp_path / "policyd.toml"
    config.write_text('mode = "known"\nmaps = ["dms:/a"]\nowned_action = "dunno"\n')
    settings = load_settings(
        config,
        environ={"POLICYD_MODE": "sender", "POLICYD_MAPS": "texthash:/b, pcre:/c"},
        flags={"mode": "permit", "maps": None},
    )
    assert settings.mode is Mode.PERMIT
    assert settings.maps[0] == TexthashOptions(type="texthash", path=Path("/b"))
    assert [m.type for m in settings.maps] == ["texthash", "pcre"]
    assert settings.owned_action == "DUNNO"


def test_config_file_from_environment(tmp_path: Path) -> None:
    config = tmp_path / "policyd.toml"
    config.write_text('maps = [{type = "dms", path = "/srv/dms"}]\n')
    settings = load_settings(environ={"POLICYD_CONFIG": str(config)})
    assert settings.maps == [DmsOptions(type="dms", path=Path("/srv/dms"))]


def test_environment_lists_as_json() -> None:
    settings = load_settings(
        environ={
            "POLICYD_MAPS": '["dms:/a"]',
            "POLICYD_LISTEN": '["unix:/run/p.sock", "inet:[::1]:0"]',
        }
    )
    assert settings.listen == [
        Endpoint(kind="unix", path="/run/p.sock"),
        Endpoint(kind="inet", host="::1", port=0),
    ]


def test_toml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    config = tmp_path / "policyd.toml"
    config.write_text('mode = "known"\nmaps = [\n  "dms:/a",\nmode\n')
    [problem] = problems(config_file=config, environ={})
    assert problem.startswith(f"{config}:4: ")


def test_missing_config_file_is_an_error(tmp_path: Path) -> None:
    assert problems(config_file=tmp_path / "absent.toml", environ={}) == [
        f"{tmp_path / 'absent.toml'}: cannot read: No such file or directory"
    ]


def test_errors_say_where_and_what(tmp_path: Path) -> None:
    config = tmp_path / "policyd.toml"
    config.write_text('maps = ["dms:/a", "nosuch:/b"]\nmode = "strict"\nunknown_key = 1\n')
    found = problems(config_file=config, environ={"POLICYD_LISTEN": "tcp:1.2.3.4"})
    assert sorted(found) == sorted(
        [
            f"{config}: maps: unknown map type 'nosuch' (known: {', '.join(stores.backends())})",
            f"{config}: mode: Input should be 'authenticated', 'sender', 'known' or 'permit'",
            f"{config}: unknown_key: unknown setting",
            "POLICYD_LISTEN: 'tcp:1.2.3.4' is not inet:HOST:PORT or unix:PATH",
        ]
    )


def test_flag_errors_name_the_flag() -> None:
    assert problems(environ={}, flags={"maps": ["dms:/a"], "listen": ["inet:host:99999"]}) == [
        "--listen: 'inet:host:99999' is not inet:HOST:PORT or unix:PATH"
    ]


def test_no_map_is_an_error() -> None:
    [problem] = problems(environ={})
    assert problem.startswith("maps: no map configured")


@pytest.mark.parametrize("action", ["550 5.7.1 no", "OK", "DUNNO", "REJECT", ""])
def test_tempfail_action_must_be_temporary(action: str) -> None:
    [problem] = problems(environ={"POLICYD_MAPS": "dms:/a", "POLICYD_TEMPFAIL_ACTION": action})
    assert problem.startswith("POLICYD_TEMPFAIL_ACTION: must be a temporary reply")


@pytest.mark.parametrize(
    "action", ["451 4.3.0 try later", "DEFER_IF_PERMIT lookup failed", "defer"]
)
def test_tempfail_action_accepts_temporary_replies(action: str) -> None:
    settings = load_settings(environ={"POLICYD_MAPS": "dms:/a", "POLICYD_TEMPFAIL_ACTION": action})
    assert settings.tempfail_action == action


def test_unknown_environment_variable_is_an_error() -> None:
    assert problems(environ={"POLICYD_MAPS": "dms:/a", "POLICYD_MOED": "known"}) == [
        "POLICYD_MOED: unknown setting"
    ]


def test_kubernetes_service_link_variables_are_not_settings() -> None:
    service_links = {
        "POLICYD_SERVICE_HOST": "10.96.0.12",
        "POLICYD_SERVICE_PORT": "10040",
        "POLICYD_SERVICE_PORT_POLICY": "10040",
        "POLICYD_PORT": "tcp://10.96.0.12:10040",
        "POLICYD_PORT_10040_TCP": "tcp://10.96.0.12:10040",
        "POLICYD_PORT_10040_TCP_PROTO": "tcp",
        "POLICYD_PORT_10040_TCP_PORT": "10040",
        "POLICYD_PORT_10040_TCP_ADDR": "10.96.0.12",
    }
    settings = load_settings(environ={"POLICYD_MAPS": "dms:/a", **service_links})
    assert settings.maps[0].type == "dms"


def test_duplicate_listener() -> None:
    [problem] = problems(environ={"POLICYD_MAPS": "dms:/a", "POLICYD_LISTEN": "unix:/x,unix:/x"})
    assert "the same endpoint is listed twice" in problem


def test_number_settings_are_checked() -> None:
    [problem] = problems(environ={"POLICYD_MAPS": "dms:/a", "POLICYD_IDLE_TIMEOUT": "-1"})
    assert problem == "POLICYD_IDLE_TIMEOUT: Input should be greater than 0"
