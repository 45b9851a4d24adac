-- Test data for the iRedMail schema (examples/sql/iredmail/schema.*.sql); the same file
-- loads into PostgreSQL and MariaDB.
--
-- What each row is for, and what examples/sql/iredmail/sender_login_maps.*.cf answers, is
-- in iredmail-owners.tsv.

INSERT INTO domain (domain, backupmx, active) VALUES
    ('ir.test',        0, 1),
    ('backup.ir.test', 1, 1),
    ('off.ir.test',    0, 0);

INSERT INTO mailbox (username, name, domain, enablesmtp, active) VALUES
    ('alice@ir.test',        'Alice',           'ir.test',        1, 1),
    ('bob@ir.test',          'Bob (no SMTP)',   'ir.test',        0, 1),
    ('carol@ir.test',        'Carol (left)',    'ir.test',        1, 0),
    ('o''hara@ir.test',      'O''Hara',         'ir.test',        1, 1),
    ('legacy%host@ir.test',  'Percent hack',    'ir.test',        1, 1),
    ('dave@backup.ir.test',  'Dave',            'backup.ir.test', 1, 1),
    ('erin@off.ir.test',     'Erin',            'off.ir.test',    1, 1);
