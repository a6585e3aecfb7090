//! `dsrctl watch`.
//!
//! The registry ends every Watch stream after `watch.max_stream_ms` (default one hour) and
//! when it shuts down, with UNAVAILABLE; a request can take far longer than that (an operator
//! to act, a PARTIALLY_COMPLETED request's retained tasks to come due). So `watch` watches
//! again after the last event it printed, until the registry ends a stream because the
//! request ended (a cancelled one once nothing can change its state any more).
//!
//! A PARTIALLY_COMPLETED request was answered, but the registry does not end its stream: its
//! retained data is erased at its date, years on for bookkeeping. `watch` ends there too,
//! once the events stored so far have come ([`ANSWERED_QUIET`]), unless `--until-erased`.
//!
//! With `--follow`, `watch` goes on past every state (the registry is asked to keep the
//! stream open after a terminal one), until it is interrupted: a FAILED request an operator
//! retries at the processor (RetryTask) opens again, and its events keep coming.

use std::future::Future;
use std::pin::pin;
use std::time::Duration;

use dsrelay_sdk::proto::{RequestEvent, RequestState, WatchRequest};
use dsrelay_sdk::{is_connection_error, timed_out};
use tokio_stream::{Stream, StreamExt};
use tonic::{Code, Status};

use crate::cli::WatchArgs;
use crate::commands::{Hint, Io, Registry};
use crate::output::{emit, state_name, EventView};
use crate::Failure;

/// How long to wait before watching again: a registry that is restarting needs a moment,
/// and one that ends every stream at once must not be called in a tight loop.
const RECONNECT_PAUSE: Duration = Duration::from_secs(1);

/// How many attempts in a row to watch again may fail before `watch` gives up: with
/// [`RECONNECT_PAUSE`], a registry restart of about half a minute is waited out.
const MAX_FAILED_RECONNECTS: u32 = 30;

/// How long `watch` waits for another event once the request is PARTIALLY_COMPLETED before
/// it ends: the events stored up to then come at once, and the next (a retention run at its
/// date) may be years away.
const ANSWERED_QUIET: Duration = Duration::from_secs(2);

/// The states after which the registry ends a watch (its `request_is_terminal`).
fn is_terminal(state: i32) -> bool {
    matches!(
        RequestState::try_from(state),
        Ok(RequestState::Completed | RequestState::Failed | RequestState::Cancelled)
    )
}

/// A stream that ended with this was cut short (its lifetime, a shutdown, a lost
/// connection, a call past its deadline), not refused: watching again can go on.
pub(super) fn worth_resuming(status: &Status) -> bool {
    status.code() == Code::Unavailable || is_connection_error(status) || timed_out(status)
}

/// When to watch again.
struct Retry {
    /// The wait before each new attempt.
    pause: Duration,
    /// Attempts in a row whose stream could not be opened, after which [`follow`] gives up.
    max_failed: u32,
}

/// Why [`follow`] stopped other than at the end of a stream.
#[derive(Debug)]
enum Stop {
    /// An error not worth retrying, or the first stream not opening.
    Status(Status),
    /// The last `attempts` attempts to watch again after event `after` failed, the last with
    /// `status`.
    GaveUp {
        status: Status,
        after: u64,
        attempts: u32,
    },
    /// Printing an event failed.
    Output(Failure),
}

/// Follows a request's events after event `after`, opening each stream with
/// `open(after_event_id)` and handing each event to `print`, once; returns the request state
/// of the last event printed when a stream ends without error, or when the request is
/// PARTIALLY_COMPLETED and no event came for `answered_quiet` (if given). `answered` says
/// whether the request was PARTIALLY_COMPLETED before the first event printed (one watched
/// after its last event gets none to say so). `after` is left at the largest event id
/// printed, where a watch that stopped can continue.
///
/// A stream that ends with UNAVAILABLE (or a lost connection) is opened again after the
/// last event printed, after [`Retry::pause`]; [`Retry::max_failed`] failures in a row to
/// open it end the watch. With `forever` (`--follow`), so is a stream that ends without
/// error, whatever state the request is in, and the watch ends only on an error not worth
/// retrying (`answered_quiet` is then `None`).
async fn follow<O, F, S>(
    mut open: O,
    after: &mut u64,
    retry: &Retry,
    answered_quiet: Option<Duration>,
    answered: bool,
    forever: bool,
    mut print: impl FnMut(&RequestEvent) -> Result<(), Failure>,
) -> Result<Option<i32>, Stop>
where
    O: FnMut(u64) -> F,
    F: Future<Output = Result<S, Status>>,
    S: Stream<Item = Result<RequestEvent, Status>>,
{
    let mut last_state = None;
    let mut failed = 0;
    let mut resuming = false;
    loop {
        let events = match open(*after).await {
            Ok(events) => events,
            // Not at the first attempt: a registry that cannot be reached at all should say
            // so at once.
            Err(status) if resuming && worth_resuming(&status) => {
                failed += 1;
                if failed >= retry.max_failed {
                    return Err(Stop::GaveUp {
                        status,
                        after: *after,
                        attempts: failed,
                    });
                }
                tokio::time::sleep(retry.pause).await;
                continue;
            }
            Err(status) => return Err(Stop::Status(status)),
        };
        failed = 0;
        let asked_after = *after;
        let mut events = pin!(events);
        loop {
            let answered =
                last_state.map_or(answered, |s| s == RequestState::PartiallyCompleted as i32);
            let next = match answered_quiet.filter(|_| answered) {
                Some(quiet) => match tokio::time::timeout(quiet, events.next()).await {
                    Ok(next) => next,
                    Err(_) => return Ok(last_state),
                },
                None => events.next().await,
            };
            match next {
                None if forever => break,
                None => return Ok(last_state),
                Some(Ok(event)) => {
                    // The registry sends only events after the one asked for; one sent
                    // again anyway (by a registry in error) has been printed already.
                    if event.event_id <= asked_after {
                        continue;
                    }
                    // Ids may arrive out of order (they are not committed in order); the
                    // registry resumes after the largest one it sent.
                    *after = (*after).max(event.event_id);
                    last_state = Some(event.request_state);
                    print(&event).map_err(Stop::Output)?;
                }
                Some(Err(status)) if worth_resuming(&status) => break,
                Some(Err(status)) => return Err(Stop::Status(status)),
            }
        }
        // Cut short right after the request ended: nothing is left to wait for. Not so
        // after CANCELLED: the registry goes on while what the processors report may still
        // show the cancellation stopped nothing, and ends the stream itself once not.
        if !forever
            && last_state.is_some_and(|s| is_terminal(s) && s != RequestState::Cancelled as i32)
        {
            return Ok(last_state);
        }
        resuming = true;
        tokio::time::sleep(retry.pause).await;
    }
}

/// Prints events until the registry ends the watch because the request ended (or, for a
/// request that ends without its final event reaching us, until a stream ends without
/// error), or until a PARTIALLY_COMPLETED request's events so far have come (unless
/// `--until-erased`); 0 if the request ended COMPLETED or was answered PARTIALLY_COMPLETED,
/// 1 otherwise.
pub(crate) async fn run(
    registry: &Registry,
    args: &WatchArgs,
    io: &mut Io<'_>,
) -> Result<u8, Failure> {
    let retry = Retry {
        pause: RECONNECT_PAUSE,
        max_failed: MAX_FAILED_RECONNECTS,
    };
    let client = registry.client.raw();
    let open = |after_event_id| {
        let mut client = client.clone();
        let request = WatchRequest {
            request_id: args.id.clone(),
            after_event_id,
            follow_after_terminal: args.follow,
        };
        async move { client.watch(request).await.map(tonic::Response::into_inner) }
    };
    let (out, format) = (&mut *io.out, io.format);
    let print = |event: &RequestEvent| Ok(emit(&mut *out, format, &EventView::from(event), true)?);
    let answered_quiet = (!args.until_erased && !args.follow).then_some(ANSWERED_QUIET);
    let partially = RequestState::PartiallyCompleted as i32;
    // A PARTIALLY_COMPLETED request ends the watch as answered, unless told to follow it.
    let ends_answered = |state: i32| state == partially && !args.until_erased;
    // From its first event, the events say how the request stands; after a later one, they
    // may say nothing more of an answered request, whose stream stays open: ask.
    let answered = args.after > 0
        && !args.until_erased
        && registry
            .client
            .get(args.id.as_str())
            .await
            .map_err(|s| registry.failed(s))?
            .state
            == partially;
    let resume = |after: u64| resume(&registry.hint, args, after);
    let mut after = args.after;
    let outcome = follow(
        open,
        &mut after,
        &retry,
        answered_quiet,
        answered,
        args.follow,
        print,
    )
    .await;
    let last_state = match outcome {
        Ok(state) => state,
        Err(Stop::Status(status)) => {
            if after > args.after {
                writeln!(
                    io.err,
                    "stopped watching request {}: `{}` continues after the last event printed",
                    args.id,
                    resume(after)
                )?;
            }
            return Err(registry.failed(status));
        }
        Err(Stop::Output(failure)) => return Err(failure),
        Err(Stop::GaveUp {
            status,
            after,
            attempts,
        }) => {
            writeln!(
                io.err,
                "gave up watching request {}: the stream was cut short, and {attempts} \
                 attempts in a row to watch again, {} s apart, failed; `{}` continues after \
                 the last event printed",
                args.id,
                retry.pause.as_secs(),
                resume(after)
            )?;
            return Err(registry.failed(status));
        }
    };
    // With --after past the final event, or a stream the server closed early, the events do
    // not tell how the request stands; ask.
    let state = match last_state {
        Some(state) if is_terminal(state) || ends_answered(state) => state,
        // The Get above said so, and no event since said otherwise.
        None if answered => partially,
        _ => {
            registry
                .client
                .get(args.id.as_str())
                .await
                .map_err(|s| registry.failed(s))?
                .state
        }
    };
    let name = state_name(state);
    if state == RequestState::Failed as i32 {
        writeln!(io.err, "{}", failed_note(&registry.hint, &args.id))?;
    } else if is_terminal(state) {
        writeln!(io.err, "request {} ended {name}", args.id)?;
    } else if ends_answered(state) {
        writeln!(io.err, "{}", answered_note(&registry.hint, &args.id, &name))?;
    } else {
        writeln!(
            io.err,
            "the event stream ended while request {} is {name}",
            args.id
        )?;
    }
    Ok(
        if state == RequestState::Completed as i32 || ends_answered(state) {
            0
        } else {
            1
        },
    )
}

/// The watch that continues one asked for with `args` after event `after`: the same but for
/// `--after`.
fn resume(hint: &Hint, args: &WatchArgs, after: u64) -> String {
    let after = after.to_string();
    let mut words = vec!["watch", args.id.as_str(), "--after", after.as_str()];
    words.extend(args.until_erased.then_some("--until-erased"));
    words.extend(args.follow.then_some("--follow"));
    hint.command(&words)
}

/// What a watch that ends at request `id` FAILED says: what an operator does next.
fn failed_note(hint: &Hint, id: &str) -> String {
    format!(
        "request {id} ended FAILED: a task failed, and an operator must act (`{}` shows which \
         and why); once the cause is fixed, the processor's operator retries it (`dsrctl \
         tasks list --state failed --processor URL`, then `dsrctl tasks retry`), and `{}` \
         follows the request past this",
        hint.command(&["get", id]),
        hint.command(&["watch", id, "--follow"])
    )
}

/// What a watch that ends at request `id` answered PARTIALLY_COMPLETED (`name`) says.
fn answered_note(hint: &Hint, id: &str, name: &str) -> String {
    format!(
        "request {id} is {name}: answered, with data its holders keep by law, which they erase \
         at its date (`{}` shows when; `{}` follows it until then)",
        hint.command(&["get", id]),
        hint.command(&["watch", id, "--until-erased"])
    )
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::collections::VecDeque;

    use super::*;

    /// The commands a watch suggests run as printed: with the registry the user named, and
    /// a resumed watch as the one it continues.
    #[test]
    fn the_commands_a_watch_suggests_reach_the_same_registry() {
        let hint = Hint::new(&crate::cli::ConnectionArgs {
            endpoint: Some("https://registry.example:50051".into()),
            ..Default::default()
        });
        let at = "--endpoint https://registry.example:50051";
        let mut args = WatchArgs {
            id: "r-1".into(),
            after: 0,
            until_erased: true,
            follow: false,
        };
        let again = format!("dsrctl watch r-1 --after 7 --until-erased {at}");
        assert_eq!(resume(&hint, &args, 7), again);
        (args.until_erased, args.follow) = (false, true);
        let again = format!("dsrctl watch r-1 --after 7 --follow {at}");
        assert_eq!(resume(&hint, &args, 7), again);
        let note = answered_note(&hint, "r-1", "PARTIALLY_COMPLETED");
        for words in [
            format!("(`dsrctl get r-1 {at}` shows when;"),
            format!("`dsrctl watch r-1 --until-erased {at}` follows it until then)"),
        ] {
            assert!(note.contains(&words), "{words:?} in {note}");
        }
        // A FAILED request: what to read, who retries it and how to follow the retry.
        let note = failed_note(&hint, "r-1");
        for words in [
            format!("(`dsrctl get r-1 {at}` shows which and why)"),
            "`dsrctl tasks retry`".to_string(),
            format!("`dsrctl watch r-1 --follow {at}` follows the request past this"),
        ] {
            assert!(note.contains(&words), "{words:?} in {note}");
        }
    }

    fn event(event_id: u64, state: RequestState) -> Result<RequestEvent, Status> {
        Ok(RequestEvent {
            event_id,
            request_state: state as i32,
            ..Default::default()
        })
    }

    fn lifetime_over(last: u64) -> Result<RequestEvent, Status> {
        Err(Status::unavailable(format!(
            "this watch stream reached its maximum lifetime (watch.max_stream_ms = 1000); \
             watch again with after_event_id {last} to continue where this stream ended"
        )))
    }

    const NO_PAUSE: Retry = Retry {
        pause: Duration::ZERO,
        max_failed: 3,
    };

    /// Follows with a registry that answers the n-th attempt with `attempts[n]` (a stream of
    /// these items, or a status when opening); returns the outcome, the event ids printed
    /// and the `after_event_id` of each attempt.
    async fn run_follow(
        after: u64,
        attempts: Vec<Result<Vec<Result<RequestEvent, Status>>, Status>>,
    ) -> (Result<Option<i32>, Stop>, Vec<u64>, Vec<u64>) {
        run_follow_open(after, attempts, false, Some(ANSWERED_QUIET), false, false).await
    }

    /// [`run_follow`], its streams left open after their items when `open_ended` (as a live
    /// registry's are), with `answered_quiet`, `answered` before any event, and `forever`.
    async fn run_follow_open(
        after: u64,
        attempts: Vec<Result<Vec<Result<RequestEvent, Status>>, Status>>,
        open_ended: bool,
        answered_quiet: Option<Duration>,
        answered: bool,
        forever: bool,
    ) -> (Result<Option<i32>, Stop>, Vec<u64>, Vec<u64>) {
        let attempts = RefCell::new(VecDeque::from(attempts));
        let asked = RefCell::new(Vec::new());
        let mut printed = Vec::new();
        let mut after = after;
        let outcome = follow(
            |after| {
                asked.borrow_mut().push(after);
                let next = attempts
                    .borrow_mut()
                    .pop_front()
                    .unwrap_or_else(|| Err(Status::aborted("no more attempts in this test")));
                let endless = move |items| {
                    let pending = tokio_stream::pending().take(usize::from(open_ended));
                    tokio_stream::iter(items).chain(pending)
                };
                std::future::ready(next.map(endless))
            },
            &mut after,
            &NO_PAUSE,
            answered_quiet,
            answered,
            forever,
            |e| {
                printed.push(e.event_id);
                Ok(())
            },
        )
        .await;
        (outcome, printed, asked.into_inner())
    }

    /// `--follow`: a stream that ends after FAILED (or COMPLETED) is opened again after the
    /// last event printed, so a request an operator retried is followed on; the watch ends
    /// only on an error not worth retrying. Without `forever` it ends at FAILED.
    #[tokio::test]
    async fn following_goes_on_past_a_terminal_state() {
        let attempts = || {
            vec![
                Ok(vec![
                    event(1, RequestState::InProgress),
                    event(2, RequestState::Failed),
                ]),
                Ok(vec![
                    event(3, RequestState::InProgress),
                    event(4, RequestState::Completed),
                ]),
                Ok(vec![]),
            ]
        };
        let (outcome, printed, asked) =
            run_follow_open(0, attempts(), false, None, false, true).await;
        assert!(
            matches!(&outcome, Err(Stop::Status(s)) if s.code() == Code::Aborted),
            "{outcome:?}"
        );
        assert_eq!(printed, [1, 2, 3, 4]);
        assert_eq!(asked, [0, 2, 4, 4]);
        let (outcome, printed, asked) =
            run_follow_open(0, attempts(), false, None, false, false).await;
        assert_eq!(outcome.unwrap(), Some(RequestState::Failed as i32));
        assert_eq!((printed, asked), (vec![1, 2], vec![0]));
    }

    #[tokio::test]
    async fn a_stream_cut_short_is_resumed_after_the_last_event_printed() {
        let (outcome, printed, asked) = run_follow(
            0,
            vec![
                // Out of order, as uncommitted ids can be: the resume point is the largest.
                Ok(vec![
                    event(1, RequestState::Received),
                    event(3, RequestState::InProgress),
                    event(2, RequestState::Dispatched),
                    lifetime_over(3),
                ]),
                // A stream with nothing new, ended by a shutdown.
                Ok(vec![Err(Status::unavailable(
                    "the registry is shutting down",
                ))]),
                // The registry restarting.
                Err(Status::unavailable("connection refused")),
                // A registry that sends an event printed already.
                Ok(vec![
                    event(3, RequestState::InProgress),
                    event(4, RequestState::Completed),
                ]),
            ],
        )
        .await;
        assert_eq!(outcome.unwrap(), Some(RequestState::Completed as i32));
        assert_eq!(printed, [1, 3, 2, 4]);
        assert_eq!(asked, [0, 3, 3, 3]);
    }

    #[tokio::test]
    async fn gives_up_after_the_most_failed_attempts_in_a_row() {
        let refused = || Err(Status::unavailable("connection refused"));
        let (outcome, printed, asked) = run_follow(
            5,
            vec![
                Ok(vec![event(6, RequestState::InProgress), lifetime_over(6)]),
                refused(),
                refused(),
                // A stream that opens starts the count again.
                Ok(vec![lifetime_over(6)]),
                refused(),
                refused(),
                refused(),
                Ok(vec![event(7, RequestState::Completed)]),
            ],
        )
        .await;
        match outcome {
            Err(Stop::GaveUp {
                status,
                after,
                attempts,
            }) => {
                assert_eq!(status.code(), Code::Unavailable);
                assert_eq!((after, attempts), (6, 3));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(printed, [6]);
        assert_eq!(asked, [5, 6, 6, 6, 6, 6, 6]);
    }

    #[tokio::test]
    async fn other_errors_and_a_first_stream_that_cannot_open_end_at_once() {
        let (outcome, _, asked) =
            run_follow(0, vec![Err(Status::unavailable("connection refused"))]).await;
        assert!(
            matches!(&outcome, Err(Stop::Status(s)) if s.code() == Code::Unavailable),
            "{outcome:?}"
        );
        assert_eq!(asked, [0]);
        let (outcome, printed, asked) = run_follow(
            0,
            vec![
                Ok(vec![event(1, RequestState::Received), lifetime_over(1)]),
                Err(Status::not_found("request r-1 not found")),
            ],
        )
        .await;
        assert!(
            matches!(&outcome, Err(Stop::Status(s)) if s.code() == Code::NotFound),
            "{outcome:?}"
        );
        assert_eq!((printed, asked), (vec![1], vec![0, 1]));
        let (outcome, _, asked) = run_follow(
            0,
            vec![Ok(vec![
                event(1, RequestState::Received),
                Err(Status::permission_denied("not yours")),
            ])],
        )
        .await;
        assert!(
            matches!(&outcome, Err(Stop::Status(s)) if s.code() == Code::PermissionDenied),
            "{outcome:?}"
        );
        assert_eq!(asked, [0]);
    }

    #[tokio::test]
    async fn a_stream_that_ends_is_not_watched_again() {
        // The registry ends the stream after the final event; a stream that ends early
        // leaves the state to a Get.
        for (events, state) in [
            (
                vec![event(1, RequestState::Cancelled)],
                Some(RequestState::Cancelled as i32),
            ),
            (
                vec![event(1, RequestState::InProgress)],
                Some(RequestState::InProgress as i32),
            ),
            (vec![], None),
        ] {
            let (outcome, _, asked) = run_follow(0, vec![Ok(events)]).await;
            assert_eq!(outcome.unwrap(), state);
            assert_eq!(asked, [0]);
        }
        // Cut short right after the final event: nothing more to wait for.
        let (outcome, _, asked) = run_follow(
            0,
            vec![Ok(vec![event(2, RequestState::Failed), lifetime_over(2)])],
        )
        .await;
        assert_eq!(outcome.unwrap(), Some(RequestState::Failed as i32));
        assert_eq!(asked, [0]);
        // Not after CANCELLED: the registry ends that stream itself once nothing can change
        // the state, which may yet give way to what the holders did.
        let (outcome, printed, asked) = run_follow(
            0,
            vec![
                Ok(vec![event(2, RequestState::Cancelled), lifetime_over(2)]),
                Ok(vec![event(3, RequestState::Completed)]),
            ],
        )
        .await;
        assert_eq!(outcome.unwrap(), Some(RequestState::Completed as i32));
        assert_eq!((printed, asked), (vec![2, 3], vec![0, 2]));
    }

    /// A PARTIALLY_COMPLETED request's stream stays open (its retained data is erased years
    /// on): the watch ends once the events so far have come, unless told to follow it.
    #[tokio::test(start_paused = true)]
    async fn an_answered_request_ends_the_watch_unless_told_to_follow_it() {
        let answered = || {
            vec![Ok(vec![
                event(1, RequestState::InProgress),
                event(2, RequestState::PartiallyCompleted),
                // Stored after the answer (a retention run under way): printed too.
                event(3, RequestState::PartiallyCompleted),
            ])]
        };
        let (outcome, printed, _) =
            run_follow_open(0, answered(), true, Some(ANSWERED_QUIET), false, false).await;
        assert_eq!(
            outcome.unwrap(),
            Some(RequestState::PartiallyCompleted as i32)
        );
        assert_eq!(printed, [1, 2, 3]);
        // Followed, it waits on; here for as long as a day.
        let followed = tokio::time::timeout(
            Duration::from_secs(86_400),
            run_follow_open(0, answered(), true, None, false, false),
        )
        .await;
        assert!(followed.is_err(), "the watch ended");
        // A request still under way is waited for, however quiet.
        let working = vec![Ok(vec![event(1, RequestState::InProgress)])];
        let waited = tokio::time::timeout(
            Duration::from_secs(86_400),
            run_follow_open(0, working, true, Some(ANSWERED_QUIET), false, false),
        )
        .await;
        assert!(waited.is_err(), "the watch ended");
        // Watched after its last event, an answered request sends none: known answered
        // beforehand, the watch ends all the same.
        let (outcome, printed, _) =
            run_follow_open(5, vec![Ok(vec![])], true, Some(ANSWERED_QUIET), true, false).await;
        assert_eq!((outcome.unwrap(), printed), (None, vec![]));
        let quiet = tokio::time::timeout(
            Duration::from_secs(86_400),
            run_follow_open(
                5,
                vec![Ok(vec![])],
                true,
                Some(ANSWERED_QUIET),
                false,
                false,
            ),
        )
        .await;
        assert!(quiet.is_err(), "the watch ended");
    }
}
