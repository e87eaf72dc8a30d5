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
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = 'accord_support') THEN
        CREATE PUBLICATION accord_support FOR TABLE public.users;
    END IF;
END $$;
