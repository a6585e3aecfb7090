-- When the expiry sweep's last deletion of a package's files ran, after it recorded the
-- package expired. That second deletion catches a file an upload registered before the
-- expiry created after the first one; a crash before it left such a file for good, since
-- the sweep looked only at packages not yet recorded expired. It now also takes those whose
-- last deletion is not recorded.
ALTER TABLE packages ADD COLUMN files_removed_at BIGINT;
