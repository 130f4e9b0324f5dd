//! Files laid out and updated as the kubelet writes ConfigMap, Secret and projected
//! ServiceAccount-token volumes (its `AtomicWriter`), so that what sluice reads in the simulator
//! behaves as in a pod: a reader that watches or re-reads `bundle.pem` sees the update exactly
//! as it would on a node.
//!
//! ```text
//!   <dir>/bundle.pem -> ..data/bundle.pem        (one symlink per file, made once)
//!   <dir>/..data     -> ..2026_03_02_09_14_07.123456789.1a2b3c4d
//!   <dir>/..2026_03_02_09_14_07.123456789.1a2b3c4d/bundle.pem
//! ```
//!
//! An update writes a new timestamped directory, points a `..data_tmp` symlink at it, renames
//! that over `..data` (one atomic step: a reader opening `bundle.pem` gets all old or all new
//! files), adds or removes the per-file symlinks, then deletes the old directory. The file a
//! reader has open is never rewritten in place, and its path (`<dir>/bundle.pem`) is a symlink
//! whose target never changes: a watcher on that path alone misses every update, one on the
//! directory sees `..data` being replaced, as on a real node.

use std::{
    collections::BTreeSet,
    fs,
    io::Write,
    os::unix::fs::{symlink, OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
    time::{SystemTime, UNIX_EPOCH},
};

use anyhow::{bail, Context, Result};

use crate::util;

const DATA: &str = "..data";
const DATA_TMP: &str = "..data_tmp";

/// A directory written like a kubelet volume. Cheap to clone; clones write the same directory
/// (not concurrently: the test serializes its own updates, as the kubelet does per volume).
#[derive(Debug, Clone)]
pub struct ProjectedDir {
    dir: PathBuf,
}

impl ProjectedDir {
    /// The volume at `dir` (created if missing; nothing written yet).
    pub fn new(dir: impl Into<PathBuf>) -> Result<ProjectedDir> {
        let dir = dir.into();
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(ProjectedDir { dir })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `<dir>/<name>`: the path a container reads (a symlink through `..data`).
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// The files of the current version, by name (empty before the first write).
    pub fn names(&self) -> Result<BTreeSet<String>> {
        let data = self.dir.join(DATA);
        if data.symlink_metadata().is_err() {
            return Ok(BTreeSet::new());
        }
        let mut names = BTreeSet::new();
        for e in fs::read_dir(&data).with_context(|| format!("reading {}", data.display()))? {
            names.insert(e?.file_name().to_string_lossy().into_owned());
        }
        Ok(names)
    }

    /// Replaces the volume's content with `files` (name, content), each with `mode`, in one
    /// atomic step for readers.
    pub fn write(&self, files: &[(&str, &[u8])], mode: u32) -> Result<()> {
        for (name, _) in files {
            if name.is_empty() || name.contains('/') || name.starts_with("..") {
                bail!("bad file name {name:?} for a volume");
            }
        }
        let old_target = fs::read_link(self.dir.join(DATA)).ok();
        let old_names = self.names()?;

        // 1. The new version in a directory of its own.
        let version = format!("..{}.{}", timestamp(), util::hex(&util::random_bytes(4)?));
        let version_dir = self.dir.join(&version);
        fs::create_dir(&version_dir).with_context(|| format!("creating {}", version_dir.display()))?;
        for (name, content) in files {
            let path = version_dir.join(name);
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(mode)
                .open(&path)
                .with_context(|| format!("creating {}", path.display()))?;
            // The umask may have taken bits off `mode`: set it exactly, as the kubelet does.
            f.set_permissions(fs::Permissions::from_mode(mode))?;
            f.write_all(content)
                .and_then(|()| f.sync_all())
                .with_context(|| format!("writing {}", path.display()))?;
        }

        // 2. Swap `..data` to it atomically.
        let tmp = self.dir.join(DATA_TMP);
        let _ = fs::remove_file(&tmp);
        symlink(&version, &tmp).with_context(|| format!("linking {}", tmp.display()))?;
        fs::rename(&tmp, self.dir.join(DATA))
            .with_context(|| format!("renaming {} to {DATA}", tmp.display()))?;

        // 3. The user-visible links: new files get one, files that are gone lose theirs.
        let new_names: BTreeSet<String> = files.iter().map(|(n, _)| n.to_string()).collect();
        for name in &new_names {
            let link = self.dir.join(name);
            if link.symlink_metadata().is_err() {
                symlink(Path::new(DATA).join(name), &link)
                    .with_context(|| format!("linking {}", link.display()))?;
            }
        }
        for name in old_names.difference(&new_names) {
            let _ = fs::remove_file(self.dir.join(name));
        }

        // 4. The old version goes.
        if let Some(old) = old_target {
            let old = self.dir.join(old);
            if old != version_dir {
                fs::remove_dir_all(&old).with_context(|| format!("removing {}", old.display()))?;
            }
        }
        Ok(())
    }
}

/// `2026_03_02_09_14_07.123456789`, the kubelet's format for version directories.
fn timestamp() -> String {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = now.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}_{m:02}_{d:02}_{:02}_{:02}_{:02}.{:09}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        now.subsec_nanos()
    )
}

/// Howard Hinnant's civil_from_days: (year, month, day) of a day count since 1970-01-01.
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir() -> PathBuf {
        std::env::temp_dir()
            .join(format!("sluice-projected-test-{}", util::hex(&util::random_bytes(4).unwrap())))
    }

    #[test]
    fn updates_swap_the_data_link_and_keep_the_file_paths() {
        let root = temp_dir();
        let v = ProjectedDir::new(&root).unwrap();
        assert!(v.names().unwrap().is_empty());
        v.write(&[("bundle.pem", b"A"), ("extra", b"x")], 0o644).unwrap();
        let bundle = v.path("bundle.pem");
        assert_eq!(fs::read_to_string(&bundle).unwrap(), "A");
        assert_eq!(fs::read_link(&bundle).unwrap(), Path::new("..data/bundle.pem"));
        let first = fs::read_link(root.join(DATA)).unwrap();

        // A reader holding the old file keeps reading the old content.
        let held = fs::File::open(&bundle).unwrap();
        v.write(&[("bundle.pem", b"AB")], 0o600).unwrap();
        assert_eq!(fs::read_to_string(&bundle).unwrap(), "AB");
        assert_eq!(std::io::read_to_string(held).unwrap(), "A", "never rewritten in place");
        assert_ne!(fs::read_link(root.join(DATA)).unwrap(), first);
        assert!(!root.join(&first).exists(), "the old version is removed");
        assert!(v.path("extra").symlink_metadata().is_err(), "a file no longer written loses its link");
        let mode = fs::metadata(&bundle).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // Only the link, the data link and one version directory.
        let mut entries: Vec<String> = fs::read_dir(&root)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        entries.sort();
        assert_eq!(entries.len(), 3, "{entries:?}");
        assert!(entries[0].starts_with("..2"), "{entries:?}");
        assert_eq!(&entries[1..], ["..data", "bundle.pem"]);
        assert!(v.write(&[("../x", b"")], 0o644).is_err());
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn timestamps_look_like_the_kubelets() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(20_514), (2026, 3, 2));
        let t = timestamp();
        assert_eq!(t.len(), "2026_03_02_09_14_07.123456789".len(), "{t}");
    }
}
