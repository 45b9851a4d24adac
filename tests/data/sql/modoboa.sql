-- Test data for the Modoboa schema (examples/sql/modoboa/schema.*.sql); the same file loads
-- into PostgreSQL and MariaDB (ids are given, so the rows refer to each other the same way).
--
-- What each row is for, and what examples/sql/modoboa/sender_login_maps.*.cf answers, is in
-- modoboa-owners.tsv.

INSERT INTO admin_domain (id, name, enabled) VALUES
    (1, 'mb.test', true);

INSERT INTO admin_domainalias (id, name, target_id, enabled) VALUES
    (1, 'alias.mb.test',  1, true),
    (2, 'parked.mb.test', 1, false);

INSERT INTO core_user (id, username, email, is_active) VALUES
    (1, 'alice@mb.test',   'alice@mb.test',   true),
    (2, 'bob@mb.test',     'bob@mb.test',     true),
    (3, 'carol@mb.test',   'carol@mb.test',   false),
    (4, 'o''neil@mb.test', 'o''neil@mb.test', true);

INSERT INTO admin_mailbox (id, address, domain_id, user_id) VALUES
    (1, 'alice',   1, 1),
    (2, 'bob',     1, 2),
    (3, 'carol',   1, 3),
    (4, 'o''neil', 1, 4);

INSERT INTO admin_senderaddress (id, address, mailbox_id) VALUES
    -- alice may also send as an outside address; bob as anything at partner.test
    (1, 'alice.smith@elsewhere.test', 1),
    (2, '@partner.test',              2),
    (3, 'legacy%host@elsewhere.test', 4),
    (4, 'carol@elsewhere.test',       3);

INSERT INTO admin_alias (id, address, domain_id, enabled) VALUES
    (1, 'sales@mb.test', 1, true),
    (2, 'old@mb.test',   1, false),
    (3, 'team@mb.test',  1, true);

INSERT INTO admin_aliasrecipient (id, address, alias_id, r_mailbox_id) VALUES
    -- one row per recipient; an outside recipient has no mailbox
    (1, 'alice@mb.test',        1, 1),
    (2, 'bob@mb.test',          1, 2),
    (3, 'alice@mb.test',        2, 1),
    (4, 'carol@mb.test',        3, 3),
    (5, 'someone@outside.test', 3, NULL);
