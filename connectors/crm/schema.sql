-- CRM sample system (PostgreSQL database "crm"). Idempotent: run on every `accord stack up`.
CREATE TABLE IF NOT EXISTS public.customers (
    id               bigserial PRIMARY KEY,
    first_name       text,
    last_name        text,
    email            text,
    phone            text,
    company          text,
    segment          text,
    country          text,
    marketing_opt_in boolean NOT NULL DEFAULT false,
    updated_at       timestamptz NOT NULL DEFAULT now()
);
-- Full before-images on update and delete, so every change carries the whole old row.
ALTER TABLE public.customers REPLICA IDENTITY FULL;
-- The sink's adopt_by lookup before a create (connectors/README.md, "Sinks").
CREATE INDEX IF NOT EXISTS customers_email_adopt ON public.customers (lower(trim(email)));
-- Debezium's heartbeat.action.query writes here; the row travels through the slot, so
-- the slot's confirmed position moves on even while customers sees no change and other
-- databases on this server fill the WAL.
CREATE TABLE IF NOT EXISTS public.accord_heartbeat (
    id      int PRIMARY KEY,
    beat_at timestamptz NOT NULL
);
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = 'accord_crm') THEN
        CREATE PUBLICATION accord_crm FOR TABLE public.customers;
    END IF;
    IF NOT EXISTS (
        SELECT 1 FROM pg_publication_tables
        WHERE pubname = 'accord_crm' AND tablename = 'accord_heartbeat'
    ) THEN
        ALTER PUBLICATION accord_crm ADD TABLE public.accord_heartbeat;
    END IF;
END $$;
