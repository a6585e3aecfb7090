-- When a retired upload's export files were removed from the data folder. The uploader
-- removes them right after a delivery, but a crash between retiring the upload and removing
-- them, or a retirement that delivered nothing (cancelled, undeliverable, given up), left
-- them until the request was forgotten; a sweep now removes whatever a retired upload left
-- and records it here.
ALTER TABLE uploads ADD COLUMN files_removed_at BIGINT;
CREATE INDEX uploads_files_left ON uploads (done_at)
    WHERE done_at IS NOT NULL AND files_removed_at IS NULL;
