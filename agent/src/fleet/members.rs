//! The etcd members, one client each, tried in turn. (etcd-client's balanced channel
//! hands a request to a member that is down as readily as to one that is up, and the
//! request fails; a fleet must keep working while any quorum of members answers.)

use std::{
    future::Future,
    sync::atomic::{AtomicUsize, Ordering},
};

use etcd_client::{Client, ConnectOptions, KvClient, WatchClient};

/// Largest response accepted: a snapshot page, or a watch catching up on many
/// revisions at once (tonic's default, 4 MiB, is a few hundred import batches).
const MAX_RESPONSE: usize = 256 << 20;

pub(super) struct Members {
    clients: Vec<Member>,
    /// The member that answered last; tried first.
    preferred: AtomicUsize,
}

impl Members {
    /// Clients for every endpoint. Nothing is dialled yet: connections are made on
    /// first use and again after failures. `bulk` is for snapshot pages: the same
    /// options with a longer request timeout.
    pub(super) async fn new(
        endpoints: &[String],
        options: &ConnectOptions,
        bulk: &ConnectOptions,
    ) -> Result<Self, etcd_client::Error> {
        let mut clients = Vec::with_capacity(endpoints.len());
        for endpoint in endpoints {
            let client = Client::connect([endpoint], Some(options.clone())).await?;
            let bulk = Client::connect([endpoint], Some(bulk.clone())).await?;
            clients.push(Member {
                endpoint: endpoint.clone(),
                kv: client.kv_client().max_decoding_message_size(MAX_RESPONSE),
                kv_bulk: bulk.kv_client().max_decoding_message_size(MAX_RESPONSE),
                watch: client
                    .watch_client()
                    .max_decoding_message_size(MAX_RESPONSE),
            });
        }
        Ok(Self {
            clients,
            preferred: AtomicUsize::new(0),
        })
    }

    /// Runs `op` on the preferred member, then on each other one in turn while it
    /// fails; the first to answer is preferred from then on. Every member's error
    /// otherwise. The fleet's writes are compare-and-swap: one that landed before its
    /// answer was lost fails its compare when tried again, and the caller then finds
    /// its own write in place (`Fleet::login` and the others check for that).
    pub(super) async fn call<T, F, Fut>(&self, op: F) -> Result<T, String>
    where
        F: Fn(KvClient) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        self.call_on(false, op).await
    }

    /// `call` for a large read (a snapshot page), with the longer timeout.
    pub(super) async fn call_bulk<T, F, Fut>(&self, op: F) -> Result<T, String>
    where
        F: Fn(KvClient) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        self.call_on(true, op).await
    }

    async fn call_on<T, F, Fut>(&self, bulk: bool, op: F) -> Result<T, String>
    where
        F: Fn(KvClient) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let first = self.preferred.load(Ordering::Relaxed);
        let mut errors = Vec::new();
        for k in 0..self.clients.len() {
            let i = (first + k) % self.clients.len();
            let member = &self.clients[i];
            let kv = if bulk { &member.kv_bulk } else { &member.kv };
            match op(kv.clone()).await {
                Ok(value) => {
                    self.preferred.store(i, Ordering::Relaxed);
                    return Ok(value);
                }
                Err(e) => errors.push(format!("{}: {}", member.endpoint, short(&e))),
            }
        }
        Err(errors.join("; "))
    }

    /// The preferred member and its client (for the watch, which stays on one).
    pub(super) fn preferred(&self) -> (usize, WatchClient) {
        let i = self.preferred.load(Ordering::Relaxed) % self.clients.len();
        (i, self.clients[i].watch.clone())
    }

    pub(super) fn endpoint(&self, i: usize) -> &str {
        &self.clients[i].endpoint
    }

    /// After member `i` failed the watch, prefer the next one.
    pub(super) fn avoid(&self, i: usize) {
        let _ = self.preferred.compare_exchange(
            i,
            (i + 1) % self.clients.len(),
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }
}

struct Member {
    endpoint: String,
    kv: KvClient,
    kv_bulk: KvClient,
    watch: WatchClient,
}

/// An error in a few words: gRPC statuses by their message and innermost cause
/// ("tcp connect error: Connection refused (os error 111)"), not their whole chain.
pub(super) fn short(e: &etcd_client::Error) -> String {
    match e {
        etcd_client::Error::GRpcStatus(status) => {
            let mut cause: Option<&dyn std::error::Error> = std::error::Error::source(status);
            let mut innermost = None;
            while let Some(c) = cause {
                innermost = Some(c);
                cause = c.source();
            }
            let message = status.message();
            match innermost.map(ToString::to_string) {
                Some(c) if message.is_empty() || message.contains(&c) => {
                    if message.is_empty() {
                        c
                    } else {
                        message.to_string()
                    }
                }
                Some(c) => format!("{message}: {c}"),
                None => format!("{:?}: {message}", status.code()),
            }
        }
        other => other.to_string(),
    }
}
