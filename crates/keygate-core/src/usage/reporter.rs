//! Usage reporting as a state machine that a host drives, one per Envoy process: on every tick
//! ([`Reporter::on_tick`], with the counts its workers gathered since the last one) and on every
//! answer of the receiver ([`Reporter::on_answer`]). It reaches the host only through [`Post`],
//! and tells it what happened through a [`Sink`] of [`Event`]s.
//!
//! Once a flush interval, the counts gathered become one report (the JSON of a
//! [`Report`](crate::usage::Report)), sent as one POST. A POST that fails (a 5xx, 408 or 429,
//! another status that is not 2xx or 4xx, no answer, no answer in time) is sent again, the very
//! same body under the same `batch_id`, after a wait doubling from 1 s up to the flush interval,
//! until the receiver takes it; the counts that arrive meanwhile wait in the next report. A report
//! the receiver refuses for good (any other 4xx: it will never take that body) is dropped, its
//! requests counted as dropped, so that it cannot hold up reporting. One report is in flight at a
//! time, so a receiver that is down costs one POST per retry, and at most two tallies of
//! `max_pending_keys` ids are held: the report waiting and the counts after it.
//! An interval in which nothing was counted sends nothing: the next report covers it.

use crate::live::host::{Answer, Sink};
use crate::usage::report::{batch_id, clip_node, write_json, Head};
use crate::usage::settings::UsageConfig;
use crate::usage::tally::Tally;
use std::fmt;

/// HTTP POSTs to the receiver.
pub trait Post {
    /// Sends `body` with `headers` (`:method`, `:path`, `:authority`, `content-type`) to `cluster`,
    /// to be answered within `timeout_ms`; returns the token its answer will carry.
    fn post(&self, cluster: &str, headers: &[(&str, &str)], body: &[u8], timeout_ms: u64) -> Result<u32, String>;
}

/// What the reporter tells its host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The receiver took report `batch_id`, with `keys` key entries.
    Sent { batch_id: String, keys: usize },
    /// A POST of report `batch_id` failed; it is sent again in `retry_in_ms`.
    Failed { batch_id: String, reason: String, retry_in_ms: u64 },
    /// `requests` more requests were counted under no key: `usage.max_pending_keys` was reached.
    Dropped { requests: u64 },
    /// The receiver refused report `batch_id` for good (HTTP `status`, a 4xx other than 408 and
    /// 429): it is not sent again, and its `requests` are counted as dropped.
    Refused { batch_id: String, status: u16, requests: u64 },
    /// `requests` counted will be in no report, for the reason `why` (a VM's reporter stopped
    /// while it was sending one, say: [`Worker`](crate::usage::Worker)); counted as dropped.
    Abandoned { requests: u64, why: String },
    /// Shared data refused a read or a write ([`Worker`](crate::usage::Worker)); the counts wait
    /// for the next tick.
    Trouble(String),
}

/// Whether an HTTP `status` refuses a report for good: a 4xx, but for 408 (Request Timeout) and
/// 429 (Too Many Requests), which ask for the same request later. Sending the same body again would
/// get the same answer, forever.
pub fn refused_for_good(status: u16) -> bool {
    (400..=499).contains(&status) && status != 408 && status != 429
}

/// The host's log line of an event, after `keygate: `. No line holds a key: at most a key count.
impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Event::Sent { batch_id, keys } => write!(f, "usage report {batch_id} sent, {keys} keys"),
            Event::Failed { batch_id, reason, retry_in_ms } => {
                write!(f, "usage report {batch_id} not sent: {reason}; retrying in {retry_in_ms} ms")
            }
            Event::Dropped { requests } => {
                write!(f, "usage: {requests} requests counted under no key: usage.max_pending_keys keys are pending")
            }
            Event::Refused { batch_id, status, requests } => write!(
                f,
                "usage report {batch_id} refused by the receiver (HTTP status {status}): not sent again, \
                 its {requests} requests counted as dropped"
            ),
            Event::Abandoned { requests, why } => {
                write!(f, "usage: {requests} requests counted as dropped: {why}")
            }
            Event::Trouble(reason) => write!(f, "usage: {reason}"),
        }
    }
}

/// What the host shows of usage reporting (stats `keygate.usage.*`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Reports the receiver took (a counter).
    pub reports_sent: u64,
    /// POSTs that failed, each retry counted (a counter).
    pub failures: u64,
    /// Requests counted under no key because the bound was reached, and those of reports the
    /// receiver refused for good (a counter).
    pub dropped: u64,
    /// Key entries not yet taken by the receiver: in the report being sent and in the counts after
    /// it (a gauge; a key in both counts twice).
    pub keys_pending: u64,
}

/// The report being sent.
#[derive(Debug)]
struct Batch {
    id: String,
    body: Vec<u8>,
    keys: usize,
    /// Every request it counts, dropped ones included.
    requests: u64,
    /// Failed POSTs of it in a row.
    failures: u32,
    attempt: Attempt,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Attempt {
    /// Posted, and waiting for the answer carrying `token` since `since_ms`.
    InFlight { token: u32, since_ms: i64 },
    /// To be posted (again) at `at_ms`.
    Waiting { at_ms: i64 },
}

/// One process's usage reporting.
#[derive(Debug)]
pub struct Reporter {
    config: UsageConfig,
    node: String,
    epoch_ms: i64,
    /// This reporter's number among its process's ([`batch_id`]).
    number: u32,
    /// The number of the last report made.
    sequence: u64,
    /// The counts gathered since the last report was made.
    next: Tally,
    /// Where the next report's interval starts (wall-clock Unix seconds), from the first tick on.
    from_s: Option<i64>,
    /// When the next report is due (monotonic milliseconds), from the first tick on.
    due_ms: Option<i64>,
    batch: Option<Batch>,
    stats: Stats,
}

impl Reporter {
    /// The reporter of Envoy node `node` (cut to [`MAX_NODE_BYTES`](crate::usage::MAX_NODE_BYTES);
    /// empty when unknown), created at wall-clock Unix milliseconds `epoch_ms`, numbered `number`
    /// (no other reporter of the process may have it: a wasm host's VM number, say): its reports'
    /// `batch_id`s are `<node>/<epoch_ms>-<number>/<n>` ([`batch_id`]).
    pub fn new(config: UsageConfig, node: &str, epoch_ms: i64, number: u32) -> Self {
        let next = config.tally(0);
        Reporter {
            node: clip_node(node).to_string(),
            config,
            epoch_ms,
            number,
            sequence: 0,
            next,
            from_s: None,
            due_ms: None,
            batch: None,
            stats: Stats::default(),
        }
    }

    pub fn config(&self) -> &UsageConfig {
        &self.config
    }

    /// The `batch_id` of the report being sent, if one is.
    pub fn sending(&self) -> Option<&str> {
        self.batch.as_ref().map(|b| b.id.as_str())
    }

    /// Whether every count handed over was taken by the receiver: no report is being sent and
    /// nothing was gathered since the last one.
    pub fn idle(&self) -> bool {
        self.batch.is_none() && self.next.is_empty()
    }

    pub fn stats(&self) -> Stats {
        let in_batch = self.batch.as_ref().map_or(0, |b| b.keys);
        Stats { keys_pending: (in_batch + self.next.len()) as u64, ..self.stats }
    }

    /// Stops this reporter: the counts gathered for the next report, and the `batch_id` and
    /// request count of the report being sent, if one is (which will not be sent again).
    pub fn into_pending(self) -> (Tally, Option<(String, u64)>) {
        (self.next, self.batch.map(|b| (b.id, b.requests)))
    }

    /// Every tick, at monotonic `now_ms` and wall-clock Unix seconds `now_s`, with the `counts`
    /// the workers gathered since the last tick: keeps them for the next report; gives up on a POST
    /// unanswered past `timeout_ms` and a second; sends again a report whose wait is over; and,
    /// when the flush interval is due and no report is being sent, makes the next report and sends
    /// it.
    pub fn on_tick(&mut self, now_ms: i64, now_s: i64, counts: Tally, post: &dyn Post, sink: &mut dyn Sink<Event>) {
        let before = self.next.dropped();
        self.next.merge(counts);
        let dropped = self.next.dropped().saturating_sub(before);
        if dropped > 0 {
            self.stats.dropped = self.stats.dropped.saturating_add(dropped);
            sink.report(Event::Dropped { requests: dropped });
        }
        let interval = i64::try_from(self.config.flush_interval_ms).unwrap_or(i64::MAX);
        let from_s = *self.from_s.get_or_insert(now_s);
        let due_ms = *self.due_ms.get_or_insert(now_ms.saturating_add(interval));
        let silence = i64::try_from(self.config.silence_limit_ms()).unwrap_or(i64::MAX);
        match self.batch.as_ref().map(|b| b.attempt) {
            Some(Attempt::InFlight { since_ms, .. }) if now_ms.saturating_sub(since_ms) > silence => {
                let reason = format!("no answer within {} ms", self.config.timeout_ms);
                self.fail(now_ms, reason, sink);
            }
            Some(Attempt::Waiting { at_ms }) if now_ms >= at_ms => self.send(now_ms, post, sink),
            Some(_) => {}
            None if now_ms >= due_ms => {
                // Keep the pace, unless the reporter fell a whole interval behind (a report took
                // long to go through): then an interval from now.
                let next_due = due_ms.saturating_add(interval);
                self.due_ms = Some(if next_due > now_ms { next_due } else { now_ms.saturating_add(interval) });
                if !self.next.is_empty() {
                    self.make_report(from_s, now_s);
                    self.send(now_ms, post, sink);
                }
            }
            None => {}
        }
    }

    /// An answer carrying `token`, at monotonic `now_ms`; returns whether it was this reporter's
    /// (an answer of a POST given up on is not, and is dropped). 2xx: the report is sent; a 4xx
    /// other than 408 and 429 ([`refused_for_good`]): the report is dropped; any other status, or
    /// none, fails the POST, which goes again.
    pub fn on_answer(&mut self, now_ms: i64, token: u32, answer: &dyn Answer, sink: &mut dyn Sink<Event>) -> bool {
        let awaited =
            self.batch.as_ref().is_some_and(|b| matches!(b.attempt, Attempt::InFlight { token: t, .. } if t == token));
        if !awaited {
            return false;
        }
        match answer.status() {
            200..=299 => {
                if let Some(batch) = self.batch.take() {
                    self.stats.reports_sent = self.stats.reports_sent.saturating_add(1);
                    sink.report(Event::Sent { batch_id: batch.id, keys: batch.keys });
                }
            }
            status if refused_for_good(status) => {
                if let Some(batch) = self.batch.take() {
                    self.stats.dropped = self.stats.dropped.saturating_add(batch.requests);
                    sink.report(Event::Refused { batch_id: batch.id, status, requests: batch.requests });
                }
            }
            0 => self.fail(now_ms, "no answer (down, refused or timed out)".into(), sink),
            status => self.fail(now_ms, format!("HTTP status {status}"), sink),
        }
        true
    }

    /// Makes the next report of the counts gathered, covering `from_s` to `now_s`.
    fn make_report(&mut self, from_s: i64, now_s: i64) {
        self.sequence = self.sequence.saturating_add(1);
        let to_s = now_s.max(from_s);
        let id = batch_id(&self.node, self.epoch_ms, self.number, self.sequence);
        let counts = self.next.take();
        let head = Head { batch_id: &id, node: &self.node, from_s, to_s };
        let body = write_json(&head, counts.keys(), counts.unattributed(), counts.dropped());
        self.from_s = Some(to_s);
        let (keys, requests) = (counts.len(), counts.requests());
        let attempt = Attempt::Waiting { at_ms: 0 };
        self.batch = Some(Batch { id, body, keys, requests, failures: 0, attempt });
    }

    fn send(&mut self, now_ms: i64, post: &dyn Post, sink: &mut dyn Sink<Event>) {
        let Some(batch) = self.batch.as_mut() else { return };
        let c = &self.config;
        let headers = [
            (":method", "POST"),
            (":path", c.path.as_str()),
            (":authority", c.authority.as_str()),
            ("content-type", "application/json"),
        ];
        match post.post(&c.cluster, &headers, &batch.body, c.timeout_ms) {
            Ok(token) => batch.attempt = Attempt::InFlight { token, since_ms: now_ms },
            Err(reason) => self.fail(now_ms, reason, sink),
        }
    }

    /// The POST of the report being sent failed: it waits, then goes again.
    fn fail(&mut self, now_ms: i64, reason: String, sink: &mut dyn Sink<Event>) {
        let Some(batch) = self.batch.as_mut() else { return };
        batch.failures = batch.failures.saturating_add(1);
        self.stats.failures = self.stats.failures.saturating_add(1);
        let retry_in_ms = self.config.retry_after_ms(batch.failures);
        let at_ms = now_ms.saturating_add(i64::try_from(retry_in_ms).unwrap_or(i64::MAX));
        batch.attempt = Attempt::Waiting { at_ms };
        sink.report(Event::Failed { batch_id: batch.id.clone(), reason, retry_in_ms });
    }
}
