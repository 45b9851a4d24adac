"""Process setup for `policyd serve`: give up root, and open enough files for the connections."""

from __future__ import annotations

import grp
import logging
import os
import pwd
import resource

from policyd import defaults

log = logging.getLogger("policyd")


def drop_privileges(user: str | None, group: str | None) -> None:
    """Become ``user`` (and ``group``, else the user's primary group) if started as root.

    Called after the sockets are bound (so privileged ports and root-only socket directories
    work) and before any map is read (so a map the user cannot read fails at startup, not at
    the first reload).
    """
    if os.geteuid() != 0:
        return
    if user is None:
        log.warning(
            "running as root: set user (and group) to drop privileges, or start policyd as an"
            " unprivileged user (systemd User=/DynamicUser=, a container USER)"
        )
        return
    account = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
    if group is None:
        gid = account.pw_gid
    else:
        gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
    os.initgroups(account.pw_name, gid)
    os.setgid(gid)
    os.setuid(account.pw_uid)
    log.info("running as user %s (uid %d, gid %d)", account.pw_name, account.pw_uid, gid)


def plan_descriptors(connections: int, listeners: int = 2) -> int:
    """Raise the open-files limit for ``connections`` policy connections plus the HTTP
    connections, the descriptors held back for reloads, logs and health checks, and a full
    accept queue on each of the ``listeners`` (policy and HTTP); return how many policy
    connections fit (fewer than asked when the hard limit is too low).

    With every descriptor in use, /healthz times out (a liveness probe kills the pod) and a
    reload fails with "Too many open files"; keeping the policy connections within what is
    left makes both impossible, also while a flood over the caps is being refused.
    """
    reserved = (
        defaults.MAX_HTTP_CONNECTIONS
        + defaults.RESERVED_FILES
        + defaults.LISTEN_BACKLOG * listeners
    )
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = connections + reserved
    if soft < wanted:
        limit = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
        soft = limit
    fits = min(connections, soft - reserved)
    if fits < connections:
        fits = max(fits, 1)
        log.warning(
            "max_connections %d needs %d open files but only %d are allowed (hard limit):"
            " serving at most %d connections (raise LimitNOFILE or ulimit -n)",
            connections,
            wanted,
            soft,
            fits,
        )
    return fits
