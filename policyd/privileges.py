"""Process setup for `policyd serve`: give up root, and open enough files for the connections."""

from __future__ import annotations

import grp
import logging
import os
import pwd
import resource

log = logging.getLogger("policyd")

SPARE_FILES = 100  # listeners, map files, log and metrics connections


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


def raise_file_limit(connections: int) -> None:
    """Allow one file descriptor per connection, within the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = connections + SPARE_FILES
    if soft >= wanted:
        return
    if hard != resource.RLIM_INFINITY and hard < wanted:
        log.warning(
            "max_connections %d needs %d open files but the hard limit is %d;"
            " connections beyond it will fail (raise LimitNOFILE or ulimit -n)",
            connections,
            wanted,
            hard,
        )
        wanted = hard
    resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
