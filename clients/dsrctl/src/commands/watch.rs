//! `dsrctl watch`.

use dsrelay_sdk::proto::RequestState;
use tokio_stream::StreamExt;

use crate::cli::WatchArgs;
use crate::commands::{Io, Registry};
use crate::output::{emit, state_name, EventView};
use crate::Failure;

/// The states after which the registry ends a watch.
fn is_terminal(state: i32) -> bool {
    matches!(
        RequestState::try_from(state),
        Ok(RequestState::Completed | RequestState::Failed | RequestState::Cancelled)
    )
}

/// Prints events until the stream ends; 0 if the request ended COMPLETED, 1 otherwise.
pub(crate) async fn run(
    registry: &Registry,
    args: &WatchArgs,
    io: &mut Io<'_>,
) -> Result<u8, Failure> {
    let mut events = std::pin::pin!(registry.client.watch(args.id.as_str(), args.after));
    let mut last_state = None;
    while let Some(event) = events.next().await {
        let event = event.map_err(|s| registry.failed(s))?;
        last_state = Some(event.request_state);
        emit(io.out, io.format, &EventView::from(&event), true)?;
    }
    // With --after past the final event, or a stream the server closed early, the events do
    // not tell how the request stands; ask.
    let state = match last_state {
        Some(state) if is_terminal(state) => state,
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
    if is_terminal(state) {
        writeln!(io.err, "request {} ended {name}", args.id)?;
    } else {
        writeln!(
            io.err,
            "the event stream ended while request {} is {name}",
            args.id
        )?;
    }
    Ok(if state == RequestState::Completed as i32 {
        0
    } else {
        1
    })
}
