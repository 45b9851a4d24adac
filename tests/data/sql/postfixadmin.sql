-- Test data for the postfixadmin schema (examples/sql/postfixadmin/schema.*.sql); the same
-- file loads into PostgreSQL, MariaDB and SQLite. MariaDB loads it with
-- NO_BACKSLASH_ESCAPES, so a backslash is a plain character in all three.
--
-- What each row is for, and what examples/sql/postfixadmin/sender_login_maps.*.cf answers,
-- is in postfixadmin-owners.tsv.

INSERT INTO mailbox (username, name, maildir, local_part, domain, active) VALUES
    ('alice@example.com',        'Alice',        'example.com/alice/',    'alice',        'example.com', '1'),
    ('bob@example.com',          'Bob',          'example.com/bob/',      'bob',          'example.com', '1'),
    ('carol@example.com',        'Carol (left)', 'example.com/carol/',    'carol',        'example.com', '0'),
    ('o''brien@example.com',     'O''Brien',     'example.com/obrien/',   'o''brien',     'example.com', '1'),
    ('legacy%host@example.com',  'Percent hack', 'example.com/legacy/',   'legacy%host',  'example.com', '1'),
    ('back\slash@example.com',   'Backslash',    'example.com/bslash/',   'back\slash',   'example.com', '1'),
    ('dave@other.test',          'Dave',         'other.test/dave/',      'dave',         'other.test',  '1');

INSERT INTO alias (address, goto, domain, active) VALUES
    -- postfixadmin's own row for each mailbox, disabled with it
    ('alice@example.com',        'alice@example.com',                 'example.com', '1'),
    ('bob@example.com',          'bob@example.com',                   'example.com', '1'),
    ('carol@example.com',        'carol@example.com',                 'example.com', '0'),
    ('o''brien@example.com',     'o''brien@example.com',              'example.com', '1'),
    ('legacy%host@example.com',  'legacy%host@example.com',           'example.com', '1'),
    ('back\slash@example.com',   'back\slash@example.com',            'example.com', '1'),
    ('dave@other.test',          'dave@other.test',                   'other.test',  '1'),
    -- comma lists, as postfixadmin writes them and as an admin might edit them
    ('info@example.com',         'alice@example.com,bob@example.com', 'example.com', '1'),
    ('sales@example.com',        'bob@example.com, dave@other.test',  'example.com', '1'),
    ('old@example.com',          'alice@example.com',                 'example.com', '0'),
    ('o''reilly@example.com',    'o''brien@example.com',              'example.com', '1'),
    -- a catch-all: the `@domain` key
    ('@other.test',              'dave@other.test',                   'other.test',  '1');

INSERT INTO alias_domain (alias_domain, target_domain, active) VALUES
    ('example.org', 'example.com', '1'),
    ('parked.test', 'example.com', '0');
