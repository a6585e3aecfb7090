//! `get`, `cancel` and `extend`: calls that answer with one request.

use crate::cli::{CancelArgs, ExtendArgs, GetArgs};
use crate::commands::{Io, Registry};
use crate::output::{emit, RequestView};
use crate::Failure;

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
    emit(io.out, io.format, &RequestView::from(&request), false)?;
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
