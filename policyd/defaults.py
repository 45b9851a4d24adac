"""Every default and limit policyd uses, in one place, each with the reason for its value."""

from typing import Final

# Replies (postfix-policy.md §B2). Postfix prefixes "<SENDER>: Sender address rejected: "
# itself, so policyd sends only the tail and the client sees the native reply byte for byte.
REJECT_NOT_OWNED = "553 5.7.1 not owned by user {login}"
REJECT_NOT_LOGGED_IN = "553 5.7.1 not logged in"
# Native Postfix answers "451 4.3.0 <SENDER>: Temporary lookup failure" when a map fails.
# A policy reply cannot drop the "Sender address rejected: " prefix, so this is the closest.
TEMPFAIL_ACTION = "451 4.3.0 Temporary lookup failure"
OWNED_ACTION: Final = "OK"

# Listening. Loopback by default: the policy port carries no authentication of its own.
LISTEN = ("inet:127.0.0.1:10040",)
# /metrics, /healthz and /readyz: their own port, also loopback by default.
METRICS_LISTEN = "inet:127.0.0.1:10041"

# unix: listeners. Postfix's smtpd runs as the postfix user and needs write access to the
# socket: give the socket that group (socket_group) or widen the mode.
SOCKET_MODE = "0660"

# Postfix closes an idle policy connection after smtpd_policy_service_max_idle (300 s) and
# any connection after smtpd_policy_service_max_ttl (1000 s). If policyd closed first, the
# next request on that connection would pay Postfix's 1 s retry_delay, so outlast both.
IDLE_TIMEOUT = 1800.0

# Postfix writes a whole request at once, so a request that has started but not finished
# within this time is a broken or hostile client.
REQUEST_TIMEOUT = 30.0

# A real request is about 700 bytes and 29 attributes (reference/postfix-3.7-request.txt).
# Postfix's own documented line limit is 4 * line_length_limit = 8192 bytes. The request limit
# also bounds what a connection can make policyd buffer (see READ_CHUNK).
MAX_LINE_BYTES = 8192
MAX_REQUEST_BYTES = 16384
MAX_ATTRIBUTES = 256

# Memory per connection: a read takes at most READ_CHUNK bytes, and once this many bytes of
# replies wait for a client that does not read, policyd stops reading it until it catches up.
# So a connection holds at most about max_request_bytes + READ_CHUNK + WRITE_BUFFER_HIGH.
READ_CHUNK = 32768
WRITE_BUFFER_HIGH = 16384
# Postfix sends one request and waits for its reply (it never pipelines). A client that sends
# many in one read gets this many answered, then the event loop serves everyone else before
# the next batch, and its connection is not read meanwhile: one client cannot stall the rest.
REQUESTS_PER_READ = 64
# A client dropped for a broken request after earlier requests were answered gets this long
# to read those replies before its connection is cut.
CLOSE_GRACE = 5.0

# /metrics, /healthz and /readyz are asked one at a time by a scraper and a probe or two;
# connections beyond this many at once are closed, so a flood of HTTP clients cannot take the
# descriptors that policy connections, reloads and the health check itself need.
MAX_HTTP_CONNECTIONS = 64
# Descriptors never given to connections: listeners, map files being read, the parsing
# process's pipes, the log, and a margin, so reloads and health checks always have some.
RESERVED_FILES = 64
# Each listener's queue of connections not yet accepted (listen(2)'s backlog, asyncio's
# default). asyncio accepts the whole queue at once, and only then can policyd close those
# over a cap, so for a moment each listener holds up to this many descriptors beyond its cap:
# the plan keeps room for that, or a flood being refused would take the reserve above.
LISTEN_BACKLOG = 100

# Connections from one client address at once (unix-socket clients are not counted): enough
# for Postfix's smtpd processes on a host (100 per master.cf service by default, several
# services), few enough that one source cannot hold every connection for the idle timeout.
MAX_CONNECTIONS_PER_CLIENT = 1000

# Kernel buffers of each policy connection, each way (Linux doubles the value). A request is
# under 1 kB and a reply under 100 bytes, so this costs no speed, and it bounds what a client
# that sends without reading makes the kernel hold for it.
SOCKET_BUFFER = 32768

# Postfix opens at most one connection per smtpd process (default_process_limit 100 per
# service); far more than that is a flood. Connections beyond the limit are closed at once.
MAX_CONNECTIONS = 10000

# Decisions remembered per (login, sender): Postfix asks once per recipient, and the same
# users send again and again; 0 turns the cache off. Questions whose sender, login and the
# scoping attributes are longer than REMEMBERED_KEY_CHARACTERS in all (no real address is)
# are never remembered, so each entry takes at most about 2 kB (README "Guarantees").
DECISION_CACHE_SIZE = 65536
REMEMBERED_KEY_CHARACTERS = 600

# A lookup that waits (a network store) must fail well inside Postfix's
# smtpd_policy_service_timeout (100 s; the README recommends 10 s), so the reply is our 4xx.
LOOKUP_TIMEOUT = 5.0

# CPU time one decision may take before it is cut off with a temporary failure. A decision
# takes microseconds; only a backtracking pattern (pcre, regexp, a glob in grants or deny)
# against a crafted sender can take long, and it would stall every client meanwhile. The
# timer ticks in a few milliseconds, so a match is cut off between this and about 10 ms later.
PATTERN_TIME_LIMIT = 0.1

# Network stores (LDAP, SQL). An answer, found or not found, is remembered this long: a
# change in the directory or database takes at most this long to reach policyd (PostgreSQL's
# NOTIFY makes it at once). Decisions made with these answers live no longer.
CACHE_TTL = 60.0
NETWORK_CACHE_SIZE = 100_000  # remembered answers per store
# One lookup's limit; below lookup_timeout, so the store's own error is what is reported.
NETWORK_TIMEOUT = 3.0
NETWORK_CONNECTIONS = 4  # per store: connections (or threads) in its pool
# When a network store's server cannot be reached, lookups stop asking it for this long,
# doubling while it lasts up to the maximum: an outage then answers from memory (stale_ttl)
# or fails at once, instead of each lookup waiting for a dead server; a recovery is noticed
# within the maximum.
NETWORK_DOWN_PAUSE = 0.5
NETWORK_MAX_DOWN_PAUSE = 5.0
# At start, an LDAP store looks for values its filters can never match (a group address
# stored with capitals in a case-exact attribute); it reads at most this many entries, so a
# big directory costs one bounded search.
LDAP_CASE_CHECK_ENTRIES = 1000

# PostgreSQL stores LISTEN on this channel and forget their answers when a NOTIFY arrives
# (examples/sql/postfixadmin/notify.pgsql.sql sends them), so every replica sees a change at
# once instead of after CACHE_TTL. A listening connection whose server goes silent (a
# network partition, a frozen host) is noticed by asking it SELECT 1 this often; then it is
# reopened and every answer forgotten, since notifications may have been missed meanwhile.
NOTIFY_CHANNEL = "policyd"
NOTIFY_CHECK_INTERVAL = 5.0
# How long to wait before opening a lost listening connection again, at first and at most.
NOTIFY_RETRY_FIRST = 0.5
NOTIFY_RETRY_MAX = 30.0
# Postfix closes a database connection idle for about a minute (pgsql_table(5)); so do we.
SQL_IDLE_SECONDS = 60.0
# What `hosts = localhost` means to Postfix's mysql: maps: libmysqlclient's default socket,
# not TCP (mysql_table(5)). This is Debian's.
MYSQL_DEFAULT_SOCKET = "/run/mysqld/mysqld.sock"

# A problem that can repeat thousands of times a second (descriptors run out, a flood is
# refused) is logged at most once per this many seconds, with how often it happened.
LOG_INTERVAL = 10.0

# On SIGTERM, requests being decided get this long to finish before connections are cut.
SHUTDOWN_TIMEOUT = 10.0

# Postfix's compatibility_level, which decides the defaults of append_dot_mydomain and
# smtputf8_enable. Postfix's compiled-in level is 0, but every main.cf Debian 12 and
# docker-mailserver generate sets 3.6 or 2; both give append_dot_mydomain = no and
# smtputf8_enable = yes. Set it as the Postfix main.cf does.
COMPATIBILITY_LEVEL = "3.6"

# Postfix's recipient_delimiter as docker-mailserver sets it. Set "" when Postfix's is empty.
RECIPIENT_DELIMITER = "+"

# A map or rules file line longer than this is refused (file:line): the longest real ones, a
# group alias with thousands of members, are a few hundred kB, and one line of 100 MB would
# cost several times that in memory while parsed.
MAX_MAP_LINE_BYTES = 1 << 20
# Problems quote at most this much of an offending line in the log and /readyz.
MAX_QUOTED_LINE = 80

# How often file stores look for changed files. SIGHUP reloads at once.
RELOAD_INTERVAL = 5.0
# A file modified less than this long ago may still be being written: read it a moment later.
HOT_FILE_SECONDS = 1.0
# A file that looks half-written (shrunk in place, no newline at its end) is read once it has
# stayed the same this long: a writer that pauses for less is never read half-way.
SETTLE_SECONDS = 5.0
# A reload that failed for a reason that may pass (no space left, no descriptors) is tried
# again after 1 s, 2 s, 4 s ... at most this long apart.
MAX_RELOAD_BACKOFF = 60.0
# Maps smaller than this are parsed in the daemon itself (milliseconds); bigger ones in a
# worker process, so the event loop never waits for them (policyd.stores.parsing).
LOAD_IN_PROCESS_BYTES = 262144

# nested_aliases: how many alias hops to follow, and how many lookups one decision may make
# while following them (Postfix bounds its own expansion the same way:
# virtual_alias_recursion_limit, virtual_alias_expansion_limit).
MAX_ALIAS_DEPTH = 8
MAX_ALIAS_LOOKUPS = 1000

# A login denied by the deny file, or an alias login refused by alias_logins = "refuse".
REJECT_LOGIN_DENIED = "553 5.7.1 sending is disabled for user {login}"

# The senders API (GET /v1/senders): requests a second, and how many may come at once, from
# all clients together. A listing checks every address it names with a full decision, so a
# webmail filling one identity list at login is a few requests; a script walking every
# login waits its turn (429 with Retry-After) rather than slowing the policy service.
SENDERS_API_RATE = 5.0
SENDERS_API_BURST = 20
# A login may send as longer lists than this only by its own choice of the admin: a
# shared mailbox of many aliases, a relay. `policyd audit` names such logins.
AUDIT_MAX_SENDERS = 100
# `policyd senders` checks at most this many candidate addresses for one login (each costs a
# decision); beyond, the listing says how many it left out.
SENDERS_MAX_CANDIDATES = 20000
# A listing checks each candidate with a whole decision (tens of microseconds); after this many
# it lets the event loop serve other work, so a big listing never stalls Postfix's requests.
SENDERS_CHECKS_PER_TURN = 100
# The longest login the senders API accepts: Postfix's SASL logins are addresses or user
# names, far shorter; anything longer is a malformed request (400).
SENDERS_API_MAX_LOGIN = 512
# `policyd audit` tries pattern rules against every address of at most this many domains
# named in the maps, to find rules that match a whole domain.
AUDIT_DOMAINS = 1000
