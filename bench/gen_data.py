"""Generate a docker-mailserver config directory for the benchmark: accounts, aliases, regexp rules.

The output is deterministic for a given seed and size, so every run of the benchmark measures the
same maps. Shapes follow real docker-mailserver setups: a few domains of unequal size, accounts
named after people, most aliases with one target and some with two or three, every target an
account, and anchored regexp rules for role addresses (``/^sales-[0-9]+@domain3\\.example$/``).

Besides the three docker-mailserver files the directory gets two files of our own, which policyd
never reads: ``bench-regexp-samples.txt`` (senders that match the regexp rules, so the load
generator can send them) and ``bench-manifest.json`` (the parameters, to reuse a directory).

    python bench/gen_data.py --preset 1m --out /tmp/policyd-bench/dms-1m
    python bench/gen_data.py --aliases 5000 --accounts 500 --regexp 20 --out /tmp/x
"""

from __future__ import annotations

import argparse
import base64
import json
import random
import sys
from pathlib import Path

# The two datasets issue 5 names. The small one keeps the same 100 regexp rules, so that
# "1M vs 1k throughput" compares map sizes, not different amounts of regex work.
PRESETS = {
    "1m": {"aliases": 1_000_000, "accounts": 100_000, "regexp": 100},
    "1k": {"aliases": 1_000, "accounts": 100, "regexp": 100},
}
MANIFEST = "bench-manifest.json"
SAMPLES = "bench-regexp-samples.txt"
FORMAT_VERSION = 1  # bump when the generated shapes change, so old directories are rebuilt


def words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


FIRST = words(
    "anna ben carla david emma felix greta hugo ida jonas karl lena max nina otto paula "
    "quentin rosa sven tina ulrich vera walter xenia yusuf zoe alice bob chris diana "
    "erik frank gina henry iris jack kate liam mia noah olga peter rita sam tom ursula "
    "victor wendy amir bea cem dora elif fynn hanna ilja jule"
)
LAST = words(
    "smith mueller schmidt schneider fischer weber meyer wagner becker schulz hoffmann "
    "koch richter klein wolf neumann schwarz braun zimmermann krueger hartmann lange "
    "werner krause lehmann koehler maier herrmann walter koenig mayer huber kaiser fuchs "
    "peters lang scholz moeller weiss jung hahn vogel friedrich keller guenther frank "
    "berger winkler roth beck lorenz baumann franke albrecht ludwig simon boehm"
)
DEPARTMENTS = words(
    "info office team accounts press events finance legal marketing design dev ops "
    "research admin board hr it facilities purchasing logistics quality training"
)
CITIES = words(
    "berlin hamburg munich cologne frankfurt stuttgart leipzig dresden bremen hanover "
    "vienna zurich paris lyon madrid lisbon oslo prague warsaw dublin"
)

# Regexp rule shapes: (pattern for the local part, sample local parts). ``{w}`` is a role word.
# All are anchored and end in the escaped domain, like rules people write for role addresses.
ROLE_WORDS = words(
    "sales support billing orders invoice noreply bounce ticket jobs newsletter shop "
    "returns abuse security alerts reports"
)
RULE_SHAPES: tuple[tuple[str, tuple[str, ...]], ...] = (
    (r"{w}-[0-9]+", ("{w}-1", "{w}-42", "{w}-2024")),
    (r"{w}(-[a-z]+)?", ("{w}", "{w}-emea", "{w}-urgent")),
    (r"{w}\+[0-9a-z]+", ("{w}+a1b2", "{w}+x", "{w}+2024q3")),
    (r"{w}-[0-9a-f]{{8}}", ("{w}-0badc0de", "{w}-12345678", "{w}-deadbeef")),
    (r"{w}\.[a-z]+", ("{w}.team", "{w}.eu", "{w}.staff")),
    (r"(no-?reply|{w})-[a-z0-9]+", ("noreply-7", "no-reply-x", "{w}-abc")),
    (r"{w}-(de|en|fr|es)", ("{w}-de", "{w}-en", "{w}-fr")),
)


def weights_for(domains: int) -> list[float]:
    """Zipf-like domain sizes: the first domain is the biggest, as on most shared servers."""
    return [1.0 / (rank + 1) for rank in range(domains)]


def fake_hash(rng: random.Random) -> str:
    """A string shaped like docker-mailserver's SHA512-CRYPT hash; nothing can log in with it."""
    salt = base64.b64encode(rng.randbytes(12), b"./").decode()
    digest = base64.b64encode(rng.randbytes(66), b"./").decode()[:86]
    return f"{{SHA512-CRYPT}}$6${salt}${digest}"


def unique(stem: str, used: dict[str, int]) -> str:
    """``stem``, or ``stem2``, ``stem3``... when it is taken, like people pick addresses."""
    count = used.get(stem, 0) + 1
    used[stem] = count
    return stem if count == 1 else f"{stem}{count}"


def make_accounts(rng: random.Random, count: int, domains: list[str]) -> list[str]:
    weights = weights_for(len(domains))
    used: dict[str, dict[str, int]] = {domain: {} for domain in domains}
    accounts = []
    for _ in range(count):
        domain = rng.choices(domains, weights)[0]
        local = unique(f"{rng.choice(FIRST)}.{rng.choice(LAST)}", used[domain])
        accounts.append(f"{local}@{domain}")
    return accounts


def alias_stem(rng: random.Random) -> str:
    shape = rng.random()
    if shape < 0.35:
        return f"{rng.choice(FIRST)[0]}.{rng.choice(LAST)}"  # j.smith
    if shape < 0.55:
        return f"{rng.choice(FIRST)}{rng.choice(LAST)[0]}"  # annas
    if shape < 0.80:
        return f"{rng.choice(DEPARTMENTS)}.{rng.choice(CITIES)}"  # sales.berlin
    if shape < 0.92:
        return f"{rng.choice(DEPARTMENTS)}-{rng.choice(CITIES)}"  # dev-hamburg
    return f"{rng.choice(FIRST)}.{rng.choice(LAST)}.{rng.choice(DEPARTMENTS)}"


def make_aliases(
    rng: random.Random, count: int, accounts: list[str], domains: list[str]
) -> list[tuple[str, list[str]]]:
    """Aliases spread over the domains; targets are accounts, mostly of the alias's domain."""
    by_domain: dict[str, list[str]] = {domain: [] for domain in domains}
    for account in accounts:
        by_domain[account.rpartition("@")[2]].append(account)
    account_set = set(accounts)
    weights = weights_for(len(domains))
    used: dict[str, dict[str, int]] = {domain: {} for domain in domains}
    aliases = []
    while len(aliases) < count:
        domain = rng.choices(domains, weights)[0]
        address = f"{unique(alias_stem(rng), used[domain])}@{domain}"
        if address in account_set:
            continue  # an alias that is also an account is legal, but keep the shapes apart
        local_pool = by_domain[domain] or accounts
        size = rng.choices((1, 2, 3), (85, 11, 4))[0]
        targets: list[str] = []
        while len(targets) < size:
            pool = local_pool if rng.random() < 0.9 else accounts
            target = rng.choice(pool)
            if target not in targets:
                targets.append(target)
        aliases.append((address, targets))
    return aliases


def make_rules(
    rng: random.Random, count: int, accounts: list[str], domains: list[str]
) -> tuple[list[str], list[str]]:
    """``count`` distinct pcre lines and, for each, a few senders that match it."""
    lines: list[str] = []
    samples: list[str] = []
    seen: set[str] = set()
    index = 0
    while len(lines) < count:
        word = ROLE_WORDS[index % len(ROLE_WORDS)]
        shape, examples = RULE_SHAPES[(index // len(ROLE_WORDS)) % len(RULE_SHAPES)]
        domain = domains[index % len(domains)]
        index += 1
        if index > count * 50:
            raise ValueError(f"cannot make {count} distinct regexp rules from the shapes")
        pattern = "^" + shape.format(w=word) + "@" + domain.replace(".", r"\.") + "$"
        if pattern in seen:
            continue
        seen.add(pattern)
        targets = rng.sample(accounts, rng.choices((1, 2), (80, 20))[0])
        lines.append(f"/{pattern}/ {','.join(targets)}")
        samples.extend(f"{example.format(w=word)}@{domain}" for example in examples)
    return lines, samples


def generate(
    out: Path, *, aliases: int, accounts: int, regexp: int, domains: int = 8, seed: int = 5
) -> dict[str, object]:
    """Write the directory; returns the manifest. Reuses it if it already has these parameters."""
    manifest: dict[str, object] = {
        "format": FORMAT_VERSION,
        "aliases": aliases,
        "accounts": accounts,
        "regexp": regexp,
        "domains": domains,
        "seed": seed,
    }
    manifest_path = out / MANIFEST
    if manifest_path.exists():
        try:
            if json.loads(manifest_path.read_text()) == manifest:
                return manifest
        except ValueError:
            pass
    if accounts < 1 or domains < 1 or aliases < 0 or regexp < 0:
        raise ValueError("need at least one account and one domain")
    rng = random.Random(seed)
    domain_names = [f"domain{number}.example" for number in range(1, domains + 1)]
    account_list = make_accounts(rng, accounts, domain_names)
    alias_list = make_aliases(rng, aliases, account_list, domain_names)
    rule_lines, samples = make_rules(rng, regexp, account_list, domain_names)

    out.mkdir(parents=True, exist_ok=True)
    manifest_path.unlink(missing_ok=True)  # a half-written directory must not look finished
    header = "# generated by bench/gen_data.py " + json.dumps(manifest, sort_keys=True)
    _write(
        out / "postfix-accounts.cf",
        [header] + [f"{account}|{fake_hash(rng)}" for account in account_list],
    )
    _write(
        out / "postfix-virtual.cf",
        [header] + [f"{alias} {','.join(targets)}" for alias, targets in alias_list],
    )
    _write(out / "postfix-regexp.cf", [header, *rule_lines])
    _write(out / SAMPLES, samples)
    manifest_path.write_text(json.dumps(manifest, sort_keys=True) + "\n")
    return manifest


def _write(path: Path, lines: list[str]) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text("\n".join(lines) + "\n", encoding="utf-8")
    temporary.replace(path)  # atomic: a running policyd never reads a half-written file


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), help="a dataset issue 5 names")
    parser.add_argument("--aliases", type=int, help="lines in postfix-virtual.cf")
    parser.add_argument("--accounts", type=int, help="lines in postfix-accounts.cf")
    parser.add_argument("--regexp", type=int, help="rules in postfix-regexp.cf")
    parser.add_argument("--domains", type=int, default=8)
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument(
        "--out", type=Path, default=None, help="directory (default /tmp/policyd-bench/dms-PRESET)"
    )
    args = parser.parse_args(argv)
    sizes = dict(PRESETS[args.preset]) if args.preset else {"aliases": 1000, "accounts": 100}
    sizes.setdefault("regexp", 100)
    for name in ("aliases", "accounts", "regexp"):
        if getattr(args, name) is not None:
            sizes[name] = getattr(args, name)
    out = args.out or Path("/tmp/policyd-bench") / f"dms-{args.preset or 'custom'}"
    manifest = generate(out, domains=args.domains, seed=args.seed, **sizes)
    print(f"{out}: {json.dumps(manifest, sort_keys=True)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
