-- The W3C traceparent of each request's intake span: deliveries, retries and
-- acknowledgements hang their spans off it, so one trace shows the whole propagation.
ALTER TABLE requests ADD COLUMN traceparent TEXT;
