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

/// The state of a request from what its processors have reported.
///
/// `delivered` holds one flag per routed processor (true once it durably accepted); `tasks`
/// the current state of every task the accepting processors created.
pub(crate) fn fold(cancelled: bool, delivered: &[bool], tasks: &[TaskState]) -> RequestState {
    if cancelled {
        return RequestState::Cancelled;
    }
    let all_delivered = delivered.iter().all(|d| *d);
    let any_delivered = delivered.iter().any(|d| *d);
    let any_started = tasks.iter().any(|t| *t != TaskState::Pending);
    if !all_delivered {
        return match (any_delivered, any_started) {
            (false, _) => RequestState::Received,
            (true, false) => RequestState::Dispatched,
            (true, true) => RequestState::InProgress,
        };
    }
    let open = tasks
        .iter()
        .any(|t| !task_is_final(*t) && *t != TaskState::Retained);
    if open {
        return if any_started {
            RequestState::InProgress
        } else {
            RequestState::Dispatched
        };
    }
    if tasks
        .iter()
        .any(|t| matches!(t, TaskState::Failed | TaskState::Refused))
    {
        RequestState::Failed
    } else if tasks.contains(&TaskState::Retained) {
        RequestState::PartiallyCompleted
    } else {
        RequestState::Completed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use TaskState::*;

    #[test]
    fn folds_the_life_of_a_request() {
        assert_eq!(fold(false, &[false, false], &[]), RequestState::Received);
        assert_eq!(
            fold(false, &[true, false], &[Pending]),
            RequestState::Dispatched
        );
        assert_eq!(
            fold(false, &[true, false], &[InProgress]),
            RequestState::InProgress
        );
        assert_eq!(
            fold(false, &[true, true], &[Pending, Pending]),
            RequestState::Dispatched
        );
        assert_eq!(
            fold(false, &[true, true], &[Completed, Pending]),
            RequestState::InProgress
        );
        assert_eq!(
            fold(false, &[true, true], &[Completed, NotFound]),
            RequestState::Completed
        );
        assert_eq!(
            fold(false, &[true], &[Completed, Retained]),
            RequestState::PartiallyCompleted
        );
        assert_eq!(
            fold(false, &[true], &[Completed, Refused]),
            RequestState::Failed
        );
        assert_eq!(
            fold(false, &[true], &[Failed, Retained]),
            RequestState::Failed
        );
        assert_eq!(
            fold(false, &[true], &[WaitingForOperator]),
            RequestState::InProgress
        );
        assert_eq!(fold(true, &[true], &[InProgress]), RequestState::Cancelled);
    }

    #[test]
    fn nothing_to_do_is_complete() {
        assert_eq!(fold(false, &[], &[]), RequestState::Completed);
        assert_eq!(fold(false, &[true], &[]), RequestState::Completed);
    }
}
