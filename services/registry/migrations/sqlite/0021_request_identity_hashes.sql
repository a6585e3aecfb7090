-- Each request's keyed identity hashes (`requests.identity_hashes`, a JSON array), one row
-- each, so that List finds a subject's requests through this key rather than by reading
-- every request's array. Filled here for the requests stored before, and by the trigger for
-- each new one: nothing changes `identity_hashes` once a request is stored (forgetting keeps
-- it), and no request is deleted.
CREATE TABLE request_identity_hashes (
    hash TEXT NOT NULL,
    request_id TEXT NOT NULL,
    PRIMARY KEY (hash, request_id)
) WITHOUT ROWID;
INSERT OR IGNORE INTO request_identity_hashes (hash, request_id)
    SELECT j.value, r.id FROM requests r, json_each(r.identity_hashes) j;
CREATE TRIGGER request_identity_hashes_fill AFTER INSERT ON requests
BEGIN
    INSERT OR IGNORE INTO request_identity_hashes (hash, request_id)
        SELECT value, NEW.id FROM json_each(NEW.identity_hashes);
END;
