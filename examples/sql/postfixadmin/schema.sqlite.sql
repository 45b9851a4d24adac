-- The postfixadmin tables that policyd's example maps read, for SQLite.
--
-- A real postfixadmin creates its own tables (setup.php); this file is for trying policyd
-- without one, and for policyd's tests. It has the columns postfixadmin documents in
-- DOCUMENTS/POSTFIX_CONF.txt. `active` is an integer, 1 or 0.

CREATE TABLE mailbox (
    username   TEXT    NOT NULL PRIMARY KEY,      -- the login and the address, user@domain
    password   TEXT    NOT NULL DEFAULT '',
    name       TEXT    NOT NULL DEFAULT '',
    maildir    TEXT    NOT NULL DEFAULT '',
    quota      INTEGER NOT NULL DEFAULT 0,
    local_part TEXT    NOT NULL,
    domain     TEXT    NOT NULL,
    created    TEXT    NOT NULL DEFAULT CURRENT_TIMESTAMP,
    modified   TEXT    NOT NULL DEFAULT CURRENT_TIMESTAMP,
    active     INTEGER NOT NULL DEFAULT 1
);
CREATE INDEX mailbox_domain_idx ON mailbox (domain);

-- `goto` is a comma-separated list of destinations. postfixadmin adds a row address = goto
-- for every mailbox, and `@domain` as the address is a catch-all.
CREATE TABLE alias (
    address  TEXT    NOT NULL PRIMARY KEY,
    goto     TEXT    NOT NULL,
    domain   TEXT    NOT NULL,
    created  TEXT    NOT NULL DEFAULT CURRENT_TIMESTAMP,
    modified TEXT    NOT NULL DEFAULT CURRENT_TIMESTAMP,
    active   INTEGER NOT NULL DEFAULT 1
);
CREATE INDEX alias_domain_idx ON alias (domain);

-- Every address user@alias_domain is user@target_domain.
CREATE TABLE alias_domain (
    alias_domain  TEXT    NOT NULL PRIMARY KEY,
    target_domain TEXT    NOT NULL,
    created       TEXT    NOT NULL DEFAULT CURRENT_TIMESTAMP,
    modified      TEXT    NOT NULL DEFAULT CURRENT_TIMESTAMP,
    active        INTEGER NOT NULL DEFAULT 1
);
CREATE INDEX alias_domain_target_idx ON alias_domain (target_domain);
