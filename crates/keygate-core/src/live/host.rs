//! What a host provides to the key-set sync, and what the sync tells it: the traits it runs
//! against ([`Store`] besides: an HTTP [`Fetch`], a monotonic [`Clock`],
//! an [`Answer`] whose body is read only on demand) and the [`Event`]s it reports to a [`Sink`].

use crate::live::store::Store;
use std::fmt;

/// HTTP requests to the key-set endpoint.
pub trait Fetch {
    /// Sends a request with `headers` (`:method`, `:path`, `:authority`, maybe `if-none-match`) to
    /// `cluster`, to be answered within `timeout_ms`; returns the token its answer will carry.
    fn get(&self, cluster: &str, headers: &[(&str, &str)], timeout_ms: u64) -> Result<u32, String>;
}

/// The host's monotonic clock, one for every VM of the process (Envoy's steady clock).
pub trait Clock {
    /// Milliseconds on the monotonic clock; `None` when the host cannot tell.
    fn monotonic_ms(&self) -> Option<i64>;
}

/// One answer of the key-set endpoint. Its body is asked for only once the sync expects the answer,
/// has accepted its announced size and needs the bytes, so a body past its limit (or one for a sync
/// already abandoned) is never copied.
pub trait Answer {
    /// The HTTP status; 0 when no answer came (refused, reset or timed out).
    fn status(&self) -> u16;
    /// The `ETag` header.
    fn etag(&self) -> Option<String>;
    fn body(&self) -> Vec<u8>;
}

/// The host calls a sync makes.
#[derive(Clone, Copy)]
pub struct Host<'a> {
    pub store: &'a dyn Store,
    pub fetch: &'a dyn Fetch,
    pub clock: &'a dyn Clock,
}

/// What the host shows of the live set (stats `keygate.key_set.*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gauges {
    /// Since the last good sync, or since this VM was configured when none has happened.
    pub seconds_since_sync: u64,
    /// The loaded set, once there is one.
    pub loaded: Option<LoadedSet>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadedSet {
    /// The version when it is all digits, else 0.
    pub version: u64,
    pub keys: u64,
}

/// What the sync tells its host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Refreshed gauges: on every tick, and after every good sync.
    Gauges(Gauges),
    /// A good sync (an unchanged `304` included). `shards` is `None` when the manifest was unchanged.
    Synced { version: String, shards: Option<usize>, changed: bool },
    /// A sync failed and was abandoned; the set that was serving keeps serving.
    Failed { reason: String, keeping: Option<String>, next_try_ms: i64 },
    /// A sync was dropped unapplied: while it ran (this VM stalled, say), the lease moved to VM
    /// `holder`, which polls now.
    Abandoned { holder: u32 },
    /// The lease could not be taken or renewed (the store refused).
    LeaseTrouble(String),
    /// The next poll could not be scheduled (the store refused).
    ScheduleTrouble(String),
}

/// The host's log line of an event, after `keygate: `. No line holds a key: at most a key id.
impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Event::Gauges(g) => write!(f, "key set: {} s since the last sync", g.seconds_since_sync),
            Event::Synced { version, shards: None, .. } => write!(f, "key set version {version} unchanged"),
            Event::Synced { version, shards: Some(n), .. } => {
                write!(f, "key set version {version} loaded, {n} shards fetched")
            }
            Event::Failed { reason, keeping, next_try_ms } => {
                write!(f, "key-set sync failed: {reason}; keeping ")?;
                match keeping {
                    Some(version) => write!(f, "version {version}")?,
                    None => f.write_str("none loaded yet")?,
                }
                write!(f, "; next try in {next_try_ms} ms")
            }
            Event::Abandoned { holder } => {
                write!(f, "key-set sync dropped: the lease moved to VM {holder} while it ran")
            }
            Event::LeaseTrouble(reason) => write!(f, "cannot take the key-set lease: {reason}"),
            Event::ScheduleTrouble(reason) => write!(f, "cannot schedule the next key-set poll: {reason}"),
        }
    }
}

/// Where the sync's events go (and usage reporting's, [`crate::usage::Event`]): the host's logs and
/// stats, a list in tests.
pub trait Sink<E = Event> {
    fn report(&mut self, event: E);
}

impl<E, F: FnMut(E)> Sink<E> for F {
    fn report(&mut self, event: E) {
        self(event);
    }
}
