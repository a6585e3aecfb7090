//! Group commit for Submit: concurrent Submits queue their requests here, and one writer
//! stores everything queued in a single transaction. One commit (one fsync on SQLite with
//! `synchronous=FULL`) then serves many partners, which is how intake outruns the rate of
//! single-row commits while every answer still waits for its request to be durable.

use tokio::sync::{mpsc, oneshot};

use crate::store::{Inserted, NewRequest, Store};

/// Most requests stored in one transaction.
pub const MAX_BATCH: usize = 256;

type Job = (NewRequest, oneshot::Sender<Result<Inserted, String>>);

/// The queue in front of the writer.
#[derive(Debug, Clone)]
pub struct Intake {
    tx: mpsc::Sender<Job>,
}

impl Intake {
    /// Starts the writer on `store`. It stops when every `Intake` is dropped.
    pub fn start(store: Store) -> Self {
        let (tx, rx) = mpsc::channel(4 * MAX_BATCH);
        tokio::spawn(write(store, rx));
        Self { tx }
    }

    /// Stores `request` (or finds its idempotency key's earlier request); returns once it is
    /// committed.
    pub async fn submit(&self, request: NewRequest) -> anyhow::Result<Inserted> {
        let (done_tx, done_rx) = oneshot::channel();
        self.tx
            .send((request, done_tx))
            .await
            .map_err(|_| anyhow::anyhow!("the intake writer has stopped"))?;
        done_rx
            .await
            .map_err(|_| anyhow::anyhow!("the intake writer stopped before answering"))?
            .map_err(|e| anyhow::anyhow!(e))
    }
}

async fn write(store: Store, mut rx: mpsc::Receiver<Job>) {
    while let Some(first) = rx.recv().await {
        let mut jobs = vec![first];
        while jobs.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(j) => jobs.push(j),
                Err(_) => break,
            }
        }
        let (requests, answers): (Vec<NewRequest>, Vec<_>) = jobs.into_iter().unzip();
        match store.insert_requests(&requests).await {
            Ok(outcomes) => {
                for (answer, outcome) in answers.into_iter().zip(outcomes) {
                    let _ = answer.send(Ok(outcome));
                }
            }
            Err(e) => {
                let message = format!("{e:#}");
                tracing::error!(error = %message, batch = requests.len(), "storing submitted requests failed");
                for answer in answers {
                    let _ = answer.send(Err(message.clone()));
                }
            }
        }
    }
}
