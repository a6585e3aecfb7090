-- Runs once after the sample accounting data (10-accounting.sql), when the `accounting`
-- volume of docker-compose.yml is first created: the second controller's books, the same
-- sample rows in a database of their own (`accounting_retailer`), which the processor's
-- accounting subprocessor scopes to the controller `retailer` (deploy/processor.toml).
CREATE DATABASE accounting_retailer;
\connect accounting_retailer
\i /docker-entrypoint-initdb.d/10-accounting.sql
