-- Support sample system (PostgreSQL database "support"). Idempotent.
CREATE TABLE IF NOT EXISTS public.users (
    id           uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    email        text,
    display_name text,
    phone        text,
    tier         text,
    locale       text,
    updated_at   timestamptz NOT NULL DEFAULT now()
);
ALTER TABLE public.users REPLICA IDENTITY FULL;
-- The sink's adopt_by lookup before a create (connectors/README.md, "Sinks").
CREATE INDEX IF NOT EXISTS users_email_adopt ON public.users (lower(trim(email)));
-- Debezium's heartbeat.action.query writes here; the row travels through the slot, so
-- the slot's confirmed position moves on even while users sees no change and other
-- databases on this server fill the WAL.
CREATE TABLE IF NOT EXISTS public.accord_heartbeat (
    id      int PRIMARY KEY,
    beat_at timestamptz NOT NULL
);
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = 'accord_support') THEN
        CREATE PUBLICATION accord_support FOR TABLE public.users;
    END IF;
    IF NOT EXISTS (
        SELECT 1 FROM pg_publication_tables
        WHERE pubname = 'accord_support' AND tablename = 'accord_heartbeat'
    ) THEN
        ALTER PUBLICATION accord_support ADD TABLE public.accord_heartbeat;
    END IF;
END $$;
