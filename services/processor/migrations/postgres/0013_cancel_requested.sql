-- When the request was cancelled while the task's holder was working on it (Cancel came with
-- the task IN_PROGRESS under a runner's lease, or with its work accepted by the holder and
-- awaiting confirmation). The holder cannot be called back, so the task keeps its state and
-- its outcome is recorded as what the holder did, saying the cancellation came too late.
-- Claims take no other task of a cancelled request.
ALTER TABLE tasks ADD COLUMN cancel_requested_at BIGINT;
