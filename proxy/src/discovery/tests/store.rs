//! The directory store without the watcher: last-good retention, conflicts, and logging each
//! distinct failure once. Runs on the test thread, so a thread-local subscriber sees the logs.

use std::fs;
use std::sync::{Arc, Mutex, OnceLock};

use tracing::field::{Field, Visit};
use tracing::subscriber::DefaultGuard;
use tracing::{Dispatch, Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};

use super::fixtures;
use crate::discovery::store::Store;
use crate::discovery::ManifestDir;

#[derive(Debug, Clone)]
struct Logged {
    level: Level,
    message: String,
    file: String,
    reason: String,
}

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<Logged>>>);

impl Capture {
    fn take(&self) -> Vec<Logged> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

impl<S: Subscriber> Layer<S> for Capture {
    fn on_event(&self, event: &Event<'_>, _: Context<'_, S>) {
        struct V<'a>(&'a mut Logged);
        impl Visit for V<'_> {
            fn record_debug(&mut self, f: &Field, v: &dyn std::fmt::Debug) {
                let v = format!("{v:?}");
                match f.name() {
                    "message" => self.0.message = v,
                    "file" => self.0.file = v,
                    "reason" => self.0.reason = v,
                    _ => {}
                }
            }
        }
        let mut l = Logged {
            level: *event.metadata().level(),
            message: String::new(),
            file: String::new(),
            reason: String::new(),
        };
        event.record(&mut V(&mut l));
        self.0.lock().unwrap().push(l);
    }
}

/// Captures this thread's events until the guard drops.
fn capture() -> (Capture, DefaultGuard) {
    // tracing-core takes a shortcut while only one dispatcher is registered: a callsite first
    // hit on another thread (a watcher thread of a test running in parallel, which has no
    // subscriber) then computes its interest, and the global max level, from that thread's
    // view, i.e. "off", and our events vanish. A second dispatcher kept registered for the
    // life of the test binary disables the shortcut.
    static SECOND: OnceLock<Dispatch> = OnceLock::new();
    SECOND.get_or_init(|| Dispatch::new(tracing_subscriber::registry()));
    let cap = Capture::default();
    let guard = tracing::subscriber::set_default(tracing_subscriber::registry().with(cap.clone()));
    (cap, guard)
}

fn warnings(logs: &[Logged]) -> Vec<&Logged> {
    logs.iter().filter(|l| l.level == Level::WARN).collect()
}

#[test]
fn bad_file_keeps_last_good_and_warns_once_per_content() {
    let (cap, _guard) = capture();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("shop.yaml");
    fs::write(&file, fixtures::namespace("shop", true)).unwrap();
    let mut store = Store::new(dir.path().to_owned());
    assert!(store.scan().unwrap());
    let m = store.build();
    assert!(m.is_enrolled("shop") && m.errors().is_empty());
    cap.take();

    // A broken edit: the old objects stay, the error names the file, one warning.
    fs::write(&file, "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: shop\n  annotations: [\n").unwrap();
    assert!(store.refresh("shop.yaml".as_ref()));
    let m = store.build();
    assert!(m.is_enrolled("shop"), "previous good content stays in force");
    assert_eq!(m.errors().len(), 1);
    assert_eq!(m.errors()[0].file, file);
    assert!(m.errors()[0].reason.contains("invalid YAML in document 1"), "{:?}", m.errors());
    let logs = cap.take();
    let w = warnings(&logs);
    assert_eq!(w.len(), 1, "{logs:?}");
    assert!(w[0].file.contains("shop.yaml") && w[0].reason.contains("line"), "{:?}", w[0]);

    // Rebuilding, or re-reading the same bad content, does not warn again.
    assert!(!store.refresh("shop.yaml".as_ref()));
    let m = store.build();
    assert_eq!(m.errors().len(), 1);
    assert!(warnings(&cap.take()).is_empty());

    // Different bad content is a new failure: one more warning.
    fs::write(&file, "apiVersion: v1\nkind: Namespace\n").unwrap();
    assert!(store.refresh("shop.yaml".as_ref()));
    store.build();
    assert_eq!(warnings(&cap.take()).len(), 1);

    // Fixed: the error disappears and an info log says it applied.
    fs::write(&file, fixtures::namespace("shop", false)).unwrap();
    assert!(store.refresh("shop.yaml".as_ref()));
    let m = store.build();
    assert!(m.errors().is_empty());
    assert!(!m.is_enrolled("shop"));
    let logs = cap.take();
    assert!(
        logs.iter()
            .any(|l| l.level == Level::INFO && l.message.contains("applied") && l.file.contains("shop.yaml")),
        "{logs:?}"
    );
    assert!(warnings(&logs).is_empty());
}

#[test]
fn first_file_by_name_wins_a_conflict() {
    let (cap, _guard) = capture();
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("b.yaml"), fixtures::namespace("shop", false)).unwrap();
    fs::write(dir.path().join("a.yaml"), fixtures::namespace("shop", true)).unwrap();
    fs::write(dir.path().join("c.yaml"), fixtures::namespace("other", true)).unwrap();
    let m = ManifestDir::load(dir.path()).unwrap();
    assert!(m.is_enrolled("shop"), "a.yaml wins");
    assert!(m.is_enrolled("other"));
    assert_eq!(m.errors().len(), 1);
    assert_eq!(m.errors()[0].file, dir.path().join("b.yaml"));
    assert!(
        m.errors()[0].reason.contains("Namespace \"shop\" is also defined in a.yaml"),
        "{:?}",
        m.errors()
    );
    assert_eq!(warnings(&cap.take()).len(), 1);
}

#[test]
fn clashing_cluster_ip_is_reported() {
    let svc = |name: &str| {
        format!("apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\nspec:\n  clusterIP: 10.96.0.10\n  ports:\n  - port: 80\n")
    };
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("1.yaml"), svc("first")).unwrap();
    fs::write(dir.path().join("2.yaml"), svc("second")).unwrap();
    let m = ManifestDir::load(dir.path()).unwrap();
    assert_eq!(m.service_for("10.96.0.10".parse().unwrap(), 80).unwrap().name(), "first");
    assert!(m.service("default", "second").is_none());
    assert_eq!(m.errors().len(), 1);
    assert!(
        m.errors()[0].reason.contains("clusterIP 10.96.0.10 is already taken by Service \"default/first\""),
        "{:?}",
        m.errors()
    );
}

#[test]
fn only_manifest_files_are_read() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    fs::write(p.join("a.yaml"), fixtures::namespace("a", true)).unwrap();
    fs::write(p.join("b.yml"), fixtures::namespace("b", true)).unwrap();
    fs::write(p.join("c.json"), r#"{"apiVersion":"v1","kind":"Namespace","metadata":{"name":"c"}}"#).unwrap();
    // None of these may be read (they would fail to parse, or define "x").
    for junk in [".hidden.yaml", "d.yaml~", ".d.yaml.swp", ".#d.yaml", "#d.yaml#", "notes.txt", "4913"] {
        fs::write(p.join(junk), "garbage: [\n").unwrap();
    }
    fs::create_dir(p.join("sub.yaml")).unwrap();
    fs::write(p.join("sub.yaml").join("x.yaml"), fixtures::namespace("x", true)).unwrap();
    let m = ManifestDir::load(p).unwrap();
    assert!(m.errors().is_empty(), "{:?}", m.errors());
    let mut names: Vec<&str> = m.namespaces().map(|n| n.name.as_str()).collect();
    names.sort();
    assert_eq!(names, ["a", "b", "c"]);
}

#[test]
fn missing_directory_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope");
    let e = ManifestDir::spawn(&missing, |_| {}).expect_err("must fail");
    assert_eq!(e.to_string(), format!("manifest directory {} does not exist", missing.display()));
    let file = dir.path().join("f.yaml");
    fs::write(&file, "").unwrap();
    let e = ManifestDir::load(&file).expect_err("must fail");
    assert!(e.to_string().ends_with("is not a directory"), "{e}");
}
