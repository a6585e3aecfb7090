-- The W3C traceparent of the Deliver call that brought each request: its tasks' spans are
-- children of it.
ALTER TABLE requests ADD COLUMN traceparent TEXT;
