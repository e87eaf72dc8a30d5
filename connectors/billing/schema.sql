-- Billing sample system (MariaDB database "billing"). Idempotent; statements split on ';'.
CREATE TABLE IF NOT EXISTS accounts (
    account_no          varchar(32) NOT NULL PRIMARY KEY,
    legal_name          varchar(255),
    contact_email       varchar(255),
    phone               varchar(64),
    tax_id              varchar(64),
    billing_street      varchar(255),
    billing_city        varchar(128),
    billing_postal_code varchar(32),
    billing_country     varchar(64),
    currency            char(3),
    payment_terms       varchar(32),
    credit_limit        decimal(12,2),
    status              enum('active','suspended','closed') NOT NULL DEFAULT 'active',
    updated_at          timestamp(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6) ON UPDATE CURRENT_TIMESTAMP(6)
) ENGINE=InnoDB
