//! Runs parses on a worker thread, each bounded in time, so that the thread that receives file
//! events never parses and never waits on a parse for longer than its budget.
//!
//! A parse still running when its budget is up is abandoned: a thread cannot be stopped, so it
//! is left to finish, moved to the `SCHED_IDLE` CPU class (it only gets CPU nothing else wants),
//! and its result is dropped; the next parse gets a new thread. At most `max_abandoned` abandoned
//! threads may run at once: beyond that, parses are answered [`Outcome::Busy`] without starting,
//! and the caller retries them when `on_abandoned_exit` says one has ended. So slow inputs cannot
//! pile up threads, however many arrive.

use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use tracing::debug;

use super::limits::COUNTERS;

type Job<T> = Box<dyn FnOnce() -> T + Send>;

/// What became of one parse.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Outcome<T> {
    Done(T),
    /// Still running when the budget was up: abandoned.
    TimedOut(Duration),
    /// Not started: this many abandoned parses are still running.
    Busy(usize),
    /// Not started: no thread could be started (worth another try later).
    Unavailable(String),
    /// The parse panicked.
    Failed(String),
}

pub(crate) struct ParseWorker<T> {
    budget: Duration,
    max_abandoned: usize,
    /// The worker waiting for the next job, once started.
    thread: Option<WorkerThread<T>>,
    /// Abandoned threads still running.
    abandoned: Arc<AtomicUsize>,
    on_abandoned_exit: Arc<dyn Fn() + Send + Sync>,
}

struct WorkerThread<T> {
    jobs: mpsc::Sender<Job<T>>,
    results: mpsc::Receiver<thread::Result<T>>,
    /// Set when abandoned: the thread then accounts for its own end.
    abandoned: Arc<AtomicBool>,
    /// Its kernel thread id, to lower its priority.
    tid: libc::pid_t,
}

impl<T: Send + 'static> ParseWorker<T> {
    /// `on_abandoned_exit` runs on an abandoned thread as it ends (it should only send a
    /// message).
    pub fn new(
        budget: Duration,
        max_abandoned: usize,
        on_abandoned_exit: Arc<dyn Fn() + Send + Sync>,
    ) -> Self {
        ParseWorker {
            budget,
            max_abandoned,
            thread: None,
            abandoned: Arc::new(AtomicUsize::new(0)),
            on_abandoned_exit,
        }
    }

    /// Abandoned parses still running.
    pub fn abandoned_running(&self) -> usize {
        self.abandoned.load(Ordering::SeqCst)
    }

    /// Runs `job` on the worker and waits for it, at most the budget.
    pub fn run(&mut self, job: impl FnOnce() -> T + Send + 'static) -> Outcome<T> {
        if self.thread.is_none() {
            let running = self.abandoned_running();
            if running >= self.max_abandoned {
                COUNTERS.count_deferred();
                return Outcome::Busy(running);
            }
            match self.spawn() {
                Ok(t) => self.thread = Some(t),
                Err(e) => return Outcome::Unavailable(format!("cannot start a parser thread: {e}")),
            }
        }
        let thread = self.thread.as_ref().expect("started above");
        if thread.jobs.send(Box::new(job)).is_err() {
            self.thread = None;
            return Outcome::Unavailable("the parser thread ended unexpectedly".into());
        }
        match thread.results.recv_timeout(self.budget) {
            Ok(Ok(value)) => Outcome::Done(value),
            Ok(Err(panic)) => Outcome::Failed(format!("the parser panicked: {}", panic_message(&panic))),
            Err(RecvTimeoutError::Timeout) => {
                self.abandon();
                Outcome::TimedOut(self.budget)
            }
            Err(RecvTimeoutError::Disconnected) => {
                self.thread = None;
                Outcome::Unavailable("the parser thread ended unexpectedly".into())
            }
        }
    }

    fn abandon(&mut self) {
        let Some(thread) = self.thread.take() else { return };
        // Counted before the thread can see its channels close (dropping `thread` below), so
        // its own decrement at exit always comes after.
        self.abandoned.fetch_add(1, Ordering::SeqCst);
        COUNTERS.count_parse_timeout();
        thread.abandoned.store(true, Ordering::SeqCst);
        let param = libc::sched_param { sched_priority: 0 };
        // SAFETY: plain system call on a thread id of this process; lowering needs no privilege.
        if unsafe { libc::sched_setscheduler(thread.tid, libc::SCHED_IDLE, &param) } != 0 {
            debug!(error = %std::io::Error::last_os_error(), "cannot lower an abandoned parse to SCHED_IDLE");
        }
    }

    fn spawn(&self) -> std::io::Result<WorkerThread<T>> {
        let (jobs_tx, jobs_rx) = mpsc::channel::<Job<T>>();
        let (results_tx, results_rx) = mpsc::channel();
        let (tid_tx, tid_rx) = mpsc::sync_channel(1);
        let abandoned = Arc::new(AtomicBool::new(false));
        let on_exit = ExitAccounting {
            abandoned: abandoned.clone(),
            running: self.abandoned.clone(),
            notify: self.on_abandoned_exit.clone(),
        };
        thread::Builder::new().name("sluice-parse".into()).spawn(move || {
            let _on_exit = on_exit;
            // SAFETY: gettid has no preconditions.
            let _ = tid_tx.send(unsafe { libc::syscall(libc::SYS_gettid) } as libc::pid_t);
            for job in jobs_rx {
                let result = panic::catch_unwind(AssertUnwindSafe(job));
                if results_tx.send(result).is_err() {
                    break; // abandoned: nobody wants the result
                }
            }
        })?;
        // The thread sends its id first thing; 0 (no thread) only if it died before that.
        let tid = tid_rx.recv().unwrap_or(0);
        Ok(WorkerThread { jobs: jobs_tx, results: results_rx, abandoned, tid })
    }
}

/// Runs as a worker thread ends: an abandoned one leaves the count and says so.
struct ExitAccounting {
    abandoned: Arc<AtomicBool>,
    running: Arc<AtomicUsize>,
    notify: Arc<dyn Fn() + Send + Sync>,
}

impl Drop for ExitAccounting {
    fn drop(&mut self) {
        if self.abandoned.load(Ordering::SeqCst) {
            self.running.fetch_sub(1, Ordering::SeqCst);
            COUNTERS.count_abandoned_ended();
            (self.notify)();
        }
    }
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "(no message)".into()
    }
}
