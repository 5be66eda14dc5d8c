//! Pod source: a pods file, the JSON `kubectl get pods -o json` prints (a `List` of Pods,
//! or a single Pod), reloaded when it changes. For standalone use and for tests.
//!
//! The file is polled (modification time and size): simple, and it works on every file
//! system, including the ConfigMap and hostPath volumes a DaemonSet would read it from.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use k8s_openapi::api::core::v1::Pod;
use log::{info, warn};
use serde::Deserialize;

use super::{PodMeta, PodStore};

/// How often the file is checked for changes.
pub const DEFAULT_POLL: Duration = Duration::from_millis(250);

/// The pods file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum PodsFileError {
    /// The file could not be read.
    #[error("pods file {path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file is not a Pod or a List of Pods.
    #[error(
        "pods file {path}: not a Pod or a List of Pods (`kubectl get pods -o json`): {source}"
    )]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

#[derive(Deserialize)]
#[serde(untagged)]
enum PodsJson {
    List { items: Vec<Pod> },
    One(Box<Pod>),
}

/// Reads and converts a pods file.
pub fn load(path: &Path) -> Result<Vec<PodMeta>, PodsFileError> {
    let text = std::fs::read_to_string(path).map_err(|source| PodsFileError::Read {
        path: path.to_owned(),
        source,
    })?;
    let parsed: PodsJson = serde_json::from_str(&text).map_err(|source| PodsFileError::Parse {
        path: path.to_owned(),
        source,
    })?;
    let pods = match parsed {
        PodsJson::List { items } => items,
        PodsJson::One(pod) => vec![*pod],
    };
    Ok(pods.iter().filter_map(PodMeta::from_pod).collect())
}

fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

/// Loads `path` into `store` now, then reloads it whenever it changes. A file that fails
/// to load keeps the pods of the last good version, and the failure is logged once per
/// change.
pub fn spawn(path: PathBuf, store: Arc<PodStore>, poll: Duration) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut last = None;
        let mut tick = tokio::time::interval(poll);
        loop {
            tick.tick().await;
            let now = stamp(&path);
            if now == last {
                continue;
            }
            last = now;
            match load(&path) {
                Ok(pods) => {
                    info!("pods file {}: {} pods", path.display(), pods.len());
                    store.replace_all(pods);
                }
                Err(e) => warn!("{e}; keeping the {} pods already known", store.len()),
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod_json(uid: &str, name: &str) -> String {
        format!(
            r#"{{"apiVersion":"v1","kind":"Pod","metadata":{{"name":"{name}","namespace":"ns","uid":"{uid}"}},
               "spec":{{"serviceAccountName":"sa-{name}","containers":[{{"name":"c","image":"i"}}]}}}}"#
        )
    }

    #[test]
    fn loads_lists_and_single_pods() {
        let dir = tempfile::tempdir().expect("tempdir");
        let list = dir.path().join("pods.json");
        std::fs::write(
            &list,
            format!(
                r#"{{"apiVersion":"v1","kind":"List","items":[{},{}]}}"#,
                pod_json("u1", "a"),
                pod_json("u2", "b")
            ),
        )
        .expect("write");
        let pods = load(&list).expect("list");
        assert_eq!(pods.len(), 2);
        assert_eq!(pods[1].service_account, "sa-b");
        let one = dir.path().join("pod.json");
        std::fs::write(&one, pod_json("u3", "c")).expect("write");
        assert_eq!(load(&one).expect("one")[0].uid, "u3");
    }

    #[test]
    fn bad_files_say_what_is_wrong() {
        let dir = tempfile::tempdir().expect("tempdir");
        let bad = dir.path().join("bad.json");
        std::fs::write(&bad, "{ not json").expect("write");
        let err = load(&bad).expect_err("garbage").to_string();
        assert!(
            err.contains("bad.json") && err.contains("kubectl get pods -o json"),
            "{err}"
        );
        let err = load(&dir.path().join("missing.json"))
            .expect_err("missing")
            .to_string();
        assert!(err.contains("cannot read"), "{err}");
    }

    #[tokio::test]
    async fn reloads_on_change_and_keeps_pods_on_a_bad_version() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("pods.json");
        std::fs::write(&path, format!(r#"{{"items":[{}]}}"#, pod_json("u1", "a"))).expect("write");
        let store = PodStore::new();
        let mut changed = store.changed();
        let task = spawn(path.clone(), store.clone(), Duration::from_millis(20));
        tokio::time::timeout(Duration::from_secs(5), changed.changed())
            .await
            .expect("first load")
            .expect("sender");
        assert!(store.get("u1").is_some());
        std::fs::write(
            &path,
            format!(
                r#"{{"items":[{},{}]}}"#,
                pod_json("u1", "a"),
                pod_json("u2", "bb")
            ),
        )
        .expect("rewrite");
        tokio::time::timeout(Duration::from_secs(5), changed.changed())
            .await
            .expect("reload")
            .expect("sender");
        assert_eq!(store.len(), 2);
        std::fs::write(&path, "{ broken").expect("break it");
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(store.len(), 2, "a bad version keeps the last good pods");
        task.abort();
    }
}
