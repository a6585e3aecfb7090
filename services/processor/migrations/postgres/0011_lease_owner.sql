-- Who holds a task's lease: a random token written by each claim. Renewals, transitions and
-- postponements of a claimed task match it, so a runner whose lease ran out and was taken by
-- another claim can neither extend it nor record its step's outcome over the new holder's.
ALTER TABLE tasks ADD COLUMN lease_owner TEXT;
