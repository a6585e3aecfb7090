-- Each request's keyed identity hashes (`requests.identity_hashes`, a JSON array), one row
-- each, so that List finds a subject's requests through this key rather than by reading
-- every request's array. Filled here for the requests stored before, and by the trigger for
-- each new one: nothing changes `identity_hashes` once a request is stored (forgetting keeps
-- it), and no request is deleted.
CREATE TABLE request_identity_hashes (
    hash TEXT NOT NULL,
    request_id TEXT NOT NULL,
    PRIMARY KEY (hash, request_id)
);
INSERT INTO request_identity_hashes (hash, request_id)
    SELECT DISTINCT h.value, r.id
    FROM requests r, jsonb_array_elements_text(r.identity_hashes::jsonb) AS h(value)
    ON CONFLICT DO NOTHING;
CREATE FUNCTION request_identity_hashes_fill() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO request_identity_hashes (hash, request_id)
        SELECT DISTINCT h.value, NEW.id
        FROM jsonb_array_elements_text(NEW.identity_hashes::jsonb) AS h(value)
        ON CONFLICT DO NOTHING;
    RETURN NULL;
END;
$$;
CREATE TRIGGER request_identity_hashes_fill AFTER INSERT ON requests
    FOR EACH ROW EXECUTE FUNCTION request_identity_hashes_fill();
