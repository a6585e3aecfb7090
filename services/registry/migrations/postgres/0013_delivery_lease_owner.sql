-- Who holds a delivery's lease: a random token written by each claim, with the lease set on
-- the database's clock. Outcomes and releases of a claimed row match it, so a dispatcher whose
-- lease ran out and was taken by another claim records nothing over the new holder's.
ALTER TABLE deliveries ADD COLUMN lease_owner TEXT;
