-- The example newsletter service. Times are milliseconds since the Unix epoch.

-- One row per subscriber. E-mail addresses are stored lowercased, phone numbers in their
-- normalised form (digits and a leading +), so that lookups and hashes match.
CREATE TABLE subscribers (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    email TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL,
    phone TEXT,
    subscribed INTEGER NOT NULL DEFAULT 1,
    restricted INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX subscribers_phone ON subscribers (phone);

-- One row per task_id: what Execute answered, so that a repeated call answers the same and
-- does the work once. `outcome` is the ExecuteOutcome number; `response` the encoded
-- ExecuteResponse (export data is never kept). An erasure answered ACCEPTED keeps the
-- subscriber ids to delete in `pending_ids` and is carried out at `confirm_at`.
CREATE TABLE adapter_tasks (
    task_id TEXT PRIMARY KEY,
    caller TEXT NOT NULL,
    request_id TEXT NOT NULL,
    kind INTEGER NOT NULL,
    outcome INTEGER NOT NULL,
    response BLOB NOT NULL,
    pending_ids TEXT,
    confirm_at BIGINT,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE INDEX adapter_tasks_pending ON adapter_tasks (confirm_at) WHERE outcome = 1;
