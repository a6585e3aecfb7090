-- Runs once, when the `postgres` volume of docker-compose.yml is first created (as the
-- POSTGRES_USER, in the POSTGRES_DB `registry`): the processor's store and the second
-- controller's registry's are more databases on the same server. Each service creates its tables itself (migrations run at start).
-- The services connect as POSTGRES_USER, which owns these databases. A plain login role
-- would need `GRANT USAGE, CREATE ON SCHEMA public TO <role>` in its database (PostgreSQL 15
-- and later no longer grant CREATE on `public` to every role).
CREATE DATABASE processor;
-- The second controller's registry (`registry-retailer`).
CREATE DATABASE registry_retailer;
