-- When the request was cancelled while the task's holder was working on it (Cancel came with
-- the task IN_PROGRESS under a runner's lease, or with its work accepted by the holder and
-- awaiting confirmation). The holder cannot be called back, so the task keeps its state and
-- its outcome is recorded as what the holder did, saying the cancellation came too late.
-- Of a cancelled request, claims take no other task but RETAINED ones at their date.
ALTER TABLE tasks ADD COLUMN cancel_requested_at BIGINT;

-- When the runner called the task's holder and has not yet recorded the answer: set before
-- each call, cleared by the step that records its outcome (or postpones the task). Still
-- set at the next claim, the call was cut off (a crash, a lost lease) and the holder may
-- have done the work: the next call says so to the connector (`Task::interrupted`).
ALTER TABLE tasks ADD COLUMN call_started_at BIGINT;
