//! Reloading: policy files polled for changes and swapped in when a new version holds and
//! loads.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use tracing::{info, warn};

use super::{load::files_in, set::PolicySet, sources::PolicySources};

/// How often [`spawn_reloader`] looks for changed policy files: a change is loaded after
/// it held for one more poll, so a new policy, or the error about a bad one, comes within
/// two polls.
pub const DEFAULT_POLL: Duration = Duration::from_millis(250);

type Stamp = Option<(SystemTime, u64)>;

fn stamp(path: &Path) -> Stamp {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

/// Modification time and size of every configured path and of the policy files in the
/// configured directories: any change, addition or removal changes it.
fn fingerprint(paths: &[PathBuf]) -> Vec<(PathBuf, Stamp)> {
    let mut out = Vec::new();
    for path in paths {
        out.push((path.clone(), stamp(path)));
        if path.is_dir() {
            for file in files_in(path).unwrap_or_default() {
                let s = stamp(&file);
                out.push((file, s));
            }
        }
    }
    out
}

/// Reloads the policies of `paths` into the file part of `sources` whenever one of the
/// files changes (modification time or size, polled every `poll`; files added to or
/// removed from a directory count); the cluster part is left alone, and `sources`
/// recomputes the combined set. A change is loaded once it has held for one more poll, so
/// a file caught half-written (an editor truncating it first) is not taken for an empty
/// policy set. A valid new set replaces the old file policies; an invalid one is logged,
/// once per change, and the old file policies are kept.
///
/// Looking at the files and loading them happen on the blocking pool, off the runtime's
/// workers; both are bounded (regular files only, opened without blocking, size and
/// nesting capped), so one bad file costs one error and the next poll comes on time.
pub fn spawn_reloader(
    paths: Vec<PathBuf>,
    sources: Arc<PolicySources>,
    poll: Duration,
) -> tokio::task::JoinHandle<()> {
    let paths = Arc::new(paths);
    tokio::spawn(async move {
        // The files as the previous poll saw them, and as last loaded.
        let mut previous = None;
        let mut loaded = None;
        let mut tick = tokio::time::interval(poll);
        // A slow poll is followed by the next one, not by a burst of catch-up ticks.
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let p = paths.clone();
            let now = match tokio::task::spawn_blocking(move || fingerprint(&p)).await {
                Ok(now) => now,
                Err(e) => {
                    warn!("policy files: looking for changes failed: {e}");
                    continue;
                }
            };
            let settled = previous.as_ref() == Some(&now);
            previous = Some(now.clone());
            if !settled || loaded.as_ref() == Some(&now) {
                continue;
            }
            loaded = Some(now);
            let p = paths.clone();
            match tokio::task::spawn_blocking(move || PolicySet::load(&p)).await {
                Ok(Ok(set)) => {
                    let count = set.len();
                    // The first load usually finds the set the caller loaded: unchanged.
                    if sources.replace_files(set) {
                        info!("policies reloaded: {count} policies from files");
                    }
                }
                Ok(Err(e)) => {
                    let kept = sources.file_count();
                    warn!("{e}; keeping the {kept} policies already loaded from files");
                }
                Err(e) => {
                    let kept = sources.file_count();
                    warn!("policy files: loading failed: {e}; keeping the {kept} policies already loaded from files");
                }
            }
        }
    })
}
