"""The Dockerfile: hadolint clean, and its build stage replayed on the host.

No Docker engine runs in CI, so the build stage's own COPY and RUN steps are replayed here,
step by step, in a scratch root: the build context is what .dockerignore lets through, an
absolute path in the Dockerfile is taken under the scratch root, and the host's Python stands
in for the base image. The venv that comes out is the one the image ships; it is then run the
way the final stage runs it: with the image's POLICYD_* environment, the example
docker-mailserver directory where the image expects it, a real policy request, and the
image's own HEALTHCHECK command.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import urllib.error
import urllib.request
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.deploy.helpers import REPO, Daemon, ask, require_tool, run
from tests.servers.common import free_ports
from tests.servers.ldap import Slapd

DOCKERFILE = REPO / "Dockerfile"
DMS_MOUNT = "/tmp/docker-mailserver"  # where docker-mailserver and the image put its config
# What the installed policyd runs with besides the image's POLICYD_* variables: no POLICYD_*
# setting of the machine running the tests leaks in.
BASE_ENV = {"PATH": os.environ["PATH"], "LANG": "C.UTF-8"}


@dataclass
class Instruction:
    keyword: str
    args: str
    line: int


@dataclass
class Stage:
    base: str
    name: str
    instructions: list[Instruction] = field(default_factory=list)


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[Stage]]:
    """The global ARG defaults and the stages, with continuation lines joined."""
    instructions: list[Instruction] = []
    pending, start = "", 0
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if line.startswith("#") or (not line and not pending):
            continue  # comments, also inside continued instructions, as BuildKit does
        if not pending:
            start = number
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, args = (pending + line).partition(" ")
        instructions.append(Instruction(keyword.upper(), args.strip(), start))
        pending = ""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for instruction in instructions:
        if instruction.keyword == "FROM":
            base, _, name = instruction.args.partition(" AS ")
            stages.append(Stage(base.strip(), name.strip()))
        elif not stages:
            assert instruction.keyword == "ARG", f"line {instruction.line}: before FROM"
            key, _, value = instruction.args.partition("=")
            global_args[key] = value
        else:
            stages[-1].instructions.append(instruction)
    return global_args, stages


def env_assignments(instruction: Instruction) -> dict[str, str]:
    pairs = [token.partition("=") for token in shlex.split(instruction.args)]
    assert all(sep for _, sep, _ in pairs), f"line {instruction.line}: use ENV KEY=VALUE"
    return {key: value for key, _, value in pairs}


def _pattern(glob: str) -> re.Pattern[str]:
    """A .dockerignore pattern: ``*`` and ``?`` stay within one path element, ``**`` does not."""
    out = ""
    for token in re.split(r"(\*\*/?|\*|\?)", glob.strip("/")):
        out += {"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}.get(
            token, re.escape(token)
        )
    return re.compile(out)


def ignored(relative: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    parts = relative.split("/")
    candidates = ["/".join(parts[:end]) for end in range(1, len(parts) + 1)]
    excluded = False
    for negated, pattern in rules:
        if any(pattern.fullmatch(candidate) for candidate in candidates):
            excluded = not negated
    return excluded


def dockerignore_rules() -> list[tuple[bool, re.Pattern[str]]]:
    rules = []
    for raw in (REPO / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            rules.append((line.startswith("!"), _pattern(line.removeprefix("!"))))
    return rules


def copy_from_context(source: str, destination: Path) -> int:
    """COPY SOURCE DEST from the build context; returns how many files it copied."""
    rules = dockerignore_rules()
    origin = REPO / source
    if ignored(source.strip("/"), rules) or not origin.exists():
        raise AssertionError(f"COPY {source}: not in the build context (see .dockerignore)")
    if origin.is_file():
        target = destination / origin.name if destination.is_dir() else destination
        shutil.copy2(origin, target)
        return 1
    copied = 0
    for path in sorted(origin.rglob("*")):
        relative = path.relative_to(REPO).as_posix()
        if path.is_file() and not ignored(relative, rules):
            target = destination / path.relative_to(origin)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
            copied += 1
    return copied


# A RUN step that runs pip without --no-index downloads packages, as `docker build` would.
FROM_INDEX = re.compile(r"\bpip\b(?!.*--no-index)")


class BuildReplay:
    """The build stage's steps run under ``root`` instead of in a container, in ``environ``
    (this process's environment by default)."""

    def __init__(self, root: Path, environ: Mapping[str, str] | None = None) -> None:
        self.root = root
        environ = os.environ if environ is None else environ
        shim = root / "base-image-bin"
        shim.mkdir(parents=True)
        # The base image's `python`: this interpreter (3.11 or newer, as the image's).
        (shim / "python").symlink_to(sys.executable)
        self.env = {**environ, "PATH": f"{shim}{os.pathsep}{environ['PATH']}"}
        self.env.pop("VIRTUAL_ENV", None)
        self.cwd = root
        self.declared: dict[str, str] = {}  # ENV values as the Dockerfile writes them
        self.copied: dict[str, int] = {}

    def under_root(self, path: str) -> Path:
        return self.root / path.lstrip("/") if path.startswith("/") else self.cwd / path

    def run(self, stage: Stage) -> None:
        for instruction in stage.instructions:
            step = getattr(self, "do_" + instruction.keyword.lower(), None)
            assert step is not None, f"line {instruction.line}: cannot replay {instruction.keyword}"
            step(instruction)

    def do_env(self, instruction: Instruction) -> None:
        for key, value in env_assignments(instruction).items():
            self.declared[key] = value
            self.env[key] = str(self.under_root(value)) if value.startswith("/") else value

    def do_workdir(self, instruction: Instruction) -> None:
        self.cwd = self.under_root(instruction.args)
        self.cwd.mkdir(parents=True, exist_ok=True)

    def do_copy(self, instruction: Instruction) -> None:
        *sources, destination = shlex.split(instruction.args)
        assert not any(s.startswith("--") for s in sources), f"line {instruction.line}: flags"
        target = self.under_root(destination)
        if destination.endswith("/"):
            target.mkdir(parents=True, exist_ok=True)
        for source in sources:
            self.copied[source] = copy_from_context(source, target)

    def do_run(self, instruction: Instruction) -> None:
        words = instruction.args.split(" ")
        while words and words[0].startswith("--"):  # --mount=type=cache,...: BuildKit only
            words.pop(0)
        command = " ".join(words)
        absolute = [word for word in shlex.split(command) if word.startswith("/")]
        assert not absolute, f"line {instruction.line}: name paths through ENV, not {absolute}"
        result = run(["sh", "-c", command], timeout=300, cwd=self.cwd, env=self.env)
        needs = ""
        if FROM_INDEX.search(command):
            needs = (
                " (this step downloads from the package index, PyPI, as `docker build` does:"
                " is it reachable from here, or set PIP_INDEX_URL to a mirror)"
            )
        assert result.returncode == 0, f"line {instruction.line} failed{needs}:\n{result.stderr}"


@dataclass
class Image:
    venv: Path
    wheel: Path  # the wheel the build stage built and installed
    env: dict[str, str]  # the final stage's POLICYD_* variables, maps under the scratch root
    dms: Path  # the example docker-mailserver directory, "mounted" where the image expects it
    healthcheck: list[str]


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Image:
    global_args, stages = parse_dockerfile(DOCKERFILE.read_text())
    build = next(stage for stage in stages if stage.name == "build")
    final = stages[-1]
    root = tmp_path_factory.mktemp("image-root")
    replay = BuildReplay(root)
    replay.run(build)
    assert replay.copied["policyd/"] > 5, "policyd/ came out of the build context empty"

    # The final stage takes the venv whole, at the path its scripts were written for.
    copy_from = [
        i.args.split()[1:] for i in final.instructions if i.args.startswith("--from=build")
    ]
    assert copy_from == [[replay.declared["VIRTUAL_ENV"]] * 2]
    # ... and the same interpreter the venv points at.
    assert final.base == build.base == "${PYTHON_IMAGE}", global_args

    env: dict[str, str] = {}
    healthcheck: list[str] = []
    for instruction in final.instructions:
        if instruction.keyword == "ENV":
            env |= {
                k: v for k, v in env_assignments(instruction).items() if k.startswith("POLICYD_")
            }
        if instruction.keyword == "HEALTHCHECK":
            healthcheck = json.loads(instruction.args.split(" CMD ", 1)[1])
    assert env["POLICYD_MAPS"] == f"dms:{DMS_MOUNT}"
    dms = root / DMS_MOUNT.lstrip("/")
    shutil.copytree(REPO / "examples" / "dms", dms)
    env["POLICYD_MAPS"] = f"dms:{dms}"
    (wheel,) = (replay.cwd / "dist").glob("policyd-*.whl")  # WORKDIR/dist
    return Image(Path(replay.env["VIRTUAL_ENV"]), wheel, env, dms, healthcheck)


def policyd(image: Image, *args: str) -> subprocess.CompletedProcess[str]:
    return run([image.venv / "bin" / "policyd", *args], env={**BASE_ENV, **image.env})


def test_hadolint_is_clean() -> None:
    hadolint = require_tool("hadolint")
    # A linter that lints nothing would pass too: it must catch a known mistake first.
    bad = run([hadolint, "-"], input="FROM python:latest\n")
    assert bad.returncode != 0 and "DL3007" in bad.stdout
    result = run([hadolint, "--failure-threshold", "style", DOCKERFILE])
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerignore_keeps_the_context_to_what_the_build_copies() -> None:
    rules = dockerignore_rules()
    assert not ignored("policyd/cli.py", rules)
    assert not ignored("pyproject.toml", rules)
    assert not ignored("LICENSE", rules)  # the wheel ships it
    assert ignored("policyd/__pycache__/cli.cpython-311.pyc", rules)
    assert ignored("tests/test_cli.py", rules)
    assert ignored(".git/HEAD", rules)


def test_the_wheel_ships_the_licence_pyproject_names(image: Image) -> None:
    licence = (REPO / "LICENSE").read_text()
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["license"]
    assert licence.startswith(f"{declared} License\n"), "LICENSE is not the licence pyproject names"
    with zipfile.ZipFile(image.wheel) as wheel:
        names = wheel.namelist()
        (shipped,) = [name for name in names if name.endswith(".dist-info/licenses/LICENSE")]
        assert wheel.read(shipped).decode() == licence
        (metadata,) = [name for name in names if name.endswith(".dist-info/METADATA")]
        assert f"License-Expression: {declared}\n" in wheel.read(metadata).decode()


def test_a_step_that_needs_the_package_index_says_so(tmp_path: Path) -> None:
    """Without the index (here: pip told not to use one), the failure names it."""
    offline = {**os.environ, "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(tmp_path)}
    replay = BuildReplay(tmp_path / "root", offline)
    step = Instruction("RUN", 'python -m pip download --dest . "policyd-no-such-package"', 1)
    with pytest.raises(AssertionError, match=r"line 1 failed \(this step downloads from the pack"):
        replay.do_run(step)
    local = Instruction("RUN", "python -c 'raise SystemExit(3)'", 2)
    with pytest.raises(AssertionError, match=r"line 2 failed:\n"):
        replay.do_run(local)


def test_validate_accepts_the_image_environment(image: Image) -> None:
    result = policyd(image, "validate")
    assert result.returncode == 0, result.stderr
    assert f"map dms:{image.dms}:" in result.stdout


def test_check_in_the_image(image: Image) -> None:
    owned = policyd(image, "check", "user1@localhost.localdomain", "alias1@localhost.localdomain")
    assert owned.returncode == 0, owned.stderr
    assert f"({image.dms / 'postfix-virtual.cf'}:2)" in owned.stdout
    refused = policyd(image, "check", "added@localhost.localdomain", "user1@localhost.localdomain")
    assert refused.returncode == 1, refused.stderr
    assert "verdict: reject" in refused.stdout


def test_the_image_has_the_ldap_extra(image: Image, slapd: Slapd, tmp_path: Path) -> None:
    """``ldap:`` maps work in the image: the extra's client is installed."""
    table = tmp_path / "ldap-users.cf"
    table.write_text(slapd.postfix_cf(query_filter="(mail=%s)", result_attribute="mail"))
    env = {**BASE_ENV, **image.env, "POLICYD_MAPS": f"ldap:{table}"}
    login = "some.user@localhost.localdomain"
    result = run([image.venv / "bin" / "policyd", "check", login, login], env=env)
    assert result.returncode == 0, result.stderr
    assert f"(ldap:{table}: (mail={login}) found uid=some.user," in result.stdout


def test_serve_answers_postfix_and_its_healthcheck(image: Image, tmp_path: Path) -> None:
    # The image's environment, on ports the kernel picks instead of 10040 and 10041.
    ports = {"POLICYD_LISTEN": "inet:127.0.0.1:0", "POLICYD_METRICS_LISTEN": "inet:127.0.0.1:0"}
    daemon = Daemon(
        [image.venv / "bin" / "policyd", "serve"],
        {**BASE_ENV, **image.env, **ports},
        tmp_path / "policyd.log",
    )
    try:
        refused = ask(
            daemon.endpoint,
            sasl_username="added@localhost.localdomain",
            sender="user2@localhost.localdomain",
        )
        assert refused == "553 5.7.1 not owned by user added@localhost.localdomain"
        owned = ask(
            daemon.endpoint,
            sasl_username="user1@localhost.localdomain",
            sender="alias1@localhost.localdomain",
        )
        assert owned == "OK"
        with urllib.request.urlopen(f"http://{daemon.http}/readyz", timeout=5) as ready:
            assert ready.status == 200

        # The image's HEALTHCHECK word for word, pointed at where this daemon listens.
        assert image.healthcheck[0] == "python"  # the venv's, first on the image's PATH
        healthcheck = [image.venv / "bin" / "python", *image.healthcheck[1:]]
        healthcheck_env = {**BASE_ENV, "POLICYD_METRICS_LISTEN": f"inet:{daemon.http}"}
        healthy = run(healthcheck, timeout=10, env=healthcheck_env)
        assert healthy.returncode == 0, healthy.stderr
    except BaseException:
        daemon.kill()
        raise
    daemon.stop()

    # With the daemon gone the same check must fail, or it checks nothing.
    unhealthy = run(healthcheck, timeout=10, env=healthcheck_env)
    assert unhealthy.returncode != 0
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://{daemon.http}/healthz", timeout=5)


@pytest.mark.parametrize("backend", ["pgsql", "mysql"])
def test_the_image_reads_sql_maps(image: Image, backend: str, tmp_path: Path) -> None:
    """Its client library is installed: a map whose server is down is a temporary failure,
    not "needs the Python package"."""
    cf = tmp_path / "map.cf"
    cf.write_text(
        f"hosts = 127.0.0.1:{free_ports(1)[0]}\n"
        "query = SELECT username FROM mailbox WHERE username = '%s'\n"
    )
    result = policyd(image, "check", "--map", f"{backend}:{cf}", "a@example.com", "a@example.com")
    assert result.returncode == 75, result.stdout + result.stderr
    assert "verdict: tempfail" in result.stdout
