//! The parse worker: results within the budget, abandonment past it, the cap on abandoned
//! threads, and recovery when they end. Slow parses are jobs blocked on a channel the test
//! releases, so nothing depends on how fast the machine is; every wait has a deadline.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::discovery::parse_worker::{Outcome, ParseWorker};

/// How long an abandoned thread may take to end once released.
const DEADLINE: Duration = Duration::from_secs(10);

/// A worker whose abandoned threads say on the returned channel that they ended.
fn worker(budget: Duration, max_abandoned: usize) -> (ParseWorker<u32>, Receiver<()>) {
    let (tx, rx) = mpsc::channel();
    let tx = Mutex::new(tx);
    let worker = ParseWorker::new(
        budget,
        max_abandoned,
        Arc::new(move || {
            let _ = tx.lock().unwrap().send(());
        }),
    );
    (worker, rx)
}

/// A job that runs until its sender is used or dropped.
fn blocked(value: u32) -> (Sender<()>, impl FnOnce() -> u32 + Send + 'static) {
    let (release, wait) = mpsc::channel::<()>();
    (release, move || {
        let _ = wait.recv();
        value
    })
}

#[test]
fn parses_within_the_budget_return_their_result() {
    let (mut w, _ended) = worker(Duration::from_secs(5), 1);
    assert_eq!(w.run(|| 42), Outcome::Done(42));
    assert_eq!(w.run(|| 43), Outcome::Done(43), "the same worker takes the next job");
    assert_eq!(w.abandoned_running(), 0);
}

#[test]
fn a_parse_over_its_budget_is_abandoned_and_its_end_reported() {
    let budget = Duration::from_millis(100);
    let (mut w, ended) = worker(budget, 2);
    let (release, job) = blocked(1);
    let start = Instant::now();
    assert_eq!(w.run(job), Outcome::TimedOut(budget));
    let waited = start.elapsed();
    assert!(waited >= budget && waited < budget + Duration::from_secs(2), "waited {waited:?}");
    assert_eq!(w.abandoned_running(), 1);
    // The next parse gets a fresh thread at once.
    assert_eq!(w.run(|| 2), Outcome::Done(2));
    // The abandoned one ends when its parse does, and says so.
    release.send(()).unwrap();
    ended.recv_timeout(DEADLINE).expect("the abandoned thread reports its end");
    assert_eq!(w.abandoned_running(), 0);
}

#[test]
fn abandoned_threads_are_capped_and_parsing_resumes_when_one_ends() {
    let budget = Duration::from_millis(50);
    let (mut w, ended) = worker(budget, 2);
    let (release_1, job_1) = blocked(1);
    let (release_2, job_2) = blocked(2);
    assert_eq!(w.run(job_1), Outcome::TimedOut(budget));
    assert_eq!(w.run(job_2), Outcome::TimedOut(budget));
    // At the cap: nothing more starts (no thread, the job is never run), however many come.
    let ran = Arc::new(AtomicBool::new(false));
    for _ in 0..10 {
        let ran = ran.clone();
        assert_eq!(w.run(move || u32::from(ran.swap(true, Ordering::SeqCst))), Outcome::Busy(2));
    }
    assert!(!ran.load(Ordering::SeqCst), "a busy parse must not run");
    assert_eq!(w.abandoned_running(), 2);

    drop(release_1); // the first one ends
    ended.recv_timeout(DEADLINE).expect("the first abandoned thread reports its end");
    assert_eq!(w.abandoned_running(), 1);
    assert_eq!(w.run(|| 7), Outcome::Done(7));

    release_2.send(()).unwrap();
    ended.recv_timeout(DEADLINE).expect("the second abandoned thread reports its end");
    assert_eq!(w.abandoned_running(), 0);
}

#[test]
fn a_panicking_parse_is_reported_and_the_worker_goes_on() {
    let (mut w, _ended) = worker(Duration::from_secs(5), 1);
    assert_eq!(w.run(|| panic!("a parser bug")), Outcome::Failed("the parser panicked: a parser bug".into()));
    assert_eq!(w.run(|| 5), Outcome::Done(5));
    assert_eq!(w.abandoned_running(), 0);
}
