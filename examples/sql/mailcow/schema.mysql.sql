-- The mailcow tables that policyd's example map reads, for MariaDB (mailcow runs MariaDB
-- only).
--
-- A real mailcow creates its own tables; this file is for trying policyd without one, and
-- for policyd's tests. `alias` and `sender_acl` have the columns mailcow's
-- mysql_virtual_sender_acl.cf relies on; `domain`, `mailbox` and `alias_domain` only the
-- ones that query and its senders_query read. `active` is 1 (active), 0 (disabled) or, for
-- a mailbox or an alias, 2 (receives but cannot log in).

CREATE TABLE domain (
    domain               varchar(255) NOT NULL,
    description          varchar(255) NOT NULL DEFAULT '',
    backupmx             tinyint(1)   NOT NULL DEFAULT 0,
    relay_all_recipients tinyint(1)   NOT NULL DEFAULT 0,
    created              datetime     NOT NULL DEFAULT CURRENT_TIMESTAMP,
    modified             datetime     NOT NULL DEFAULT CURRENT_TIMESTAMP,
    active               tinyint(1)   NOT NULL DEFAULT 1,
    PRIMARY KEY (domain)
) DEFAULT CHARSET = utf8mb4;

CREATE TABLE mailbox (
    username   varchar(255) NOT NULL,             -- the login and the address, user@domain
    password   varchar(255) NOT NULL DEFAULT '',
    name       varchar(255) NOT NULL DEFAULT '',
    local_part varchar(255) NOT NULL,
    domain     varchar(255) NOT NULL,
    kind       varchar(100) NOT NULL DEFAULT '',
    created    datetime     NOT NULL DEFAULT CURRENT_TIMESTAMP,
    modified   datetime     NOT NULL DEFAULT CURRENT_TIMESTAMP,
    active     tinyint(1)   NOT NULL DEFAULT 1,
    PRIMARY KEY (username),
    KEY domain (domain)
) DEFAULT CHARSET = utf8mb4;

-- `goto` is a comma-separated list; `@domain` as the address is a catch-all. Owners may
-- send as the address only where sender_allowed = 1.
CREATE TABLE alias (
    id             int          NOT NULL AUTO_INCREMENT,
    address        varchar(255) NOT NULL,
    goto           text         NOT NULL,
    domain         varchar(255) NOT NULL,
    sogo_visible   tinyint(1)   NOT NULL DEFAULT 1,
    internal       tinyint(1)   NOT NULL DEFAULT 0,
    sender_allowed tinyint(1)   NOT NULL DEFAULT 1,
    created        datetime     NOT NULL DEFAULT CURRENT_TIMESTAMP,
    modified       datetime     NOT NULL DEFAULT CURRENT_TIMESTAMP,
    active         tinyint(1)   NOT NULL DEFAULT 1,
    PRIMARY KEY (id),
    UNIQUE KEY address (address),
    KEY domain (domain)
) DEFAULT CHARSET = utf8mb4;

CREATE TABLE alias_domain (
    alias_domain  varchar(255) NOT NULL,
    target_domain varchar(255) NOT NULL,
    created       datetime     NOT NULL DEFAULT CURRENT_TIMESTAMP,
    modified      datetime     NOT NULL DEFAULT CURRENT_TIMESTAMP,
    active        tinyint(1)   NOT NULL DEFAULT 1,
    PRIMARY KEY (alias_domain),
    KEY target_domain (target_domain)
) DEFAULT CHARSET = utf8mb4;

-- logged_in_as may send as send_as: an address, `@domain` (any address there) or `*`
-- (anything). external = 1 marks a send_as outside this server's domains.
CREATE TABLE sender_acl (
    id           int          NOT NULL AUTO_INCREMENT,
    logged_in_as varchar(255) NOT NULL,
    send_as      varchar(255) NOT NULL,
    external     tinyint(1)   NOT NULL DEFAULT 0,
    PRIMARY KEY (id),
    KEY send_as (send_as)
) DEFAULT CHARSET = utf8mb4;
