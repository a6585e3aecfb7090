//! `dsrctl list`.

use dsrelay_sdk::proto::{ListRequestsRequest, RequestKind, RequestState};
use tokio_stream::StreamExt;

use crate::cli::ListArgs;
use crate::commands::{Io, Registry};
use crate::output::{emit, ListView, RequestView};
use crate::Failure;

/// The List body for these flags.
pub(crate) fn list_request(args: &ListArgs) -> ListRequestsRequest {
    ListRequestsRequest {
        states: args
            .states
            .iter()
            .map(|s| RequestState::from(*s) as i32)
            .collect(),
        kind: args
            .kind
            .map_or(RequestKind::Unspecified, RequestKind::from) as i32,
        overdue_only: args.overdue,
        page_size: args.limit.unwrap_or(0),
        page_token: args.page_token.clone().unwrap_or_default(),
    }
}

/// Prints one page, or with `--all` every page as one result.
pub(crate) async fn run(
    registry: &Registry,
    args: &ListArgs,
    io: &mut Io<'_>,
) -> Result<u8, Failure> {
    let request = list_request(args);
    let view = if args.all {
        let mut pages = std::pin::pin!(registry.client.list_pages(request));
        let mut requests = Vec::new();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|s| registry.failed(s))?;
            requests.extend(page.requests.iter().map(RequestView::from));
        }
        ListView {
            requests,
            next_page_token: String::new(),
        }
    } else {
        let page = registry
            .client
            .list(request)
            .await
            .map_err(|s| registry.failed(s))?;
        ListView {
            requests: page.requests.iter().map(RequestView::from).collect(),
            next_page_token: page.next_page_token,
        }
    };
    emit(io.out, io.format, &view, false)?;
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Command};
    use clap::Parser;

    fn parse(args: &[&str]) -> ListArgs {
        let argv = ["dsrctl", "list"].iter().chain(args).copied();
        match Cli::try_parse_from(argv).unwrap().command {
            Command::List(a) => a,
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn filters_map_to_the_request() {
        let r = list_request(&parse(&[
            "--state",
            "failed",
            "--state",
            "in-progress",
            "--kind",
            "return-of-data",
            "--overdue",
            "--limit",
            "20",
            "--page-token",
            "p2",
        ]));
        assert_eq!(
            r.states,
            [RequestState::Failed as i32, RequestState::InProgress as i32]
        );
        assert_eq!(r.kind, RequestKind::ReturnOfData as i32);
        assert!(r.overdue_only);
        assert_eq!(r.page_size, 20);
        assert_eq!(r.page_token, "p2");

        assert_eq!(list_request(&parse(&[])), ListRequestsRequest::default());
    }
}
