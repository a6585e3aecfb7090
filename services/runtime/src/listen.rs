//! TCP listeners handed down by whoever started the process, the way systemd socket
//! activation does it (`LISTEN_FDS`, sockets from fd 3 on): a supervisor or a test that binds
//! before it starts the service keeps the address across a crash and a restart, and nothing
//! races the restarted service to the port. Without handed-down sockets, addresses are bound
//! here as usual.

use std::io;
use std::net::SocketAddr;
use std::sync::{Mutex, OnceLock};

use tokio::net::TcpListener;

/// The handed-down listeners not taken yet. The environment is read once, because
/// `listenfd` removes the variables so that they do not reach the service's own children.
fn handed_down() -> &'static Mutex<Vec<std::net::TcpListener>> {
    static HANDED_DOWN: OnceLock<Mutex<Vec<std::net::TcpListener>>> = OnceLock::new();
    HANDED_DOWN.get_or_init(|| {
        let mut fds = listenfd::ListenFd::from_env();
        let mut listeners = Vec::new();
        for index in 0..fds.len() {
            match fds.take_tcp_listener(index) {
                Ok(Some(l)) => listeners.push(l),
                Ok(None) => {}
                Err(e) => tracing::warn!(
                    index,
                    error = %e,
                    "ignoring a handed-down socket that is not a tcp listener"
                ),
            }
        }
        Mutex::new(listeners)
    })
}

/// Whether a listener bound to `bound` serves the configured address `wanted`. A wildcard
/// address matches a wildcard socket of the other family, because a supervisor's `[::]:port`
/// socket usually serves IPv4 too.
fn serves(bound: SocketAddr, wanted: SocketAddr) -> bool {
    bound == wanted
        || (bound.port() == wanted.port()
            && bound.ip().is_unspecified()
            && wanted.ip().is_unspecified())
}

/// A listener for `addr` (`host:port`): the handed-down listener bound to that address when
/// there is one, else a newly bound one.
pub async fn bind(addr: &str) -> io::Result<TcpListener> {
    if let Ok(wanted) = addr.parse::<SocketAddr>() {
        let taken = {
            let mut listeners = handed_down().lock().unwrap_or_else(|e| e.into_inner());
            let found = listeners
                .iter()
                .position(|l| l.local_addr().is_ok_and(|bound| serves(bound, wanted)));
            found.map(|i| listeners.swap_remove(i))
        };
        if let Some(listener) = taken {
            listener.set_nonblocking(true)?;
            tracing::info!(%addr, "listening on a handed-down socket");
            return TcpListener::from_std(listener);
        }
    }
    TcpListener::bind(addr).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_socket_serves_its_own_address_and_wildcards_match_across_families() {
        let addr = |s: &str| s.parse::<SocketAddr>().expect("addr");
        assert!(serves(addr("127.0.0.1:4000"), addr("127.0.0.1:4000")));
        assert!(!serves(addr("127.0.0.1:4000"), addr("127.0.0.1:4001")));
        assert!(!serves(addr("127.0.0.1:4000"), addr("0.0.0.0:4000")));
        assert!(serves(addr("[::]:4000"), addr("0.0.0.0:4000")));
        assert!(serves(addr("0.0.0.0:4000"), addr("[::]:4000")));
    }

    #[tokio::test]
    async fn without_handed_down_sockets_the_address_is_bound() {
        let l = bind("127.0.0.1:0").await.expect("bind");
        assert!(l.local_addr().expect("addr").ip().is_loopback());
    }
}
