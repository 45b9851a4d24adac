-- The postfixadmin tables that policyd's example maps read, for PostgreSQL.
--
-- A real postfixadmin creates its own tables (setup.php); this file is for trying policyd
-- without one, and for policyd's tests. It has the columns postfixadmin documents in
-- DOCUMENTS/POSTFIX_CONF.txt, with PostgreSQL types: there `active` is a boolean, so the
-- queries say `active = true` where the MySQL ones say `active = '1'`.

CREATE TABLE mailbox (
    username   varchar(255) PRIMARY KEY,          -- the login and the address, user@domain
    password   varchar(255) NOT NULL DEFAULT '',
    name       varchar(255) NOT NULL DEFAULT '',
    maildir    varchar(255) NOT NULL DEFAULT '',
    quota      bigint       NOT NULL DEFAULT 0,
    local_part varchar(255) NOT NULL,
    domain     varchar(255) NOT NULL,
    created    timestamptz  NOT NULL DEFAULT now(),
    modified   timestamptz  NOT NULL DEFAULT now(),
    active     boolean      NOT NULL DEFAULT true
);
CREATE INDEX mailbox_domain_idx ON mailbox (domain);

-- `goto` is a comma-separated list of destinations. postfixadmin adds a row address = goto
-- for every mailbox, and `@domain` as the address is a catch-all.
CREATE TABLE alias (
    address  varchar(255) PRIMARY KEY,
    goto     text         NOT NULL,
    domain   varchar(255) NOT NULL,
    created  timestamptz  NOT NULL DEFAULT now(),
    modified timestamptz  NOT NULL DEFAULT now(),
    active   boolean      NOT NULL DEFAULT true
);
CREATE INDEX alias_domain_idx ON alias (domain);

-- Every address user@alias_domain is user@target_domain.
CREATE TABLE alias_domain (
    alias_domain  varchar(255) PRIMARY KEY,
    target_domain varchar(255) NOT NULL,
    created       timestamptz  NOT NULL DEFAULT now(),
    modified      timestamptz  NOT NULL DEFAULT now(),
    active        boolean      NOT NULL DEFAULT true
);
CREATE INDEX alias_domain_target_idx ON alias_domain (target_domain);
