-- Each event names the trace and span it happened in, so `dsrctl trace` can draw a request's
-- propagation from stored events alone and point into a trace viewer when one runs.
ALTER TABLE events ADD COLUMN trace_id TEXT;
ALTER TABLE events ADD COLUMN span_id TEXT;
