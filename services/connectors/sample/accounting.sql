-- A small accounting (kirjanpito) database for demonstrations and tests of the SQL connector.
--
-- Valid in both SQLite and PostgreSQL: only INTEGER/BIGINT and TEXT columns, explicit ids
-- (no AUTOINCREMENT or SERIAL), dates as ISO 8601 text. The loader splits this file on
-- semicolons, so comments and values must not contain one.
--
-- Invoices copy the customer's name and e-mail, as issued invoices do. The Accounting Act keeps
-- invoices (vouchers) six years and ledger entries (books) ten years after the end of the fiscal
-- year (the calendar year here), and an open invoice or one in debt collection is kept while it
-- is open. The erasure rules keep such rows and anonymize what the obligation does not need.
--
-- The subject used in the tests is Maija Meikalainen (customer 1, C-1001). Her e-mail is
-- stored in mixed case on purpose, to show that e-mail matching ignores case. Her rows are
-- chosen so that an erasure in 2026 to 2030 meets every case:
--   invoice 101 (2015, paid)   past its six years (2021-12-31): deleted at once
--   invoice 102 (2024, paid)   kept until the end of 2030-12-31
--   invoice 103 (2025, open)   kept until the end of 2031-12-31, and longer while still open
--   ledger 301 (2015)          past its ten years (2025-12-31): anonymized at once
--   ledger 302 (2024)          kept until the end of 2034-12-31
-- Customer 5 is her namesake with another address: someone else.
-- Customer 6, Teemu Testaaja (C-1006), has only records past every retention period, so an
-- erasure of him completes at once (the end-to-end tests use him for the plain path).

CREATE TABLE customers (
    id                    BIGINT PRIMARY KEY,
    customer_no           TEXT NOT NULL UNIQUE,
    name                  TEXT NOT NULL,
    email                 TEXT,
    phone                 TEXT,
    national_id           TEXT,
    address               TEXT,
    processing_restricted INTEGER NOT NULL DEFAULT 0,
    marketing_opt_out     INTEGER NOT NULL DEFAULT 0
);

-- status: 'paid', 'open' or 'collection' (handed to debt collection).
CREATE TABLE invoices (
    id             BIGINT PRIMARY KEY,
    customer_id    BIGINT REFERENCES customers (id),
    customer_name  TEXT,
    customer_email TEXT,
    amount_cents   BIGINT NOT NULL,
    issued_on      TEXT NOT NULL,
    status         TEXT NOT NULL
);

CREATE TABLE contacts (
    id          BIGINT PRIMARY KEY,
    customer_id BIGINT NOT NULL REFERENCES customers (id),
    name        TEXT NOT NULL,
    email       TEXT,
    phone       TEXT
);

-- The books: one entry per posting that concerns a customer.
CREATE TABLE ledger_entries (
    id           BIGINT PRIMARY KEY,
    customer_id  BIGINT REFERENCES customers (id),
    booked_on    TEXT NOT NULL,
    account      TEXT NOT NULL,
    amount_cents BIGINT NOT NULL,
    description  TEXT NOT NULL
);

CREATE INDEX invoices_customer_id ON invoices (customer_id);
CREATE INDEX contacts_customer_id ON contacts (customer_id);
CREATE INDEX ledger_entries_customer_id ON ledger_entries (customer_id);

INSERT INTO customers (id, customer_no, name, email, phone, national_id, address) VALUES
    (1, 'C-1001', 'Maija Meikäläinen', 'Maija.Meikalainen@Example.fi', '+358401234567', '150585-912K', 'Mannerheimintie 12 A 3, 00100 Helsinki'),
    (2, 'C-1002', 'Matti Virtanen', 'matti.virtanen@example.fi', '+358501112233', '020379-934N', 'Hämeenkatu 5, 33100 Tampere'),
    (3, 'C-1003', 'Liisa Korhonen', 'liisa.korhonen@example.com', '+358449876543', '231190-956P', 'Aurakatu 8 B 12, 20100 Turku'),
    (4, 'C-1004', 'Esimerkki Oy', 'laskutus@esimerkki.example.fi', '+35892345678', NULL, 'Kauppakatu 2, 40100 Jyväskylä'),
    (5, 'C-1005', 'Maija Meikäläinen', 'maija.meikalainen@example.com', NULL, '010101-998Y', 'Rantakatu 1, 90100 Oulu'),
    (6, 'C-1006', 'Teemu Testaaja', 'teemu.testaaja@example.fi', '+358405556666', '111280-917A', 'Kirkkokatu 3, 65100 Vaasa');

INSERT INTO invoices (id, customer_id, customer_name, customer_email, amount_cents, issued_on, status) VALUES
    (101, 1, 'Maija Meikäläinen', 'Maija.Meikalainen@Example.fi', 12400, '2015-03-10', 'paid'),
    (102, 1, 'Maija Meikäläinen', 'Maija.Meikalainen@Example.fi', 8990, '2024-03-02', 'paid'),
    (103, 1, 'Maija Meikäläinen', 'Maija.Meikalainen@Example.fi', 45000, '2025-06-30', 'open'),
    (104, 2, 'Matti Virtanen', 'matti.virtanen@example.fi', 2500, '2024-02-10', 'paid'),
    (105, 2, 'Matti Virtanen', 'matti.virtanen@example.fi', 17850, '2024-05-20', 'collection'),
    (106, 3, 'Liisa Korhonen', 'liisa.korhonen@example.com', 990, '2024-04-01', 'paid'),
    (107, 4, 'Esimerkki Oy', 'laskutus@esimerkki.example.fi', 250000, '2024-03-31', 'paid'),
    (108, 5, 'Maija Meikäläinen', 'maija.meikalainen@example.com', 3300, '2024-07-07', 'open'),
    (109, 6, 'Teemu Testaaja', 'teemu.testaaja@example.fi', 5600, '2014-09-15', 'paid');

INSERT INTO contacts (id, customer_id, name, email, phone) VALUES
    (201, 1, 'Maija Meikäläinen', 'maija.meikalainen@example.fi', '+358401234567'),
    (202, 1, 'Pekka Meikäläinen', 'pekka.meikalainen@example.fi', '+358407654321'),
    (203, 2, 'Matti Virtanen', 'matti.virtanen@example.fi', '+358501112233'),
    (204, 4, 'Anna Laskuttaja', 'anna@esimerkki.example.fi', '+358403334444'),
    (205, 4, 'Ville Kirjanpitäjä', 'ville@esimerkki.example.fi', NULL),
    (206, 6, 'Teemu Testaaja', 'teemu.testaaja@example.fi', '+358405556666');

INSERT INTO ledger_entries (id, customer_id, booked_on, account, amount_cents, description) VALUES
    (301, 1, '2015-03-10', '3000', 12400, 'Myynti, lasku 101, Maija Meikäläinen'),
    (302, 1, '2024-03-02', '3000', 8990, 'Myynti, lasku 102, Maija Meikäläinen'),
    (303, 2, '2024-02-10', '3000', 2500, 'Myynti, lasku 104, Matti Virtanen'),
    (304, 4, '2024-03-31', '3000', 250000, 'Myynti, lasku 107, Esimerkki Oy'),
    (305, 6, '2014-09-15', '3000', 5600, 'Myynti, lasku 109, Teemu Testaaja');
