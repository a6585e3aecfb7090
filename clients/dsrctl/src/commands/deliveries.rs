//! `dsrctl deliveries`: list the deliveries the registry dead-lettered because their
//! processor kept refusing them, and requeue one once the cause is fixed (operators only).

use dsrelay_sdk::proto::{
    DeadLetteredDelivery, ListDeadLetteredDeliveriesRequest, RequeueDeliveryRequest,
};
use serde::Serialize;

use crate::cli::DeliveriesCommand;
use crate::commands::{Io, Registry};
use crate::output::{emit, Render, RequestView, Time};
use crate::table::{clean, Table};
use crate::Failure;

#[derive(Debug, Serialize)]
struct DeadLetteredView {
    request_id: String,
    processor: String,
    operation: String,
    attempts: u32,
    refusals: u32,
    last_error: String,
    dead_lettered_at: Option<Time>,
}

impl From<&DeadLetteredDelivery> for DeadLetteredView {
    fn from(d: &DeadLetteredDelivery) -> Self {
        Self {
            request_id: d.request_id.clone(),
            processor: d.processor.clone(),
            operation: d.operation.clone(),
            attempts: d.attempts,
            refusals: d.refusals,
            last_error: d.last_error.clone(),
            dead_lettered_at: Time::from_proto(d.dead_lettered_at.as_ref()),
        }
    }
}

#[derive(Debug, Serialize)]
struct DeadLetteredListView {
    dead_lettered: Vec<DeadLetteredView>,
    /// More are dead-lettered than were listed.
    truncated: bool,
    /// When `truncated`: what `--page-token` takes to list the next ones.
    #[serde(skip_serializing_if = "String::is_empty")]
    next_page_token: String,
}

impl Render for DeadLetteredListView {
    fn to_table(&self) -> String {
        if self.dead_lettered.is_empty() {
            return "no dead-lettered deliveries\n".into();
        }
        let mut t = Table::new([
            "REQUEST",
            "PROCESSOR",
            "OP",
            "ATTEMPTS",
            "REFUSALS",
            "SINCE",
            "LAST ERROR",
        ]);
        for v in &self.dead_lettered {
            t.row([
                clean(&v.request_id),
                clean(&v.processor),
                clean(&v.operation),
                v.attempts.to_string(),
                v.refusals.to_string(),
                v.dead_lettered_at
                    .map(|d| d.to_string())
                    .unwrap_or_default(),
                clean(&v.last_error),
            ]);
        }
        let mut text = t.render();
        if self.truncated {
            text.push_str(&format!(
                "(more are dead-lettered; see the next ones with --page-token {})\n",
                self.next_page_token
            ));
        }
        text
    }
}

/// Runs `dsrctl deliveries ...`.
pub(crate) async fn run(
    registry: &Registry,
    cmd: &DeliveriesCommand,
    io: &mut Io<'_>,
) -> Result<u8, Failure> {
    match cmd {
        DeliveriesCommand::DeadLetters { limit, page_token } => {
            let list = registry
                .client
                .raw()
                .list_dead_lettered_deliveries(ListDeadLetteredDeliveriesRequest {
                    page_size: limit.unwrap_or(0),
                    page_token: page_token.clone().unwrap_or_default(),
                })
                .await
                .map_err(|s| registry.failed(s))?
                .into_inner();
            let view = DeadLetteredListView {
                dead_lettered: list.deliveries.iter().map(DeadLetteredView::from).collect(),
                truncated: list.truncated,
                next_page_token: list.next_page_token,
            };
            emit(io.out, io.format, &view, false)?;
        }
        DeliveriesCommand::Requeue { id, processor } => {
            let request = registry
                .client
                .raw()
                .requeue_delivery(RequeueDeliveryRequest {
                    request_id: id.clone(),
                    processor: processor.clone(),
                })
                .await
                .map_err(|s| registry.failed(s))?
                .into_inner();
            writeln!(
                io.err,
                "requeued request {}'s dead-lettered calls to {} (its Deliver, cancellation, \
                 terms or due date: whichever were dead-lettered)",
                clean(id),
                clean(processor)
            )?;
            emit(io.out, io.format, &RequestView::from(&request), false)?;
        }
    }
    Ok(0)
}
