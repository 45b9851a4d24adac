"""What each speed trick policyd keeps is worth: instructions per request without it.

Every optimisation must earn its place (issue 11: at least 5 % of a request's cost). For each
one this builds a copy of the package with that trick switched off (one small edit, listed
below), runs bench/hotpath.py on the copy under valgrind's callgrind, and reports the
instructions per request against the unchanged package. Instruction counts repeat exactly
for the same code and input, where times on this VM move by ±15 % from run to run.

    python bench/tricks.py --data /tmp/policyd-bench/dms-1k        # about 15 minutes

Per request = (instructions with 3 passes - with 1 pass) / (2 x requests): start-up and the
warm-up pass cancel out.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
UNCACHED = ("--setting", "decision_cache_size=0")


@dataclass(frozen=True)
class Trick:
    name: str
    file: str  # under policyd/
    old: str  # the text that switches it on
    new: str  # the same without the trick
    args: tuple[str, ...] = ()  # what hotpath.py needs to exercise it


TRICKS = (
    Trick(
        "one whole request per read skips the parser's buffer",
        "codec.py",
        "        if (\n            not buffer\n",
        "        if (\n            False\n            and not buffer\n",
    ),
    Trick(
        "attributes parsed only when read",
        "codec.py",
        "    return PolicyRequest(block)\n",
        "    request = PolicyRequest(block)\n"
        "    for name in ATTRIBUTES:\n        request.get(name)\n    return request\n",
    ),
    Trick(
        "a plain address skips the token-by-token rewrite",
        "canonical.py",
        "    if _PLAIN_ADDRESS.fullmatch(sender):\n",
        "    if False:\n",
        UNCACHED,
    ),
    Trick(
        "a plain address at a remote domain gets its two keys directly",
        "canonical.py",
        "    if _PLAIN_ADDRESS.fullmatch(address) and not any(\n",
        "    if False and not any(\n",
        UNCACHED,
    ),
    Trick(
        "pattern rules indexed by the domain they end in",
        "tables.py",
        '        if all(rule.kind == "match" for rule in rules):',
        "        if False:",
        UNCACHED,
    ),
)


def instructions(package_root: Path, data: Path, requests: int, args: tuple[str, ...]) -> float:
    def run(passes: int) -> int:
        command = [
            "valgrind",
            "--tool=callgrind",
            "--callgrind-out-file=/dev/null",
            sys.executable,
            "hotpath.py",
            "--data",
            str(data),
            "--passes",
            str(passes),
            "--requests",
            str(requests),
            *args,
        ]
        result = subprocess.run(
            command,
            cwd=ROOT / "bench",
            env={"PYTHONPATH": str(package_root), "PATH": "/usr/bin:/bin"},
            capture_output=True,
            text=True,
            check=False,
        )
        found = re.search(r"Collected : (\d+)", result.stderr)
        if result.returncode != 0 or found is None:
            raise SystemExit(f"hotpath.py failed under valgrind:\n{result.stderr[-3000:]}")
        return int(found.group(1))

    return (run(3) - run(1)) / (2 * requests)


def without(trick: Trick, scratch: Path) -> Path:
    """A copy of the package with ``trick`` switched off."""
    root = scratch / re.sub(r"\W+", "-", trick.name)
    shutil.copytree(
        ROOT / "policyd", root / "policyd", ignore=shutil.ignore_patterns("__pycache__")
    )
    path = root / "policyd" / trick.file
    text = path.read_text()
    if trick.old not in text:
        raise SystemExit(f"{trick.file} changed: cannot find the text of {trick.name!r}")
    path.write_text(text.replace(trick.old, trick.new, 1))
    return root


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--data", type=Path, required=True, help="a bench/gen_data.py directory")
    parser.add_argument("--requests", type=int, default=5000)
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        raise SystemExit("needs valgrind (Debian: apt-get install valgrind)")
    print(
        "| trick | instructions per request, with it | without it | a request costs, without it |"
    )
    print("|---|---:|---:|---:|")
    with tempfile.TemporaryDirectory(prefix="policyd-tricks-") as scratch:
        base: dict[tuple[str, ...], float] = {}
        for trick in TRICKS:
            if trick.args not in base:
                base[trick.args] = instructions(ROOT, args.data, args.requests, trick.args)
            off = instructions(without(trick, Path(scratch)), args.data, args.requests, trick.args)
            on = base[trick.args]
            note = " (decisions not remembered)" if trick.args == UNCACHED else ""
            print(
                f"| {trick.name}{note} | {on:,.0f} | {off:,.0f} | {(off - on) / on * 100:+.1f} % |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
