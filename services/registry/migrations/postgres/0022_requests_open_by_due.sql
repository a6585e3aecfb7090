-- Open requests by due date, so that List's `due_before` (and `overdue_only`) reads one range
-- of due dates per open state (RECEIVED, DISPATCHED, IN_PROGRESS, FAILED) rather than every
-- request, or every open one: an on-call listing of what falls due this week stays a few
-- rows however many requests the registry holds.
CREATE INDEX requests_open_by_due ON requests (state, due_at);
