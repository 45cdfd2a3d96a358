//! The ZDS client: connects to the node agent's socket, says hello, applies each request
//! through the state manager and acks it; reconnects with exponential backoff.
//!
//! A bad message gets an error ack and the stream carries on (datagrams keep their
//! boundaries, so one bad message cannot desynchronise the next). Only a broken
//! connection ends the stream, and then ztunnel reconnects: it never exits over the
//! agent's behaviour, and running proxies keep serving meanwhile.

use std::path::PathBuf;
use std::time::Duration;

use protocol::message::encode_hello;
use protocol::{Ack, Error, Request, SeqpacketConn, PROTOCOL_VERSION};
use tracing::{debug, info, warn};

use super::statemanager::StateManager;

const BACKOFF_FIRST: Duration = Duration::from_millis(10);
const BACKOFF_MAX: Duration = Duration::from_secs(15);

pub struct WorkloadProxyManager {
    uds: PathBuf,
    state: StateManager,
    timeout: Duration,
    /// Connect only once this is true: the mesh state is ready (Istio's ztunnel waits
    /// for its first xDS state before taking pods).
    gate: Option<tokio::sync::watch::Receiver<bool>>,
}

impl WorkloadProxyManager {
    pub fn new(uds: PathBuf, state: StateManager, timeout: Duration) -> Self {
        WorkloadProxyManager {
            uds,
            state,
            timeout,
            gate: None,
        }
    }

    /// Waits for `ready` before connecting to the agent.
    pub fn after(mut self, ready: tokio::sync::watch::Receiver<bool>) -> Self {
        self.gate = Some(ready);
        self
    }

    /// Runs forever: connect, serve the stream, back off, reconnect.
    pub async fn run(mut self) {
        if let Some(gate) = self.gate.as_mut() {
            if !*gate.borrow() {
                info!("waiting for the mesh state before connecting to the agent");
            }
            // A closed gate (its sender gone) never opens: stay disconnected.
            if gate.wait_for(|ready| *ready).await.is_err() {
                std::future::pending::<()>().await;
            }
        }
        let mut backoff = BACKOFF_FIRST;
        loop {
            match SeqpacketConn::connect(&self.uds).await {
                Ok(conn) => {
                    info!("handling new stream");
                    match self.serve(conn, &mut backoff).await {
                        Err(Error::Closed) => {
                            info!("the agent closed the ZDS stream; reconnecting")
                        }
                        Err(e) => warn!("ZDS stream ended: {e}; reconnecting"),
                        Ok(()) => {}
                    }
                }
                Err(e) => debug!("cannot reach the agent at {}: {e}", self.uds.display()),
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    async fn serve(&self, conn: SeqpacketConn, backoff: &mut Duration) -> Result<(), Error> {
        if let Err(e) = conn
            .send_timeout(&encode_hello(PROTOCOL_VERSION), None, self.timeout)
            .await
        {
            warn!("the agent closed the stream before our hello: it refuses this peer (wrong user?) or is shutting down");
            return Err(e);
        }
        self.state.new_connection().await;
        let mut received = 0u64;
        loop {
            let request = match conn.recv().await {
                Ok(d) => Request::decode(d),
                Err(Error::Closed) if received == 0 => {
                    warn!(
                        "the agent closed the stream right after our hello: it may not speak \
                         ZDS version {PROTOCOL_VERSION:?} (its log says; run istio-cni and \
                         ztunnel from one release)"
                    );
                    return Err(Error::Closed);
                }
                Err(e) if e.is_fatal() => return Err(e),
                Err(e) => Err(e),
            };
            received += 1;
            if received == 1 {
                // The agent accepted our hello: the stream is healthy.
                *backoff = BACKOFF_FIRST;
            }
            let ack = match request {
                Ok(request) => {
                    let kind = request.kind();
                    self.state.handle(request).await.map_err(|e| {
                        warn!("{kind} failed: {e}");
                        e.to_string()
                    })
                }
                Err(e) => {
                    warn!("bad ZDS message from the agent: {e}");
                    Err(e.to_string())
                }
            };
            let ack = match ack {
                Ok(()) => Ack::Ok,
                Err(e) => Ack::Err(e),
            };
            conn.send_timeout(&ack.encode(), None, self.timeout).await?;
        }
    }
}
