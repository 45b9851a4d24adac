-- Test data for the mailcow schema (examples/sql/mailcow/schema.mysql.sql).
--
-- What each row is for, and what examples/sql/mailcow/sender_login_maps.mysql.cf answers,
-- is in mailcow-owners.tsv.

INSERT INTO domain (domain, active) VALUES
    ('mc.test', '1'),
    ('catch.mc.test', '1'),
    ('off.mc.test', '0');

INSERT INTO alias_domain (alias_domain, target_domain, active) VALUES
    ('alias.mc.test', 'mc.test', '1'),
    ('parked.mc.test', 'mc.test', '0');

INSERT INTO mailbox (username, name, local_part, domain, active) VALUES
    ('alice@mc.test',     'Alice',        'alice',    'mc.test', '1'),
    ('bob@mc.test',       'Bob',          'bob',      'mc.test', '1'),
    ('carol@mc.test',     'Carol (left)', 'carol',    'mc.test', '0'),
    ('relay@mc.test',     'Relay',        'relay',    'mc.test', '1'),
    ('o''brien@mc.test',  'O''Brien',     'o''brien', 'mc.test', '1'),
    ('erin@off.mc.test',  'Erin',         'erin',     'off.mc.test', '1');

INSERT INTO alias (address, goto, domain, sender_allowed, active) VALUES
    -- mailcow's own row for each mailbox
    ('alice@mc.test',     'alice@mc.test',               'mc.test',       '1', '1'),
    ('bob@mc.test',       'bob@mc.test',                 'mc.test',       '1', '1'),
    ('carol@mc.test',     'carol@mc.test',               'mc.test',       '1', '0'),
    ('relay@mc.test',     'relay@mc.test',               'mc.test',       '1', '1'),
    ('o''brien@mc.test',  'o''brien@mc.test',            'mc.test',       '1', '1'),
    ('erin@off.mc.test',  'erin@off.mc.test',            'off.mc.test',   '1', '1'),
    -- a comma list; an alias its owners receive for but may not send as; a disabled one
    ('info@mc.test',      'alice@mc.test,bob@mc.test',   'mc.test',       '1', '1'),
    ('noreply@mc.test',   'bob@mc.test',                 'mc.test',       '0', '1'),
    ('old@mc.test',       'alice@mc.test',               'mc.test',       '1', '0'),
    -- a catch-all
    ('@catch.mc.test',    'alice@mc.test',               'catch.mc.test', '1', '1');

INSERT INTO sender_acl (logged_in_as, send_as, external) VALUES
    ('bob@mc.test',       'alice@mc.test',           '0'),
    ('alice@mc.test',     '@partner.test',           '1'),
    ('bob@mc.test',       'legacy%host@mc.test',     '0'),
    ('o''brien@mc.test',  'o''reilly@partner.test',  '1'),
    ('relay@mc.test',     '*',                       '0');
