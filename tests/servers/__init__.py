"""Throw-away real servers for tests (OpenLDAP now, SQL servers beside it), never mocks.

``common`` holds what every server needs (free ports, readiness polling, process cleanup, a
watchdog), ``tls`` a test CA, ``ldap`` the slapd fixture, ``postfix_maps`` Postfix's own map
clients for differential tests, and ``fixtures`` the pytest fixtures built from them.
"""
