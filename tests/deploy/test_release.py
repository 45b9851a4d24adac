"""The release workflow (.github/workflows/release.yml): actionlint clean, and it does what the
README says: on a version tag, a multi-arch image from the Dockerfile, pushed.

CI runs no GitHub Actions, so the workflow is linted (actionlint, with shellcheck for its
`run:` scripts where .ci/run installed it), its shape is checked, and its one script of our
own, the check that the tag is policyd's version, is run here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from policyd import __version__
from tests.deploy.helpers import REPO, require_tool, run

WORKFLOWS = REPO / ".github" / "workflows"
RELEASE = WORKFLOWS / "release.yml"


def workflow() -> dict[Any, Any]:
    loaded: dict[Any, Any] = yaml.safe_load(RELEASE.read_text())
    return loaded


def steps() -> list[dict[str, Any]]:
    (job,) = workflow()["jobs"].values()
    found: list[dict[str, Any]] = job["steps"]
    return found


def test_actionlint_is_clean(tmp_path: Path) -> None:
    actionlint = require_tool("actionlint")
    # A linter that lints nothing would pass too: it must catch known mistakes first, an
    # input the action does not have, and a misspelt key.
    broken = tmp_path / "broken.yml"
    text = RELEASE.read_text().replace("platforms:", "platform:").replace("runs-on:", "runs_on:")
    broken.write_text(text)
    found = run([actionlint, "-no-color", broken])
    assert found.returncode != 0
    assert '"platform" is not defined' in found.stdout and "runs_on" in found.stdout
    workflows = sorted(WORKFLOWS.glob("*.yml"))
    assert RELEASE in workflows
    result = run([actionlint, "-no-color", *workflows], cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_version_tag_builds_and_pushes_a_multi_arch_image_from_the_dockerfile() -> None:
    # PyYAML reads the key `on` as True.
    assert workflow()[True] == {"push": {"tags": ["v*.*.*"]}}
    build = next(step for step in steps() if step.get("uses", "").startswith("docker/build-push"))
    assert build["with"]["context"] == "."
    assert (REPO / "Dockerfile").is_file()
    assert set(build["with"]["platforms"].split(",")) == {"linux/amd64", "linux/arm64"}
    assert build["with"]["push"] is True
    actions = [step.get("uses", "").split("@")[0] for step in steps()]
    assert "docker/setup-qemu-action" in actions  # arm64 on an amd64 runner
    meta = next(step for step in steps() if step.get("id") == "meta")
    assert meta["with"]["images"].endswith("/policyd")
    assert build["with"]["tags"] == "${{ steps.meta.outputs.tags }}"


@pytest.mark.parametrize(
    ("tag", "passes"), [(f"v{__version__}", True), ("v0.0.0-not-the-version", False)]
)
def test_the_workflow_refuses_a_tag_that_is_not_policyds_version(tag: str, passes: bool) -> None:
    (check,) = [step for step in steps() if step.get("name") == "The tag is policyd's version"]
    result = run(
        ["bash", "-e", "-c", check["run"]],
        cwd=REPO,
        env={"PATH": os.environ["PATH"], "GITHUB_REF_NAME": tag},
    )
    assert (result.returncode == 0) is passes, result.stdout + result.stderr
    if not passes:
        assert f"::error::tag {tag} is not policyd's version v{__version__}" in result.stdout


def test_until_a_registry_has_it_the_docs_build_the_image_the_deployments_name() -> None:
    """The compose file and both Kubernetes shapes name policyd:VERSION; the README and the
    guides say how to build exactly that."""
    tag = f"policyd:{__version__}"
    compose = yaml.safe_load((REPO / "deploy/docker-mailserver/compose.yaml").read_text())
    assert compose["services"]["policyd"]["image"] == tag
    assert compose["services"]["policyd"]["build"] == "../.."  # `up --build` builds it
    for guide in ("README.md", "deploy/kubernetes/README.md", "deploy/docker-mailserver/README.md"):
        assert f"docker build -t {tag} " in (REPO / guide).read_text(), guide
    assert "No registry has a policyd image yet" in (REPO / "README.md").read_text()
