-- The iRedMail tables that policyd's example map reads, for PostgreSQL (iRedMail's `vmail`
-- database).
--
-- A real iRedMail creates its own tables; this file is for trying policyd without one, and for
-- policyd's tests. It has only the columns the sender-login queries read (query and
-- senders_query), with iRedMail's names and types: the flags are small integers, 1 or 0, in
-- PostgreSQL too. A mailbox may send only while it, its enablesmtp flag and its domain are
-- active, and the domain is not a backup MX.

CREATE TABLE domain (
    domain      varchar(255) PRIMARY KEY,
    description text,
    backupmx    int2         NOT NULL DEFAULT 0,
    created     timestamp    NOT NULL DEFAULT now(),
    modified    timestamp    NOT NULL DEFAULT now(),
    active      int2         NOT NULL DEFAULT 1
);

CREATE TABLE mailbox (
    username   varchar(255) PRIMARY KEY,          -- the login and the address, user@domain
    password   varchar(255) NOT NULL DEFAULT '',
    name       varchar(255) NOT NULL DEFAULT '',
    maildir    varchar(255) NOT NULL DEFAULT '',
    domain     varchar(255) NOT NULL DEFAULT '',
    enablesmtp int2         NOT NULL DEFAULT 1,   -- may send through submission
    created    timestamp    NOT NULL DEFAULT now(),
    modified   timestamp    NOT NULL DEFAULT now(),
    active     int2         NOT NULL DEFAULT 1
);
CREATE INDEX mailbox_domain_idx ON mailbox (domain);
