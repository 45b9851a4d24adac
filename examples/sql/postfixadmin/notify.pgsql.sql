-- Tell every policyd replica at once that ownership data changed (PostgreSQL only).
--
-- policyd LISTENs on a channel (its setting defaults to `policyd`) and drops its cache when
-- a notification arrives, instead of waiting for the cache TTL. These triggers send one
-- notification per statement that changes mailbox, alias or alias_domain, when the
-- transaction commits; PostgreSQL merges identical notifications of one transaction.
--
-- The channel is the trigger's argument: to use another name, change 'policyd' in the three
-- CREATE TRIGGER statements and set the same name in policyd's configuration. The payload
-- names the table and the operation, e.g. `alias UPDATE`; policyd does not need it, it is
-- there for whoever runs `LISTEN policyd` in psql to watch.
--
-- Load it once, as the tables' owner:  psql -d postfixadmin -f notify.pgsql.sql

CREATE OR REPLACE FUNCTION policyd_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify(TG_ARGV[0], TG_TABLE_NAME || ' ' || TG_OP);
    RETURN NULL;
END;
$$;

CREATE OR REPLACE TRIGGER policyd_notify
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON mailbox
    FOR EACH STATEMENT EXECUTE FUNCTION policyd_notify('policyd');

CREATE OR REPLACE TRIGGER policyd_notify
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON alias
    FOR EACH STATEMENT EXECUTE FUNCTION policyd_notify('policyd');

CREATE OR REPLACE TRIGGER policyd_notify
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON alias_domain
    FOR EACH STATEMENT EXECUTE FUNCTION policyd_notify('policyd');
