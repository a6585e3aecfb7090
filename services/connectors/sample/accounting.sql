-- A small accounting (kirjanpito) database for demonstrations and tests of the SQL connector.
--
-- Valid in both SQLite and PostgreSQL: only INTEGER/BIGINT and TEXT columns, explicit ids
-- (no AUTOINCREMENT or SERIAL), dates as ISO 8601 text. The loader splits this file on
-- semicolons, so comments and values must not contain one.
--
-- Invoices copy the customer's name and e-mail, as issued invoices do: the copy is what the
-- erasure rules anonymize, because the bookkeeping act requires keeping the invoice itself.
-- The subject used in the tests is Maija Meikalainen (customer 1, C-1001). Her e-mail is
-- stored in mixed case on purpose, to show that e-mail matching ignores case.

CREATE TABLE customers (
    id          BIGINT PRIMARY KEY,
    customer_no TEXT NOT NULL UNIQUE,
    name        TEXT NOT NULL,
    email       TEXT,
    phone       TEXT,
    national_id TEXT,
    address     TEXT
);

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

CREATE INDEX invoices_customer_id ON invoices (customer_id);
CREATE INDEX contacts_customer_id ON contacts (customer_id);

INSERT INTO customers (id, customer_no, name, email, phone, national_id, address) VALUES
    (1, 'C-1001', 'Maija Meikäläinen', 'Maija.Meikalainen@Example.fi', '+358401234567', '150585-912K', 'Mannerheimintie 12 A 3, 00100 Helsinki'),
    (2, 'C-1002', 'Matti Virtanen', 'matti.virtanen@example.fi', '+358501112233', '020379-934N', 'Hämeenkatu 5, 33100 Tampere'),
    (3, 'C-1003', 'Liisa Korhonen', 'liisa.korhonen@example.com', '+358449876543', '231190-956P', 'Aurakatu 8 B 12, 20100 Turku'),
    (4, 'C-1004', 'Esimerkki Oy', 'laskutus@esimerkki.example.fi', '+35892345678', NULL, 'Kauppakatu 2, 40100 Jyväskylä'),
    (5, 'C-1005', 'Maija Meikäläinen', 'maija.meikalainen@example.com', NULL, '010101-998Y', 'Rantakatu 1, 90100 Oulu');

INSERT INTO invoices (id, customer_id, customer_name, customer_email, amount_cents, issued_on, status) VALUES
    (101, 1, 'Maija Meikäläinen', 'Maija.Meikalainen@Example.fi', 12400, '2024-01-15', 'paid'),
    (102, 1, 'Maija Meikäläinen', 'Maija.Meikalainen@Example.fi', 8990, '2024-03-02', 'paid'),
    (103, 1, 'Maija Meikäläinen', 'Maija.Meikalainen@Example.fi', 45000, '2024-06-30', 'open'),
    (104, 2, 'Matti Virtanen', 'matti.virtanen@example.fi', 2500, '2024-02-10', 'paid'),
    (105, 2, 'Matti Virtanen', 'matti.virtanen@example.fi', 17850, '2024-05-20', 'overdue'),
    (106, 3, 'Liisa Korhonen', 'liisa.korhonen@example.com', 990, '2024-04-01', 'paid'),
    (107, 4, 'Esimerkki Oy', 'laskutus@esimerkki.example.fi', 250000, '2024-03-31', 'paid'),
    (108, 5, 'Maija Meikäläinen', 'maija.meikalainen@example.com', 3300, '2024-07-07', 'open');

INSERT INTO contacts (id, customer_id, name, email, phone) VALUES
    (201, 1, 'Maija Meikäläinen', 'maija.meikalainen@example.fi', '+358401234567'),
    (202, 1, 'Pekka Meikäläinen', 'pekka.meikalainen@example.fi', '+358407654321'),
    (203, 2, 'Matti Virtanen', 'matti.virtanen@example.fi', '+358501112233'),
    (204, 4, 'Anna Laskuttaja', 'anna@esimerkki.example.fi', '+358403334444'),
    (205, 4, 'Ville Kirjanpitäjä', 'ville@esimerkki.example.fi', NULL);
