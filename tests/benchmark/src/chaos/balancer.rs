//! A layer-4 load balancer in front of a service's replicas, as a deployment puts one: each
//! TCP connection accepted on 127.0.0.1 goes to the next replica in turn, its bytes copied
//! both ways untouched (TLS passes through, so the caller still authenticates the replica's
//! certificate and the replica the caller's). A replica whose port refuses the connection
//! (killed, or starting again) is skipped for the next one. A connection to a replica that is
//! killed breaks with it; gRPC clients then connect again and land on a live one.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// A running balancer; dropping it stops accepting (connections already made go on until
/// either side closes them).
pub(super) struct Balancer {
    /// Where callers connect.
    pub(super) port: u16,
    /// Connections handed to each replica, in the order of `backends`.
    handed: Arc<Vec<AtomicU64>>,
    accept: JoinHandle<()>,
}

impl Balancer {
    /// Listens on a free port of 127.0.0.1 and spreads connections over the replicas
    /// listening at `backends` (ports of 127.0.0.1).
    pub(super) async fn start(backends: Vec<u16>) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding a load balancer")?;
        let port = listener.local_addr()?.port();
        let handed: Arc<Vec<AtomicU64>> =
            Arc::new(backends.iter().map(|_| AtomicU64::new(0)).collect());
        let next = Arc::new(AtomicUsize::new(0));
        let counts = handed.clone();
        let accept = tokio::spawn(async move {
            loop {
                let Ok((inbound, _)) = listener.accept().await else {
                    continue;
                };
                let backends = backends.clone();
                let next = next.clone();
                let counts = counts.clone();
                tokio::spawn(async move {
                    let first = next.fetch_add(1, Ordering::Relaxed);
                    for i in 0..backends.len() {
                        let which = (first + i) % backends.len();
                        let Ok(mut outbound) =
                            TcpStream::connect(("127.0.0.1", backends[which])).await
                        else {
                            continue;
                        };
                        counts[which].fetch_add(1, Ordering::Relaxed);
                        let _ = outbound.set_nodelay(true);
                        let mut inbound = inbound;
                        let _ = inbound.set_nodelay(true);
                        // Either side closing or breaking ends both.
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                        return;
                    }
                    // No replica answered: dropping the caller's connection tells it so.
                });
            }
        });
        Ok(Self {
            port,
            handed,
            accept,
        })
    }

    /// Connections handed to each replica so far.
    pub(super) fn handed(&self) -> Vec<u64> {
        self.handed
            .iter()
            .map(|n| n.load(Ordering::Relaxed))
            .collect()
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// An echo server that answers each connection with its own name first.
    async fn named_echo(name: u8) -> (u16, JoinHandle<()>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let _ = s.write_all(&[name]).await;
                    let mut buf = [0u8; 64];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        (port, task)
    }

    async fn who_answers(port: u16) -> u8 {
        let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let mut name = [0u8; 1];
        s.read_exact(&mut name).await.unwrap();
        s.write_all(b"ping").await.unwrap();
        let mut echo = [0u8; 4];
        s.read_exact(&mut echo).await.unwrap();
        assert_eq!(&echo, b"ping");
        name[0]
    }

    #[tokio::test]
    async fn connections_go_round_robin_and_skip_a_replica_that_is_down() {
        let (a, _a) = named_echo(b'a').await;
        let (b, b_task) = named_echo(b'b').await;
        let balancer = Balancer::start(vec![a, b]).await.unwrap();
        let mut seen = Vec::new();
        for _ in 0..4 {
            seen.push(who_answers(balancer.port).await);
        }
        seen.sort();
        assert_eq!(seen, b"aabb");
        assert_eq!(balancer.handed(), vec![2, 2]);

        // b goes away: its port refuses, and every connection lands on a.
        b_task.abort();
        let _ = b_task.await;
        for _ in 0..4 {
            assert_eq!(who_answers(balancer.port).await, b'a');
        }
        assert_eq!(balancer.handed(), vec![6, 2]);
    }
}
