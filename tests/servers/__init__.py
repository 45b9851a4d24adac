"""Throw-away real servers for tests (OpenLDAP, PostgreSQL, MariaDB, SQLite files), never mocks.

``common`` holds what every server needs (free ports, readiness polling, processes, the
watchdog, the ``Server`` life cycle, peers that hang), ``tls`` a test CA, ``ldap`` the slapd
server, ``sql`` what the PostgreSQL (``pgsql``) and MariaDB (``mysql``) servers share,
``sqlite`` SQLite files, ``postfix_maps`` Postfix's own maps for differential tests, and
``fixtures`` the pytest fixtures built from them. README.md says how to use them.
"""
