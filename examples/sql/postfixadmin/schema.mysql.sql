-- The postfixadmin tables that policyd's example maps read, for MySQL and MariaDB.
--
-- A real postfixadmin creates its own tables (setup.php); this file is for trying policyd
-- without one, and for policyd's tests. It has the columns postfixadmin documents in
-- DOCUMENTS/POSTFIX_CONF.txt. `active` is tinyint(1): the queries say `active = '1'`.
--
-- The default collation compares case-insensitively and ignores trailing spaces, as on a
-- real install: 'Alice@Example.com ' = 'alice@example.com' is true here, and false in
-- PostgreSQL and SQLite.

CREATE TABLE mailbox (
    username   varchar(255) NOT NULL,             -- the login and the address, user@domain
    password   varchar(255) NOT NULL DEFAULT '',
    name       varchar(255) NOT NULL DEFAULT '',
    maildir    varchar(255) NOT NULL DEFAULT '',
    quota      bigint       NOT NULL DEFAULT 0,
    local_part varchar(255) NOT NULL,
    domain     varchar(255) NOT NULL,
    created    datetime     NOT NULL DEFAULT CURRENT_TIMESTAMP,
    modified   datetime     NOT NULL DEFAULT CURRENT_TIMESTAMP,
    active     tinyint(1)   NOT NULL DEFAULT 1,
    PRIMARY KEY (username),
    KEY domain (domain)
) DEFAULT CHARSET = utf8mb4;

-- `goto` is a comma-separated list of destinations. postfixadmin adds a row address = goto
-- for every mailbox, and `@domain` as the address is a catch-all.
CREATE TABLE alias (
    address  varchar(255) NOT NULL,
    goto     text         NOT NULL,
    domain   varchar(255) NOT NULL,
    created  datetime     NOT NULL DEFAULT CURRENT_TIMESTAMP,
    modified datetime     NOT NULL DEFAULT CURRENT_TIMESTAMP,
    active   tinyint(1)   NOT NULL DEFAULT 1,
    PRIMARY KEY (address),
    KEY domain (domain)
) DEFAULT CHARSET = utf8mb4;

-- Every address user@alias_domain is user@target_domain.
CREATE TABLE alias_domain (
    alias_domain  varchar(255) NOT NULL,
    target_domain varchar(255) NOT NULL,
    created       datetime     NOT NULL DEFAULT CURRENT_TIMESTAMP,
    modified      datetime     NOT NULL DEFAULT CURRENT_TIMESTAMP,
    active        tinyint(1)   NOT NULL DEFAULT 1,
    PRIMARY KEY (alias_domain),
    KEY target_domain (target_domain)
) DEFAULT CHARSET = utf8mb4;
