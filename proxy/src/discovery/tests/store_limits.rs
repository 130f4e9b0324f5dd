//! The directory store against files that would wedge or exhaust a naive reader or parser:
//! each is refused with its name and the reason, its last good objects stay, the other files
//! apply, and a fix or a removal clears it. Slow parses are simulated by a parse function that
//! blocks until the test releases it (a real slow input would make the test depend on the
//! machine's speed).

use std::ffi::OsStr;
use std::fs;
use std::path::Path;
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::fixtures;
use crate::discovery::limits::{Limits, COUNTERS};
use crate::discovery::manifest::Format;
use crate::discovery::store::{parse_file, Store, StoreOptions};
use crate::discovery::{ManifestDir, Model};

fn reason<'m>(model: &'m Model, file: &str) -> Option<&'m str> {
    model.errors().iter().find(|e| e.file.file_name() == Some(OsStr::new(file))).map(|e| e.reason.as_str())
}

fn write(dir: &Path, name: &str, text: impl AsRef<[u8]>) {
    fs::write(dir.join(name), text).unwrap();
}

#[test]
fn oversized_nested_special_and_binary_files_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(d, "a.yaml", fixtures::namespace("a", true));
    write(d, "nested.yaml", format!("apiVersion: v1\nkind: Pod\nmetadata: {}", "[".repeat(400 << 10)));
    // Over the file limit: refused from its size, never read.
    write(d, "huge.yaml", format!("# {}\n", "x".repeat(9 << 20)));
    write(d, "binary.yaml", b"kind: \xff\xfe\n");
    // A FIFO would block a plain open() or read() forever.
    nix::unistd::mkfifo(&d.join("fifo.yaml"), nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();

    let mut store = Store::new(d.to_owned());
    store.scan().unwrap();
    let m = store.build();
    assert!(m.is_enrolled("a"), "the good file applies");
    let nested = reason(&m, "nested.yaml").expect("nested.yaml reported");
    assert_eq!(
        nested,
        "document 1 (line 1) exceeds sluice's nesting limit: more than 100 levels deep (at line 3)"
    );
    let huge = reason(&m, "huge.yaml").expect("huge.yaml reported");
    assert!(
        huge.starts_with("the file exceeds sluice's size limit: 9437187 bytes, more than 8 MiB"),
        "{huge}"
    );
    assert!(reason(&m, "binary.yaml").expect("binary.yaml reported").contains("not valid UTF-8"));
    assert!(reason(&m, "fifo.yaml").expect("fifo.yaml reported").contains("not a regular file"));
    assert_eq!(m.errors().len(), 4, "{:?}", m.errors());

    // Fixed and removed files clear their errors.
    write(d, "nested.yaml", fixtures::namespace("b", true));
    assert!(store.refresh(OsStr::new("nested.yaml")));
    fs::remove_file(d.join("huge.yaml")).unwrap();
    assert!(store.refresh(OsStr::new("huge.yaml")));
    let m = store.build();
    assert!(m.is_enrolled("b"));
    assert!(reason(&m, "nested.yaml").is_none() && reason(&m, "huge.yaml").is_none(), "{:?}", m.errors());
}

#[test]
fn a_refused_edit_keeps_the_last_good_objects() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(d, "ns.yaml", fixtures::namespace("shop", true));
    let mut store = Store::new(d.to_owned());
    store.scan().unwrap();
    assert!(store.build().is_enrolled("shop"));
    write(d, "ns.yaml", format!("{}\nextra: {}", fixtures::namespace("shop", false), "{".repeat(1000)));
    assert!(store.refresh(OsStr::new("ns.yaml")));
    let m = store.build();
    assert!(reason(&m, "ns.yaml").is_some_and(|r| r.contains("nesting limit")), "{:?}", m.errors());
    assert!(m.is_enrolled("shop"), "the last good version stays in force");
}

/// A parse function whose parses of files starting with `#hang` wait for the test (and say
/// that they started).
struct Gate {
    open: Mutex<bool>,
    opened: Condvar,
    entered: Mutex<mpsc::Sender<()>>,
}

impl Gate {
    /// A closed gate, and where it says that a parse is waiting at it.
    fn new() -> (Arc<Gate>, mpsc::Receiver<()>) {
        let (tx, rx) = mpsc::channel();
        (Arc::new(Gate { open: Mutex::new(false), opened: Condvar::new(), entered: Mutex::new(tx) }), rx)
    }

    fn parse(self: &Arc<Self>) -> crate::discovery::store::ParseFn {
        let gate = self.clone();
        Arc::new(move |bytes: &[u8], format: Format, limits: &Limits| {
            if bytes.starts_with(b"#hang") {
                let _ = gate.entered.lock().unwrap().send(());
                let mut open = gate.open.lock().unwrap();
                while !*open {
                    open = gate.opened.wait(open).unwrap();
                }
            }
            parse_file(bytes, format, limits)
        })
    }

    fn release(&self) {
        *self.open.lock().unwrap() = true;
        self.opened.notify_all();
    }
}

#[test]
fn slow_parses_are_abandoned_and_waiting_files_parsed_when_one_ends() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (gate, _entered) = Gate::new();
    let (ended_tx, ended) = mpsc::channel();
    let ended_tx = Mutex::new(ended_tx);
    let options = StoreOptions {
        budget: Duration::from_millis(300),
        max_abandoned: 1,
        parse: gate.parse(),
        ..StoreOptions::default()
    };
    let mut store = Store::with_options(
        d.to_owned(),
        options,
        Arc::new(move || {
            let _ = ended_tx.lock().unwrap().send(());
        }),
    );
    let refresh = |store: &mut Store, name: &str| store.refresh(OsStr::new(name));

    write(d, "slow.yaml", format!("#hang\n{}", fixtures::namespace("slow", true)));
    assert!(refresh(&mut store, "slow.yaml"));
    write(d, "b.yaml", fixtures::namespace("b", true));
    assert!(refresh(&mut store, "b.yaml"), "b.yaml waits, and says so");
    let m = store.build();
    assert_eq!(
        reason(&m, "slow.yaml"),
        Some("parsing took longer than 0.3 s and was abandoned (this content is not parsed again)")
    );
    let waiting = reason(&m, "b.yaml").expect("b.yaml reported while it waits");
    assert!(waiting.starts_with("not parsed yet: 1 earlier parses"), "{waiting}");
    assert!(!m.is_enrolled("b"));
    assert!(!refresh(&mut store, "slow.yaml"), "the same slow content is not parsed again");

    // The slow parse ends: the waiting file is parsed.
    gate.release();
    ended.recv_timeout(Duration::from_secs(10)).expect("the abandoned parse reports its end");
    assert!(store.retry_deferred());
    let m = store.build();
    assert!(m.is_enrolled("b"));
    assert!(reason(&m, "b.yaml").is_none());
    assert!(reason(&m, "slow.yaml").is_some(), "its content is still the slow one");

    // A fix to the slow file applies.
    write(d, "slow.yaml", fixtures::namespace("slow", true));
    assert!(refresh(&mut store, "slow.yaml"));
    let m = store.build();
    assert!(m.is_enrolled("slow") && m.errors().is_empty(), "{:?}", m.errors());
}

#[test]
fn a_waiting_file_that_is_removed_is_forgotten() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (gate, _entered) = Gate::new();
    let options = StoreOptions {
        budget: Duration::from_millis(100),
        max_abandoned: 1,
        parse: gate.parse(),
        ..StoreOptions::default()
    };
    let mut store = Store::with_options(d.to_owned(), options, Arc::new(|| {}));
    write(d, "slow.yaml", "#hang\n");
    store.refresh(OsStr::new("slow.yaml"));
    write(d, "b.yaml", fixtures::namespace("b", true));
    store.refresh(OsStr::new("b.yaml"));
    fs::remove_file(d.join("b.yaml")).unwrap();
    assert!(store.refresh(OsStr::new("b.yaml")));
    gate.release();
    assert!(!store.retry_deferred(), "nothing waits any more");
    assert!(reason(&store.build(), "b.yaml").is_none());
}

/// While the watch loop waits on a parse, file events queue up; past the queue's bound they are
/// dropped and the loop rescans the directory instead: nothing is lost, nothing grows.
#[test]
fn a_flood_of_events_becomes_one_rescan() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (gate, entered) = Gate::new();
    let options =
        StoreOptions { budget: Duration::from_secs(60), parse: gate.parse(), ..StoreOptions::default() };
    let (tx, models) = mpsc::channel();
    let _handle = ManifestDir::spawn_with(d.to_owned(), options, 8, move |m| {
        let _ = tx.send(m);
    })
    .unwrap();
    let overflows = COUNTERS.watch_overflows();
    write(d, "hang.yaml", format!("#hang\n{}", fixtures::namespace("hang", true)));
    entered.recv_timeout(Duration::from_secs(10)).expect("the watch loop is parsing hang.yaml");
    // The loop waits on that parse: 50 files are far more events than the queue holds.
    for i in 0..50 {
        write(d, &format!("ns-{i:02}.yaml"), fixtures::namespace(&format!("ns-{i}"), true));
    }
    gate.release();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let m = models.recv_timeout(left).expect("a model with every namespace within 10 s");
        if m.namespaces().count() == 51 {
            break;
        }
    }
    assert!(COUNTERS.watch_overflows() > overflows, "the queue overflowed and the directory was rescanned");
}
