-- Paged exports (GetExportPage).

-- One row per newsletter issue sent to a subscriber: the subscriber's history, exported
-- with the subscriber and erased with it. It is what makes an export larger than one message.
CREATE TABLE deliveries (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    subscriber_id BIGINT NOT NULL REFERENCES subscribers (id),
    issue TEXT NOT NULL,
    sent_at BIGINT NOT NULL,
    opened INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX deliveries_subscriber ON deliveries (subscriber_id, id);

-- For a completed export: the subscriber ids it covers (comma-separated), which the pages
-- read live by keyset. Ids only: the data itself is never kept here.
ALTER TABLE adapter_tasks ADD COLUMN export_ids TEXT;
