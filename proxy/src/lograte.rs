//! Rate limiting of the log lines that traffic can cause.
//!
//! A refusal (a STRICT namespace, a policy denial, an egress refusal, a failed HBONE
//! handshake, a connection to sluice's own listener, a 403 of the admin API, ...) happens once
//! per connection or request, at whatever rate a client chooses. Logging each one would let any
//! pod fill the node's log (and, before the writer became non-blocking, stall the data path's
//! threads on a full stderr pipe). Every such line goes through the one [`LogLimiter`] of the
//! process ([`shared`]):
//!
//! - **per source and kind**: at most one line per [`PER_SOURCE_EVERY`] for a (kind, source)
//!   pair; the next line that is written says how many of that pair were suppressed since;
//! - **globally**: a token bucket ([`GLOBAL_PER_SECOND`], bursts of [`GLOBAL_BURST`]), so that
//!   many sources (an IPv6 client rotating its addresses, thousands of pods) cannot add up to
//!   an unbounded rate either;
//! - **bounded memory**: at most [`MAX_SOURCES`] pairs are remembered; beyond, the ones not
//!   seen for a period go, then the oldest half.
//!
//! Suppressed lines are counted ([`LogLimiter::suppressed`]: `log_lines_suppressed` in
//! `/status`, `sluice_log_lines_suppressed_total` on `/metrics`).

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Mutex, OnceLock,
    },
    time::{Duration, Instant},
};

/// A (kind, source) pair writes at most one line per this period.
pub const PER_SOURCE_EVERY: Duration = Duration::from_secs(10);
/// Lines per second over all sources, sustained...
pub const GLOBAL_PER_SECOND: u32 = 20;
/// ...and in a burst.
pub const GLOBAL_BURST: u32 = 100;
/// (kind, source) pairs remembered.
pub const MAX_SOURCES: usize = 4096;

/// The process's limiter, shared by every refusal log.
pub fn shared() -> &'static LogLimiter {
    static SHARED: OnceLock<LogLimiter> = OnceLock::new();
    SHARED.get_or_init(LogLimiter::default)
}

/// The key for a source known only by its address: IPv6 addresses are taken by their /64 (a
/// host picks any address of its /64 at will, so one client would otherwise be an unbounded
/// number of sources).
pub fn source_of_ip(ip: IpAddr) -> String {
    match ip.to_canonical() {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => {
            let s = v6.segments();
            format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
        }
    }
}

pub struct LogLimiter {
    per_source_every: Duration,
    per_second: f64,
    burst: f64,
    max_sources: usize,
    state: Mutex<State>,
    suppressed: AtomicU64,
}

struct State {
    tokens: f64,
    refilled: Instant,
    /// kind → source → (last line written, lines suppressed since).
    sources: HashMap<&'static str, HashMap<Box<str>, (Instant, u64)>>,
    /// Pairs in `sources`.
    len: usize,
}

impl State {
    fn retain(&mut self, mut keep: impl FnMut(Instant) -> bool) {
        let mut len = 0;
        self.sources.retain(|_, m| {
            m.retain(|_, (at, _)| keep(*at));
            len += m.len();
            !m.is_empty()
        });
        self.len = len;
    }
}

impl Default for LogLimiter {
    fn default() -> Self {
        Self::new(PER_SOURCE_EVERY, GLOBAL_PER_SECOND, GLOBAL_BURST, MAX_SOURCES)
    }
}

impl LogLimiter {
    pub fn new(per_source_every: Duration, per_second: u32, burst: u32, max_sources: usize) -> Self {
        Self {
            per_source_every,
            per_second: f64::from(per_second),
            burst: f64::from(burst.max(1)),
            max_sources: max_sources.max(1),
            state: Mutex::new(State {
                tokens: f64::from(burst.max(1)),
                refilled: Instant::now(),
                sources: HashMap::new(),
                len: 0,
            }),
            suppressed: AtomicU64::new(0),
        }
    }

    /// Whether a line of `kind` for `source` may be written now. `Some(n)`: write it, saying
    /// that `n` lines of this pair were suppressed since its last one; `None`: do not (counted).
    pub fn allow(&self, kind: &'static str, source: &str) -> Option<u64> {
        self.allow_at(kind, source, Instant::now())
    }

    fn allow_at(&self, kind: &'static str, source: &str, now: Instant) -> Option<u64> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let elapsed = now.saturating_duration_since(st.refilled).as_secs_f64();
        st.tokens = (st.tokens + elapsed * self.per_second).min(self.burst);
        st.refilled = now;
        // A borrowed lookup first: the common case (a known, recent source) allocates nothing.
        let every = self.per_source_every;
        let recent = st
            .sources
            .get_mut(kind)
            .and_then(|m| m.get_mut(source))
            .filter(|(at, _)| now.saturating_duration_since(*at) < every);
        if let Some((_, count)) = recent {
            *count += 1;
            drop(st);
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        if st.tokens < 1.0 {
            // Over the global rate: counted against the pair, reported on its next line. A
            // pair first seen now is dated a period back, so that it may write as soon as
            // there is a token.
            self.entry(&mut st, kind, source, now.checked_sub(every).unwrap_or(now)).1 += 1;
            drop(st);
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        st.tokens -= 1.0;
        let e = self.entry(&mut st, kind, source, now);
        let suppressed = e.1;
        *e = (now, 0);
        Some(suppressed)
    }

    /// The pair's entry, made (dated `at`) if missing, within the table's bound.
    fn entry<'a>(
        &self,
        st: &'a mut State,
        kind: &'static str,
        source: &str,
        at: Instant,
    ) -> &'a mut (Instant, u64) {
        let known = st.sources.get(kind).is_some_and(|m| m.contains_key(source));
        if !known && st.len >= self.max_sources {
            let every = self.per_source_every;
            let now = st.refilled;
            st.retain(|seen| now.saturating_duration_since(seen) < every);
            if st.len >= self.max_sources {
                let mut ages: Vec<Instant> =
                    st.sources.values().flat_map(|m| m.values().map(|(at, _)| *at)).collect();
                ages.sort_unstable();
                let cut = ages[ages.len() / 2];
                st.retain(|seen| seen > cut);
            }
        }
        if !known {
            st.len += 1;
        }
        st.sources.entry(kind).or_default().entry(source.into()).or_insert((at, 0))
    }

    /// Lines not written since the start.
    pub fn suppressed(&self) -> u64 {
        self.suppressed.load(Ordering::Relaxed)
    }

    /// (kind, source) pairs remembered.
    pub fn sources(&self) -> usize {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).len
    }
}

/// Lines the non-blocking log writer dropped because its queue was full (stderr did not keep
/// up), set once the writer is installed (`main`).
static WRITER_DROPS: OnceLock<tracing_appender::non_blocking::ErrorCounter> = OnceLock::new();

/// Lines the log writer may hold while its output is slow; beyond, lines are dropped and
/// counted. A few MB at most (a line is a few hundred bytes).
pub const WRITER_QUEUE_LINES: usize = 16_384;

/// The process's log writer over `out`: a bounded queue and a thread of its own, so that a
/// data-path thread never waits on a slow or stalled output (a full stderr pipe when the log
/// collector stalls); when the queue is full a line is dropped and counted ([`dropped_lines`]).
/// The guard flushes what is queued when dropped: hold it until the process ends.
pub fn writer<W: std::io::Write + Send + 'static>(
    out: W,
) -> (tracing_appender::non_blocking::NonBlocking, tracing_appender::non_blocking::WorkerGuard) {
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(WRITER_QUEUE_LINES)
        .thread_name("sluice-log")
        .finish(out);
    let _ = WRITER_DROPS.set(writer.error_counter());
    (writer, guard)
}

/// Log lines the writer dropped (0 when no lossy writer is installed).
pub fn dropped_lines() -> u64 {
    WRITER_DROPS.get().map_or(0, |c| c.dropped_lines() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ten_thousand_refusals_make_a_bounded_number_of_lines_and_count_the_rest() {
        let l = LogLimiter::default();
        let t0 = Instant::now();
        let mut lines = 0u64;
        let mut reported = 0u64;
        // 10 000 refusals from one source over 60 s (one every 6 ms).
        for i in 0..10_000u64 {
            let now = t0 + Duration::from_millis(i * 6);
            if let Some(n) = l.allow_at("strict", "10.0.0.1", now) {
                lines += 1;
                reported += n;
            }
        }
        // One line per 10 s: at 0, 10, 20, 30, 40, 50 s.
        assert_eq!(lines, 6);
        assert_eq!(l.suppressed(), 10_000 - lines);
        // Each line said how many were suppressed before it; the rest are the tail since the
        // last line, to be reported by the next one.
        let tail = 10_000 - lines - reported;
        assert!(tail < 10_000 / 6, "{tail}");
        assert_eq!(l.allow_at("strict", "10.0.0.1", t0 + Duration::from_secs(70)), Some(tail));
    }

    #[test]
    fn many_sources_are_held_to_the_global_rate() {
        let l = LogLimiter::default();
        let t0 = Instant::now();
        // 10 000 refusals from 10 000 different sources within one second.
        let lines = (0..10_000u64)
            .filter(|i| {
                l.allow_at("policy", &format!("src-{i}"), t0 + Duration::from_micros(i * 100)).is_some()
            })
            .count() as u64;
        // The burst plus one second's worth, at most.
        assert!(lines <= u64::from(GLOBAL_BURST + GLOBAL_PER_SECOND), "{lines}");
        assert!(lines >= u64::from(GLOBAL_BURST), "{lines}");
        assert_eq!(l.suppressed(), 10_000 - lines);
        assert!(l.sources() <= MAX_SOURCES, "the table is bounded: {}", l.sources());
        // The bucket refills: a minute later a new source writes again.
        assert_eq!(l.allow_at("policy", "late", t0 + Duration::from_secs(60)), Some(0));
    }

    #[test]
    fn a_source_suppressed_by_the_global_rate_reports_it_on_its_next_line() {
        let l = LogLimiter::new(Duration::from_secs(10), 1, 1, 16);
        let t0 = Instant::now();
        assert_eq!(l.allow_at("k", "a", t0), Some(0));
        // The bucket is empty: b's first line is suppressed, and counted for b.
        assert_eq!(l.allow_at("k", "b", t0), None);
        assert_eq!(l.allow_at("k", "b", t0 + Duration::from_secs(2)), Some(1));
    }

    #[test]
    fn kinds_are_limited_apart() {
        let l = LogLimiter::default();
        let t0 = Instant::now();
        assert_eq!(l.allow_at("strict", "10.0.0.1", t0), Some(0));
        assert_eq!(l.allow_at("policy", "10.0.0.1", t0), Some(0));
        assert_eq!(l.allow_at("strict", "10.0.0.1", t0), None);
    }

    #[test]
    fn the_source_table_stays_bounded_when_every_source_is_recent() {
        let l = LogLimiter::new(Duration::from_secs(10), 1_000_000, 1_000_000, 64);
        let t0 = Instant::now();
        for i in 0..1000u64 {
            let _ = l.allow_at("k", &format!("s{i}"), t0 + Duration::from_millis(i));
            assert!(l.sources() <= 64);
        }
    }

    /// An output that blocks until told otherwise (a stalled log collector).
    struct Stalled(std::sync::mpsc::Receiver<()>);

    impl std::io::Write for Stalled {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let _ = self.0.recv();
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_stalled_log_output_never_blocks_the_writer_and_drops_are_counted() {
        use std::io::Write;
        let (release, stalled) = std::sync::mpsc::channel();
        let (mut w, guard) = writer(Stalled(stalled));
        let started = Instant::now();
        let lines = WRITER_QUEUE_LINES + 10_000;
        for i in 0..lines {
            w.write_all(format!("line {i}\n").as_bytes()).unwrap();
        }
        // Without the queue, the first write would have blocked forever.
        assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
        let dropped = dropped_lines();
        // The queue holds its lines and the writer thread one more (blocked in the output).
        assert!(dropped >= 10_000 - 1 && dropped <= lines as u64, "{dropped}");
        drop(release); // the output lets go: the guard can flush and end
        drop(guard);
    }

    #[test]
    fn ipv6_sources_are_keyed_by_their_64() {
        let a: IpAddr = "fd00:10:244:1::12".parse().unwrap();
        let b: IpAddr = "fd00:10:244:1:dead:beef:1:2".parse().unwrap();
        assert_eq!(source_of_ip(a), source_of_ip(b));
        assert_ne!(source_of_ip(a), source_of_ip("fd00:10:244:2::12".parse().unwrap()));
        assert_eq!(source_of_ip("::ffff:10.0.0.1".parse().unwrap()), "10.0.0.1");
    }
}
