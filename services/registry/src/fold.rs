//! Folding deliveries and task states into a request state. Pure, so it is tested alone.

use dsrelay_proto::v1::{RequestState, TaskState};

/// True for task states that will not change again by themselves. RETAINED is not final: it
/// moves to COMPLETED when its date passes.
pub(crate) fn task_is_final(s: TaskState) -> bool {
    matches!(
        s,
        TaskState::Completed
            | TaskState::NotFound
            | TaskState::Refused
            | TaskState::Failed
            | TaskState::Cancelled
    )
}

/// True for task states no cancellation changes: the final ones, and RETAINED, whose data a
/// processor erases at its date whether the request was cancelled or not (its Cancel ends
/// only tasks whose holder has not been called).
pub(crate) fn task_is_settled(s: TaskState) -> bool {
    task_is_final(s) || s == TaskState::Retained
}

/// True for request states after which a Watch stream ends.
pub(crate) fn request_is_terminal(s: RequestState) -> bool {
    matches!(
        s,
        RequestState::Completed | RequestState::Failed | RequestState::Cancelled
    )
}

/// The states in which a request is open: the controller has not answered the subject yet,
/// so its due date matters. Only an open request can be overdue, cancelled or have its due
/// date extended. FAILED is open (an operator must act, and the subject still waits);
/// PARTIALLY_COMPLETED is not (what is left is retained by law, and the holders erase it
/// when its date passes).
pub(crate) const OPEN_STATES: [RequestState; 4] = [
    RequestState::Received,
    RequestState::Dispatched,
    RequestState::InProgress,
    RequestState::Failed,
];

/// True for the [`OPEN_STATES`].
pub(crate) fn request_is_open(s: RequestState) -> bool {
    OPEN_STATES.contains(&s)
}

/// Where a request's delivery to one processor stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Delivery {
    /// Not accepted yet (waiting, retrying or dead-lettered).
    Pending,
    /// The processor durably accepted it.
    Accepted,
    /// Given up before the processor accepted it: by a cancellation, or by forgetting a
    /// cancelled request.
    Withdrawn,
}

impl Delivery {
    /// The delivery whose row is `done` (`done_at` set) and `withdrawn` (`withdrawn_at`
    /// set): a withdrawn row is done too, but nothing was delivered.
    pub(crate) fn of(done: bool, withdrawn: bool) -> Self {
        match (done, withdrawn) {
            (false, _) => Self::Pending,
            (true, false) => Self::Accepted,
            (true, true) => Self::Withdrawn,
        }
    }
}

/// True when cancelling a request now would stop nothing: every processor has its delivery
/// and every task is settled ([`task_is_settled`]). Such a cancellation is refused, as it
/// would be undone by the next fold ([`fold_request`]), or never, and say CANCELLED of a
/// request whose outcome had already happened.
pub(crate) fn cancel_stops_nothing(deliveries: &[Delivery], tasks: &[TaskState]) -> bool {
    deliveries.iter().all(|d| *d == Delivery::Accepted) && tasks.iter().all(|t| task_is_settled(*t))
}

/// The state of a request from what its processors have reported.
///
/// `prior` is the state the request had before what is being folded in; `deliveries` holds
/// one entry per routed processor, `tasks` the current state of every task the accepting
/// processors created.
///
/// A request stays as its partner or operator left it, or as it was answered:
/// - CANCELLED stays CANCELLED unless the cancellation turned out to stop nothing: every
///   delivery was accepted, every task is settled and none of them CANCELLED (each holder
///   was too far along when it came). The request then says what happened instead.
/// - PARTIALLY_COMPLETED stays PARTIALLY_COMPLETED while a task that was RETAINED runs its
///   erasure at its date (IN_PROGRESS, or WAITING_FOR_OPERATOR for a manual holder): the
///   subject was answered, and erasing retained data is not a new request to cancel or to be
///   overdue with. Once every task has ended the request is COMPLETED, and FAILED as soon as
///   one of them failed or was refused. A FAILED request stays FAILED likewise (its tasks had
///   all ended but RETAINED ones) while its retained data is erased, and while any of its
///   tasks is still FAILED or REFUSED.
/// - A FAILED request none of whose tasks is FAILED or REFUSED any longer (the processor's
///   operator retried the failed one, RetryTask) is open again: IN_PROGRESS while the retry
///   runs, then what its tasks end in.
/// - Once every task has settled, a CANCELLED one makes the request CANCELLED (unless one
///   failed): only a cancellation stops a task, and the request may read otherwise when its
///   cancellation first seemed to stop nothing and a retried task was stopped after.
pub(crate) fn fold_request(
    prior: RequestState,
    deliveries: &[Delivery],
    tasks: &[TaskState],
) -> RequestState {
    if prior == RequestState::Cancelled {
        // The fold only remembers the cancellation through this state: a CANCELLED task
        // proves it stopped something, and a task not settled may still be stopped by it.
        let stopped_nothing =
            cancel_stops_nothing(deliveries, tasks) && !tasks.contains(&TaskState::Cancelled);
        if !stopped_nothing {
            return RequestState::Cancelled;
        }
    }
    let folded = fold_tasks(deliveries, tasks);
    if !matches!(folded, RequestState::Dispatched | RequestState::InProgress) {
        return folded;
    }
    let any_failed = tasks.iter().copied().any(failed);
    match prior {
        // Only a RETAINED task moves after the request was answered: every other one had
        // ended (an operator's retry moves only a failed task, of a request that had failed).
        RequestState::PartiallyCompleted if any_failed => RequestState::Failed,
        RequestState::PartiallyCompleted => RequestState::PartiallyCompleted,
        // An operator must still act on a failed task: what else runs meanwhile (retained
        // data erased at its date, another failed task retried) does not hide it.
        RequestState::Failed if any_failed => RequestState::Failed,
        _ => folded,
    }
}

/// A failed or refused task: an operator must act.
fn failed(t: TaskState) -> bool {
    matches!(t, TaskState::Failed | TaskState::Refused)
}

/// The state the deliveries and tasks give by themselves, whatever the request was before.
fn fold_tasks(deliveries: &[Delivery], tasks: &[TaskState]) -> RequestState {
    // A withdrawn delivery is over: nothing more will arrive from it.
    let all_delivered = deliveries.iter().all(|d| *d != Delivery::Pending);
    let any_delivered = deliveries.contains(&Delivery::Accepted);
    let any_started = tasks.iter().any(|t| *t != TaskState::Pending);
    if !all_delivered {
        return match (any_delivered, any_started) {
            (false, _) => RequestState::Received,
            (true, false) => RequestState::Dispatched,
            (true, true) => RequestState::InProgress,
        };
    }
    let open = tasks.iter().any(|t| !task_is_settled(*t));
    if open {
        return if any_started {
            RequestState::InProgress
        } else {
            RequestState::Dispatched
        };
    }
    if tasks.iter().copied().any(failed) {
        RequestState::Failed
    } else if tasks.contains(&TaskState::Cancelled) {
        // A cancellation stopped a task: only the registry's Cancel does that, so the request
        // was cancelled, even if it read otherwise meanwhile (a FAILED request whose failed
        // task was retried before the Cancel reached the processor).
        RequestState::Cancelled
    } else if tasks.contains(&TaskState::Retained) {
        RequestState::PartiallyCompleted
    } else {
        RequestState::Completed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Delivery::{Accepted, Withdrawn};
    use RequestState as R;
    use TaskState::*;

    /// A delivery not accepted yet.
    const WAITING: Delivery = Delivery::Pending;

    #[test]
    fn folds_the_life_of_a_request() {
        let fold = |delivered: &[Delivery], tasks: &[TaskState]| {
            fold_request(R::InProgress, delivered, tasks)
        };
        assert_eq!(fold(&[WAITING, WAITING], &[]), R::Received);
        assert_eq!(fold(&[Accepted, WAITING], &[Pending]), R::Dispatched);
        assert_eq!(fold(&[Accepted, WAITING], &[InProgress]), R::InProgress);
        assert_eq!(
            fold(&[Accepted, Accepted], &[Pending, Pending]),
            R::Dispatched
        );
        assert_eq!(
            fold(&[Accepted, Accepted], &[Completed, Pending]),
            R::InProgress
        );
        assert_eq!(
            fold(&[Accepted, Accepted], &[Completed, NotFound]),
            R::Completed
        );
        assert_eq!(
            fold(&[Accepted], &[Completed, Retained]),
            R::PartiallyCompleted
        );
        assert_eq!(fold(&[Accepted], &[Completed, Refused]), R::Failed);
        assert_eq!(fold(&[Accepted], &[Failed, Retained]), R::Failed);
        assert_eq!(fold(&[Accepted], &[WaitingForOperator]), R::InProgress);
        // A task running after a request that was not answered yet: still open.
        assert_eq!(fold(&[Accepted], &[Completed, InProgress]), R::InProgress);
    }

    #[test]
    fn nothing_to_do_is_complete() {
        assert_eq!(fold_request(R::Received, &[], &[]), R::Completed);
        assert_eq!(fold_request(R::Received, &[Accepted], &[]), R::Completed);
    }

    /// A PARTIALLY_COMPLETED request was answered: its retained tasks' erasure at their date
    /// does not reopen it (so it is neither overdue nor cancellable meanwhile), and it ends
    /// COMPLETED, or FAILED as soon as a run fails.
    #[test]
    fn a_retention_run_keeps_the_request_answered() {
        let fold = |tasks: &[TaskState]| fold_request(R::PartiallyCompleted, &[Accepted], tasks);
        assert_eq!(fold(&[Completed, Retained]), R::PartiallyCompleted);
        assert_eq!(fold(&[Completed, InProgress]), R::PartiallyCompleted);
        assert_eq!(fold(&[NotFound, WaitingForOperator]), R::PartiallyCompleted);
        assert_eq!(
            fold(&[Completed, InProgress, Retained]),
            R::PartiallyCompleted
        );
        assert!(!request_is_open(fold(&[Completed, InProgress])));
        assert_eq!(fold(&[Completed, Completed]), R::Completed);
        assert_eq!(fold(&[Completed, Failed]), R::Failed);
        assert_eq!(fold(&[Completed, Refused, InProgress]), R::Failed);
        assert_eq!(fold(&[Completed, Failed, Retained]), R::Failed);
    }

    /// A FAILED request whose failed tasks were all retried (RetryTask at the processor) is
    /// open again until they end; while one of its tasks is still failed or refused it stays
    /// FAILED, whatever else runs.
    #[test]
    fn a_retried_failed_task_reopens_its_request() {
        let fold = |tasks: &[TaskState]| fold_request(R::Failed, &[Accepted], tasks);
        assert_eq!(fold(&[Completed, InProgress]), R::InProgress);
        assert!(request_is_open(fold(&[Completed, InProgress])));
        assert_eq!(fold(&[Completed, Completed]), R::Completed);
        assert_eq!(fold(&[Completed, Failed]), R::Failed);
        assert_eq!(fold(&[Completed, Retained]), R::PartiallyCompleted);
        assert_eq!(fold(&[Failed, InProgress]), R::Failed);
        assert_eq!(fold(&[Refused, InProgress]), R::Failed);
        assert_eq!(fold(&[Failed, Retained, InProgress]), R::Failed);
        // Not answered yet: a task failed while another runs leaves the request open.
        let unanswered = fold_request(R::InProgress, &[Accepted], &[Failed, InProgress]);
        assert_eq!(unanswered, R::InProgress);
        // A cancellation that stopped nothing gave way to FAILED; the retried task is then
        // cancelled when it reaches the processor: the request was cancelled after all.
        let cancelled = fold_request(R::InProgress, &[Accepted], &[Completed, Cancelled]);
        assert_eq!(cancelled, R::Cancelled);
        assert_eq!(fold(&[Retained, Cancelled]), R::Cancelled);
    }

    /// A cancellation that stopped nothing (every holder had done its part already, or was
    /// too far along) leaves the request in the state its tasks give; one that stopped a
    /// task or a delivery, or may still stop one, leaves it CANCELLED.
    #[test]
    fn a_cancellation_stands_only_if_it_stopped_something() {
        let fold = |delivered: &[Delivery], tasks: &[TaskState]| {
            fold_request(R::Cancelled, delivered, tasks)
        };
        assert_eq!(fold(&[Accepted], &[Completed, NotFound]), R::Completed);
        assert_eq!(fold(&[Accepted, Accepted], &[Completed, Failed]), R::Failed);
        assert_eq!(
            fold(&[Accepted], &[Completed, Retained]),
            R::PartiallyCompleted
        );
        // A task it stopped.
        assert_eq!(fold(&[Accepted], &[Completed, Cancelled]), R::Cancelled);
        // A task it may still stop, or that is still to report what its holder did.
        assert_eq!(fold(&[Accepted], &[Completed, InProgress]), R::Cancelled);
        assert_eq!(fold(&[Accepted], &[Completed, Pending]), R::Cancelled);
        assert_eq!(
            fold(&[Accepted], &[Completed, WaitingForOperator]),
            R::Cancelled
        );
        // A delivery it withdrew, or one still on its way.
        assert_eq!(fold(&[Accepted, Withdrawn], &[Completed]), R::Cancelled);
        assert_eq!(fold(&[Accepted, WAITING], &[Completed]), R::Cancelled);
        assert_eq!(fold(&[Withdrawn], &[]), R::Cancelled);
    }

    #[test]
    fn a_cancellation_is_refused_only_when_it_stops_nothing() {
        assert!(cancel_stops_nothing(&[Accepted], &[Completed, Failed]));
        assert!(cancel_stops_nothing(&[Accepted], &[Refused, Retained]));
        assert!(!cancel_stops_nothing(&[Accepted], &[Failed, InProgress]));
        assert!(!cancel_stops_nothing(
            &[Accepted],
            &[Failed, WaitingForOperator]
        ));
        assert!(!cancel_stops_nothing(&[Accepted, WAITING], &[Failed]));
        assert!(!cancel_stops_nothing(&[Accepted, Withdrawn], &[Failed]));
        // What it is refused for, the fold would undo at once.
        for tasks in [&[Completed, Failed][..], &[Refused, Retained][..]] {
            assert_ne!(fold_request(R::Cancelled, &[Accepted], tasks), R::Cancelled);
        }
    }
}
