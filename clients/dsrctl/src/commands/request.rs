//! `get`, `cancel` and `extend`: calls that answer with one request.

use dsrelay_sdk::proto::{Chain, GetChainRequest, RequestKind};

use crate::cli::{CancelArgs, ExtendArgs, GetArgs};
use crate::commands::{Io, Registry};
use crate::output::{emit, ProcessorCheckView, RequestView};
use crate::Failure;

/// The chain as the registry last recorded it (what `dsrctl chain` shows), for its status
/// checks of processors; none when it cannot be read: `get` and `trace` show the request
/// all the same, without them.
pub(crate) async fn chain(registry: &Registry) -> Option<Chain> {
    let chain = registry.client.raw().get_chain(GetChainRequest {}).await;
    Some(chain.ok()?.into_inner())
}

/// `dsrctl get ID`.
pub(crate) async fn get(
    registry: &Registry,
    args: &GetArgs,
    io: &mut Io<'_>,
) -> Result<u8, Failure> {
    let request = registry
        .client
        .get(args.id.as_str())
        .await
        .map_err(|s| registry.failed(s))?;
    let mut view = RequestView::from(&request);
    // The tasks show what a processor last reported, and one that is down reports nothing:
    // the registry's failed checks of it are the sign.
    if !request.deliveries.is_empty() {
        if let Some(chain) = chain(registry).await {
            view.processor_status_checks = ProcessorCheckView::of_request(&chain, &request);
        }
    }
    // The request carries no terms: whether its return was confirmed is the contract end's.
    // Only an operator may ask for it, and the request is shown all the same without.
    if request.kind == RequestKind::ContractEnd as i32 {
        if let Ok(contract) = registry.client.get_contract(args.id.as_str()).await {
            view.return_unconfirmed = super::contracts::unconfirmed_return(&contract);
        }
    }
    emit(io.out, io.format, &view, false)?;
    Ok(0)
}

/// `dsrctl cancel ID --reason TEXT`.
pub(crate) async fn cancel(
    registry: &Registry,
    args: &CancelArgs,
    io: &mut Io<'_>,
) -> Result<u8, Failure> {
    let request = registry
        .client
        .cancel(args.id.as_str(), args.reason.as_str())
        .await
        .map_err(|s| registry.failed(s))?;
    emit(io.out, io.format, &RequestView::from(&request), false)?;
    Ok(0)
}

/// `dsrctl extend ID --months N --reason TEXT`.
pub(crate) async fn extend(
    registry: &Registry,
    args: &ExtendArgs,
    io: &mut Io<'_>,
) -> Result<u8, Failure> {
    let request = registry
        .client
        .extend_deadline(args.id.as_str(), args.months, args.reason.as_str())
        .await
        .map_err(|s| registry.failed(s))?;
    emit(io.out, io.format, &RequestView::from(&request), false)?;
    Ok(0)
}
