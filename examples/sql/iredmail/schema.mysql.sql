-- The iRedMail tables that policyd's example map reads, for MySQL and MariaDB (iRedMail's
-- `vmail` database).
--
-- A real iRedMail creates its own tables; this file is for trying policyd without one, and for
-- policyd's tests. It has only the columns the sender-login queries read (query and
-- senders_query), with iRedMail's names and types. A mailbox may send only while it, its
-- enablesmtp flag and its domain are active, and the domain is not a backup MX.

CREATE TABLE domain (
    domain      varchar(255) NOT NULL,
    description text,
    backupmx    tinyint(1)   NOT NULL DEFAULT 0,
    created     datetime     NOT NULL DEFAULT '1970-01-01 01:01:01',
    modified    datetime     NOT NULL DEFAULT '1970-01-01 01:01:01',
    active      tinyint(1)   NOT NULL DEFAULT 1,
    PRIMARY KEY (domain),
    KEY backupmx (backupmx),
    KEY active (active)
) DEFAULT CHARSET = utf8mb4;

CREATE TABLE mailbox (
    username   varchar(255) NOT NULL,             -- the login and the address, user@domain
    password   varchar(255) NOT NULL DEFAULT '',
    name       varchar(255) NOT NULL DEFAULT '',
    maildir    varchar(255) NOT NULL DEFAULT '',
    domain     varchar(255) NOT NULL DEFAULT '',
    enablesmtp tinyint(1)   NOT NULL DEFAULT 1,   -- may send through submission
    created    datetime     NOT NULL DEFAULT '1970-01-01 01:01:01',
    modified   datetime     NOT NULL DEFAULT '1970-01-01 01:01:01',
    active     tinyint(1)   NOT NULL DEFAULT 1,
    PRIMARY KEY (username),
    KEY domain (domain),
    KEY enablesmtp (enablesmtp),
    KEY active (active)
) DEFAULT CHARSET = utf8mb4;
