-- When the expiry sweep's last deletion of a package's files ran, after it recorded the
-- package expired. That second deletion catches a file an upload registered before the
-- expiry created after the first one; a crash before it left such a file for good, since
-- the sweep looked only at packages not yet recorded expired. It now also takes those whose
-- last deletion is not recorded.
ALTER TABLE packages ADD COLUMN files_removed_at BIGINT;
-- Packages expired before this column existed count as done: the sweep would otherwise run
-- them all again, a hundred a sweep, ahead of the packages due now.
UPDATE packages SET files_removed_at = expired_at WHERE expired_at IS NOT NULL;
