//! What one manifest file or API object may cost, checked before any parser sees it.
//!
//! The YAML parser under serde_yaml_ng (libyaml) rescans its stack of flow collections on every
//! token, so `[[[[…` is quadratic in its depth: 400 KB of brackets kept the discovery thread busy
//! for about ten minutes. YAML aliases let a 300 KB file expand to over a gigabyte of values.
//! So every document is measured first, by a single linear pass that follows just enough of the
//! syntax to count what the parser will build (see `yaml` and `json`): its size, its nesting
//! depth, its nodes, and what its aliases expand to. A document over a limit is refused with the
//! limit and where it was crossed; nothing of it reaches the parser.
//!
//! The limits are generous for anything Kubernetes stores (see [`Limits::DEFAULT`]); what is
//! left to the parser is then linear in the input. The manifest directory also bounds each
//! parse in time (`parse_worker`), in case the parser has a slow path this check does not know.

mod json;
mod yaml;

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use thiserror::Error;

use super::manifest::Format;

/// Bounds on one manifest file (and on each of its documents), or on one API object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Bytes of one manifest file (checked from its size, before it is read).
    pub file_bytes: usize,
    /// Bytes of one document, and what it becomes once its YAML aliases are expanded.
    pub document_bytes: usize,
    /// Nested collections (mappings, sequences, flow collections) inside one document.
    pub depth: usize,
    /// YAML documents or JSON values in one file.
    pub documents: usize,
    /// Keys, values and list items of one document, counting what YAML aliases expand to.
    pub nodes: usize,
}

impl Limits {
    /// - 3 MiB per document: the largest request body kube-apiserver accepts; etcd stores at
    ///   most 1.5 MiB per object by default, so no object a cluster holds comes near it.
    /// - 8 MiB per file: a bundle of many objects (a ConfigMap, the usual way to ship the
    ///   directory, holds 1 MiB in all).
    /// - 100 levels: Kubernetes objects nest under 30, CRD schemas about 50; serde's own
    ///   recursion limits are 128, and below 100 every recursive walk is safe.
    /// - 10 000 documents per file.
    /// - 200 000 nodes per document: a full EndpointSlice (1 000 endpoints) counts 33 000
    ///   (serde_yaml_ng builds 24 000 values from it). Parsing costs up to some 500 bytes per
    ///   node: the worst document these limits let through takes 0.25 s and 100 MB to parse
    ///   (release build), whatever its text.
    pub const DEFAULT: Limits = Limits {
        file_bytes: 8 << 20,
        document_bytes: 3 << 20,
        depth: 100,
        documents: 10_000,
        nodes: 200_000,
    };
}

impl Default for Limits {
    fn default() -> Self {
        Limits::DEFAULT
    }
}

/// How long one manifest file may take to parse before it is abandoned. The pre-check makes
/// every known input linear: 8 MiB of real objects (34 EndpointSlices of 1 000 endpoints)
/// parse in 0.5 s, the slowest 8 MiB the limits let through in about 4 s (release build).
pub const PARSE_BUDGET: Duration = Duration::from_secs(5);

/// Abandoned parses (threads that cannot be stopped) allowed to run at once, node-wide. While
/// this many are still running, further files wait for one of them to end.
pub const MAX_ABANDONED_PARSES: usize = 2;

/// Which limit was exceeded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exceeded {
    /// The whole file is larger than [`Limits::file_bytes`]; `size` is what it has.
    FileBytes {
        size: u64,
        limit: usize,
    },
    Documents {
        limit: usize,
    },
    DocumentBytes {
        limit: usize,
    },
    /// Within the size limit as written, over it once YAML aliases are expanded.
    ExpandedBytes {
        limit: usize,
    },
    Depth {
        limit: usize,
    },
    Nodes {
        limit: usize,
    },
}

/// Where in a file a limit was crossed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    /// 1-based document number, and the line the document starts on.
    pub document: usize,
    pub document_line: usize,
    /// The line where the limit was crossed.
    pub line: usize,
}

/// A limit a manifest file or API object exceeds. Reads as a sentence naming the limit, e.g.
/// "document 1 (line 1) exceeds sluice's nesting limit: more than 100 levels deep (at line 2)".
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub struct LimitError {
    pub exceeded: Exceeded,
    /// `None` for an API object (one value, no lines worth naming) and for the file size.
    pub at: Option<Position>,
}

impl fmt::Display for LimitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let subject = match (&self.exceeded, &self.at) {
            (Exceeded::FileBytes { .. } | Exceeded::Documents { .. }, _) => "the file".to_owned(),
            (_, Some(at)) => format!("document {} (line {})", at.document, at.document_line),
            (_, None) => "the object".to_owned(),
        };
        match &self.exceeded {
            Exceeded::FileBytes { size, limit } => write!(
                f,
                "{subject} exceeds sluice's size limit: {size} bytes, more than {}",
                size_text(*limit)
            )?,
            Exceeded::Documents { limit } => {
                write!(f, "{subject} exceeds sluice's document limit: more than {limit} documents")?
            }
            Exceeded::DocumentBytes { limit } => {
                write!(f, "{subject} exceeds sluice's size limit: more than {}", size_text(*limit))?
            }
            Exceeded::ExpandedBytes { limit } => write!(
                f,
                "{subject} exceeds sluice's size limit: more than {} once its YAML aliases are expanded",
                size_text(*limit)
            )?,
            Exceeded::Depth { limit } => {
                write!(f, "{subject} exceeds sluice's nesting limit: more than {limit} levels deep")?
            }
            Exceeded::Nodes { limit } => write!(
                f,
                "{subject} exceeds sluice's node limit: more than {limit} keys, values and list items \
                 (YAML aliases count as what they expand to)"
            )?,
        }
        match &self.at {
            Some(at) if !matches!(self.exceeded, Exceeded::FileBytes { .. }) => {
                write!(f, " (at line {})", at.line)
            }
            _ => Ok(()),
        }
    }
}

/// "3 MiB", "512 KiB", or bytes.
fn size_text(bytes: usize) -> String {
    if bytes >= 1 << 20 && bytes % (1 << 20) == 0 {
        format!("{} MiB", bytes >> 20)
    } else if bytes >= 1 << 10 && bytes % (1 << 10) == 0 {
        format!("{} KiB", bytes >> 10)
    } else {
        format!("{bytes} bytes")
    }
}

/// Checks a whole manifest file's text against `limits`. Linear in the text, allocation-light
/// (a small stack of open collections and the document's anchors).
pub fn check(text: &str, format: Format, limits: &Limits) -> Result<(), LimitError> {
    check_file_size(text.len() as u64, limits)?;
    match format {
        Format::Yaml => yaml::check(text, limits),
        Format::Json => json::check(text, limits),
    }
}

/// The file-size limit alone: from the file's metadata, so an oversized file is never read.
pub fn check_file_size(size: u64, limits: &Limits) -> Result<(), LimitError> {
    if size > limits.file_bytes as u64 {
        return Err(LimitError {
            exceeded: Exceeded::FileBytes { size, limit: limits.file_bytes },
            at: None,
        });
    }
    Ok(())
}

/// Counters of what the limits turned away, node-wide, for `sluice status`.
#[derive(Debug, Default)]
pub struct DiscoveryCounters {
    /// Manifest files and API objects refused by a limit before parsing.
    refused: AtomicU64,
    /// Manifest parses abandoned after [`PARSE_BUDGET`].
    parse_timeouts: AtomicU64,
    /// Manifest parses put off because [`MAX_ABANDONED_PARSES`] were still running.
    parses_deferred: AtomicU64,
    /// Abandoned parses still running now.
    abandoned_running: AtomicU64,
    /// Times the manifest directory's event queue was full (the directory was rescanned).
    watch_overflows: AtomicU64,
}

impl DiscoveryCounters {
    const fn new() -> Self {
        DiscoveryCounters {
            refused: AtomicU64::new(0),
            parse_timeouts: AtomicU64::new(0),
            parses_deferred: AtomicU64::new(0),
            abandoned_running: AtomicU64::new(0),
            watch_overflows: AtomicU64::new(0),
        }
    }

    /// How many times the manifest directory's event queue was full.
    #[cfg(test)]
    pub(crate) fn watch_overflows(&self) -> u64 {
        self.watch_overflows.load(Ordering::Relaxed)
    }

    pub(crate) fn count_refused(&self) {
        self.refused.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn count_parse_timeout(&self) {
        self.parse_timeouts.fetch_add(1, Ordering::Relaxed);
        self.abandoned_running.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn count_abandoned_ended(&self) {
        self.abandoned_running.fetch_sub(1, Ordering::Relaxed);
    }

    pub(crate) fn count_watch_overflow(&self) {
        self.watch_overflows.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn count_deferred(&self) {
        self.parses_deferred.fetch_add(1, Ordering::Relaxed);
    }

    /// `(name, value)` pairs for the admin API's counters.
    pub fn snapshot(&self) -> [(&'static str, u64); 5] {
        [
            ("discovery_limit_refused", self.refused.load(Ordering::Relaxed)),
            ("discovery_parse_timeouts", self.parse_timeouts.load(Ordering::Relaxed)),
            ("discovery_parses_deferred", self.parses_deferred.load(Ordering::Relaxed)),
            ("discovery_abandoned_parses_running", self.abandoned_running.load(Ordering::Relaxed)),
            ("discovery_watch_overflows", self.watch_overflows.load(Ordering::Relaxed)),
        ]
    }
}

/// The process's discovery counters (one source runs per process).
pub static COUNTERS: DiscoveryCounters = DiscoveryCounters::new();
