//! [`Writer`] and [`Reader`] for async callers: the file work runs on a thread of its own,
//! fed through a bounded channel, so a database stream and the compression and encryption
//! overlap and memory stays bounded by the channel.

use std::path::Path;

use tokio::sync::{mpsc, oneshot};

use crate::{Error, Header, Identities, Reader, Recipients, Result, Summary, Writer};

/// Records in flight between the caller and the file thread.
const DEPTH: usize = 64;

enum Msg {
    Records(Vec<Vec<u8>>),
    Finish,
}

/// A [`Writer`] on its own thread.
pub struct AsyncWriter {
    tx: mpsc::Sender<Msg>,
    done: oneshot::Receiver<Result<Summary>>,
    batch: Vec<Vec<u8>>,
    batch_bytes: usize,
}

impl AsyncWriter {
    /// Starts the file (see [`Writer::create`]).
    pub async fn create(
        path: &Path,
        header: Header,
        recipients: Recipients,
    ) -> Result<AsyncWriter> {
        let (tx, mut rx) = mpsc::channel::<Msg>(DEPTH);
        let (done_tx, done) = oneshot::channel();
        let (ready_tx, ready) = oneshot::channel();
        let path = path.to_owned();
        std::thread::Builder::new()
            .name("backup-writer".into())
            .spawn(move || {
                let mut writer = match Writer::create(&path, &header, &recipients) {
                    Ok(w) => {
                        let _ = ready_tx.send(Ok(()));
                        w
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let result = loop {
                    match rx.blocking_recv() {
                        Some(Msg::Records(records)) => {
                            if let Err(e) = records.iter().try_for_each(|r| writer.write_record(r))
                            {
                                break Err(e);
                            }
                        }
                        Some(Msg::Finish) => break writer.finish(),
                        // Dropped without finishing: the writer removes its file.
                        None => return,
                    }
                };
                let _ = done_tx.send(result);
            })
            .map_err(Error::io("starting the backup writer thread".into()))?;
        ready.await.map_err(|_| Error::Finished)??;
        Ok(AsyncWriter {
            tx,
            done,
            batch: Vec::new(),
            batch_bytes: 0,
        })
    }

    /// Appends one record (batched; sent to the file thread every 256 KiB).
    pub async fn write_record(&mut self, record: Vec<u8>) -> Result<()> {
        self.batch_bytes += record.len();
        self.batch.push(record);
        if self.batch_bytes >= 256 * 1024 {
            self.flush().await?;
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<()> {
        if self.batch.is_empty() {
            return Ok(());
        }
        self.batch_bytes = 0;
        let batch = std::mem::take(&mut self.batch);
        if self.tx.send(Msg::Records(batch)).await.is_err() {
            // The thread stopped on an error: report it.
            return Err(self.failure().await);
        }
        Ok(())
    }

    async fn failure(&mut self) -> Error {
        match (&mut self.done).await {
            Ok(Err(e)) => e,
            _ => Error::Finished,
        }
    }

    /// Finishes the file (see [`Writer::finish`]).
    pub async fn finish(mut self) -> Result<Summary> {
        self.flush().await?;
        if self.tx.send(Msg::Finish).await.is_err() {
            return Err(self.failure().await);
        }
        self.done.await.map_err(|_| Error::Finished)?
    }
}

/// A [`Reader`] on its own thread, reading ahead.
pub struct AsyncReader {
    rx: mpsc::Receiver<Result<Vec<Vec<u8>>>>,
    header: Header,
    pending: std::vec::IntoIter<Vec<u8>>,
    done: bool,
}

impl AsyncReader {
    /// Opens the file (see [`Reader::open`]).
    pub async fn open(path: &Path, identities: Identities) -> Result<AsyncReader> {
        let (tx, rx) = mpsc::channel(DEPTH);
        let (header_tx, header_rx) = oneshot::channel();
        let path = path.to_owned();
        std::thread::Builder::new()
            .name("backup-reader".into())
            .spawn(move || {
                let mut reader = match Reader::open(&path, &identities) {
                    Ok(r) => {
                        let _ = header_tx.send(Ok(r.header().clone()));
                        r
                    }
                    Err(e) => {
                        let _ = header_tx.send(Err(e));
                        return;
                    }
                };
                drop(identities);
                loop {
                    let mut batch = Vec::new();
                    let mut bytes = 0;
                    let end = loop {
                        match reader.next_record() {
                            Ok(Some(record)) => {
                                bytes += record.len();
                                batch.push(record);
                                if bytes >= 256 * 1024 {
                                    break Ok(false);
                                }
                            }
                            Ok(None) => break Ok(true),
                            Err(e) => break Err(e),
                        }
                    };
                    match end {
                        Ok(end) => {
                            if tx.blocking_send(Ok(batch)).is_err() {
                                return;
                            }
                            if end {
                                let _ = tx.blocking_send(Ok(Vec::new()));
                                return;
                            }
                        }
                        Err(e) => {
                            let _ = tx.blocking_send(Err(e));
                            return;
                        }
                    }
                }
            })
            .map_err(Error::io("starting the backup reader thread".into()))?;
        let header = header_rx.await.map_err(|_| Error::Finished)??;
        Ok(AsyncReader {
            rx,
            header,
            pending: Vec::new().into_iter(),
            done: false,
        })
    }

    /// The encrypted header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The next record; `None` only after the trailer checked out (see
    /// [`Reader::next_record`]).
    pub async fn next_record(&mut self) -> Result<Option<Vec<u8>>> {
        loop {
            if let Some(record) = self.pending.next() {
                return Ok(Some(record));
            }
            if self.done {
                return Ok(None);
            }
            match self.rx.recv().await {
                // An empty batch marks the verified end.
                Some(Ok(batch)) if batch.is_empty() => self.done = true,
                Some(Ok(batch)) => self.pending = batch.into_iter(),
                Some(Err(e)) => return Err(e),
                None => return Err(Error::Finished),
            }
        }
    }
}
