-- The Modoboa tables that policyd's example map reads, for MySQL and MariaDB (Modoboa's own
-- database, made by its Django migrations).
--
-- A real Modoboa creates its own tables; this file is for trying policyd without one, and for
-- policyd's tests. It has only the columns the sender-login queries read (query and
-- senders_query), with the names Django gives them. A user logs in with core_user.email;
-- admin_mailbox.address is the local part of the mailbox, in the domain
-- admin_mailbox.domain_id.

CREATE TABLE core_user (
    id        int          NOT NULL AUTO_INCREMENT PRIMARY KEY,
    username  varchar(254) NOT NULL UNIQUE,
    email     varchar(254) NOT NULL,
    password  varchar(256) NOT NULL DEFAULT '',
    is_active tinyint(1)   NOT NULL DEFAULT 1
) DEFAULT CHARSET = utf8mb4;
CREATE INDEX core_user_email_idx ON core_user (email);

CREATE TABLE admin_domain (
    id      int          NOT NULL AUTO_INCREMENT PRIMARY KEY,
    name    varchar(100) NOT NULL UNIQUE,
    enabled tinyint(1)   NOT NULL DEFAULT 1
) DEFAULT CHARSET = utf8mb4;

-- Every address local@name is local@(the target domain).
CREATE TABLE admin_domainalias (
    id        int          NOT NULL AUTO_INCREMENT PRIMARY KEY,
    name      varchar(100) NOT NULL UNIQUE,
    target_id integer      NOT NULL REFERENCES admin_domain (id),
    enabled   tinyint(1)   NOT NULL DEFAULT 1
) DEFAULT CHARSET = utf8mb4;

CREATE TABLE admin_mailbox (
    id        int          NOT NULL AUTO_INCREMENT PRIMARY KEY,
    address   varchar(252) NOT NULL,              -- the local part
    domain_id integer      NOT NULL REFERENCES admin_domain (id),
    user_id   integer      NOT NULL UNIQUE REFERENCES core_user (id)
) DEFAULT CHARSET = utf8mb4;

-- More addresses a mailbox may send as: an address, or @domain for every address there.
CREATE TABLE admin_senderaddress (
    id         int          NOT NULL AUTO_INCREMENT PRIMARY KEY,
    address    varchar(254) NOT NULL,
    mailbox_id integer      NOT NULL REFERENCES admin_mailbox (id)
) DEFAULT CHARSET = utf8mb4;
CREATE INDEX admin_senderaddress_address_idx ON admin_senderaddress (address);

CREATE TABLE admin_alias (
    id        int          NOT NULL AUTO_INCREMENT PRIMARY KEY,
    address   varchar(254) NOT NULL UNIQUE,
    domain_id integer      REFERENCES admin_domain (id),
    enabled   tinyint(1)   NOT NULL DEFAULT 1,
    internal  tinyint(1)   NOT NULL DEFAULT 0
) DEFAULT CHARSET = utf8mb4;

-- An alias's recipients, one row each: a mailbox of this server (r_mailbox_id) or any
-- other address.
CREATE TABLE admin_aliasrecipient (
    id           int          NOT NULL AUTO_INCREMENT PRIMARY KEY,
    address      varchar(254) NOT NULL,
    alias_id     integer      NOT NULL REFERENCES admin_alias (id),
    r_mailbox_id integer      REFERENCES admin_mailbox (id),
    r_alias_id   integer      REFERENCES admin_alias (id)
) DEFAULT CHARSET = utf8mb4;
