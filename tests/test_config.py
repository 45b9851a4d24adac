"""Settings from a TOML file, POLICYD_* variables and flags, and how errors read."""

from __future__ import annotations

import os
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


@pytest.mark.parametrize(
    ("value", "families"),
    [
        (None, ("ipv4", "ipv6")),  # Postfix's default: all
        ("all", ("ipv4", "ipv6")),
        ("ipv4", ("ipv4",)),
        ("ipv6, ipv4", ("ipv4", "ipv6")),
        ("", ()),
    ],
)
def test_inet_protocols_as_in_main_cf(value: str | None, families: tuple[str, ...]) -> None:
    environ = {"POLICYD_MAPS": "dms:/srv/dms"}
    if value is not None:
        environ["POLICYD_INET_PROTOCOLS"] = value
    assert load_settings(environ=environ).postfix_params().inet_protocols == families


def test_inet_protocols_are_postfix_names() -> None:
    [problem] = problems(environ={"POLICYD_MAPS": "dms:/a", "POLICYD_INET_PROTOCOLS": "ip4"})
    assert problem.startswith("POLICYD_INET_PROTOCOLS[0]: Input should be 'all', 'ipv4' or 'ipv6'")


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
            f"{config}:1: maps[1]: unknown map type 'nosuch' (known: "
            f"{', '.join(stores.backends())})",
            f"{config}:2: mode: Input should be 'authenticated', 'sender', 'known',"
            " 'unauthenticated' or 'permit'",
            f"{config}:3: unknown_key: unknown setting",
            "POLICYD_LISTEN[0]: 'tcp:1.2.3.4' is not inet:HOST:PORT, HOST:PORT or unix:PATH",
        ]
    )


def test_a_misspelt_key_names_its_line_and_the_setting_meant(tmp_path: Path) -> None:
    config = tmp_path / "policyd.toml"
    config.write_text('# policyd\nmaps = ["dms:/a"]\n\nmdoe = "known"\n')
    assert problems(config_file=config, environ={}) == [
        f"{config}:4: mdoe: unknown setting (did you mean mode?)"
    ]
    assert problems(environ={"POLICYD_MAPS": "dms:/a", "POLICYD_MOED": "known"}) == [
        "POLICYD_MOED: unknown setting (did you mean POLICYD_MODE?)"
    ]


def test_lines_inside_a_value_are_not_taken_for_settings(tmp_path: Path) -> None:
    config = tmp_path / "policyd.toml"
    config.write_text(
        'maps = [\n  "texthash:/etc/postfix/mode.cf",\n  # mode = "known"\n]\n'
        'exempt_networks = [\n  "10.0.0.0/8",\n  "mode.example/33",\n]\n'
        'mode = "strict"\n'
    )
    assert sorted(problems(config_file=config, environ={})) == [
        f"{config}:7: exempt_networks[1]: value is not a valid IPv4 or IPv6 network",
        f"{config}:9: mode: Input should be 'authenticated', 'sender', 'known',"
        " 'unauthenticated' or 'permit'",
    ]


def test_map_options_are_named_by_position_and_line(tmp_path: Path) -> None:
    config = tmp_path / "policyd.toml"
    config.write_text(
        "maps = [\n"
        '  "dms:/a",\n'
        '  {type = "texthash", pth = "/b"},\n'
        "]\n"
        "[[login_addresses]]\n"
        'type = "texthash"\n'
        'path = "/c"\n'
        "[[login_addresses]]\n"
        'type = "dms"\n'
        "path = 7\n"
    )
    wrong_type, misspelt, missing = sorted(problems(config_file=config, environ={}))
    assert wrong_type.startswith(f"{config}:10: login_addresses[1].path: Input is not a valid path")
    assert missing == f"{config}:3: maps[1]: path is required"
    assert misspelt == f"{config}:3: maps[1].pth: unknown setting (did you mean path?)"
    variable = '[{"type": "dms", "path": "/a", "pth": "/b"}]'
    assert problems(environ={"POLICYD_MAPS": variable}) == [
        "POLICYD_MAPS[0].pth: unknown setting (did you mean path?)"
    ]


def test_flag_errors_name_the_flag_as_typed() -> None:
    names = {"maps": "--map", "exempt_networks": "--exempt-network", "listen": "--listen"}
    flags = {
        "maps": ["dms:/a", "nosuch:/b"],
        "exempt_networks": ["10.0.0.0/8", "10.0.0.0/33"],
        "listen": ["inet:host:99999"],
    }
    assert problems(environ={}, flags=flags, flag_names=names) == [
        "--listen: 'inet:host:99999': port 99999 is out of range (0 to 65535)",
        f"--map nosuch:/b: unknown map type 'nosuch' (known: {', '.join(stores.backends())})",
        "--exempt-network 10.0.0.0/33: value is not a valid IPv4 or IPv6 network",
    ]


@pytest.mark.parametrize(
    ("variable", "value", "problem"),
    [
        (
            "POLICYD_LISTEN",
            "inet:127.0.0.1:65536",
            "POLICYD_LISTEN[0]: 'inet:127.0.0.1:65536': port",
        ),
        ("POLICYD_METRICS_LISTEN", "[::1]:70000", "POLICYD_METRICS_LISTEN: '[::1]:70000': port"),
        ("POLICYD_SCOPE_PORTS", "587,99999", "POLICYD_SCOPE_PORTS[1]: port 99999 is out"),
    ],
)
def test_a_port_out_of_range_says_so(variable: str, value: str, problem: str) -> None:
    [found] = problems(environ={"POLICYD_MAPS": "dms:/a", variable: value})
    assert found.startswith(problem)
    assert "out of range (0 to 65535)" in found


@pytest.mark.parametrize(
    ("text", "endpoint"),
    [
        ("127.0.0.1:10041", Endpoint(kind="inet", host="127.0.0.1", port=10041)),
        ("inet:127.0.0.1:10041", Endpoint(kind="inet", host="127.0.0.1", port=10041)),
        ("[::1]:10041", Endpoint(kind="inet", host="::1", port=10041)),
        ("localhost:0", Endpoint(kind="inet", host="localhost", port=0)),
        ("local:/run/p.sock", Endpoint(kind="unix", path="/run/p.sock")),
    ],
)
def test_endpoints_as_the_docs_and_postfix_write_them(text: str, endpoint: Endpoint) -> None:
    """The README writes the metrics address as 127.0.0.1:10041; both spellings work."""
    metrics = load_settings(environ={"POLICYD_MAPS": "dms:/a", "POLICYD_METRICS_LISTEN": text})
    assert metrics.metrics_listen == endpoint
    policy = load_settings(
        environ={"POLICYD_MAPS": "dms:/a", "POLICYD_LISTEN": text, "POLICYD_METRICS_LISTEN": "none"}
    )
    assert policy.listen == [endpoint]


def test_a_config_file_that_is_not_a_regular_file_is_refused_at_once(tmp_path: Path) -> None:
    fifo = tmp_path / "policyd.toml"
    os.mkfifo(fifo)  # opening it for reading would wait for a writer forever
    assert problems(config_file=fifo, environ={}) == [
        f"{fifo}: cannot read: a FIFO, not a regular file"
    ]
    assert problems(config_file=Path("/dev/urandom"), environ={}) == [
        "/dev/urandom: cannot read: a device, not a regular file"
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
