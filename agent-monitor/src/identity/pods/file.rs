//! Pod source: a pods file, the JSON `kubectl get pods -o json` prints (a `List` of Pods,
//! or a single Pod), reloaded when it changes. For standalone use and for tests.
//!
//! The file is polled (modification time and size): simple, and it works on every file
//! system, including the ConfigMap and hostPath volumes a DaemonSet would read it from.
//! It is read the bounded way ([`crate::boundedfile`]: a regular file, symlinks followed,
//! at most [`MAX_PODS_FILE_BYTES`], nested at most [`MAX_NESTING`] levels), on the
//! blocking pool, so a path replaced by a FIFO, a device or a huge file costs an error and
//! the last good pods stay.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use k8s_openapi::{
    api::core::v1::{Pod, PodSpec, PodStatus},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use serde::Deserialize;
use tracing::{info, warn};

use super::{PodMeta, PodStore};
use crate::boundedfile::{self, ReadError, TooDeep, MAX_NESTING};

/// How often the file is checked for changes.
pub const DEFAULT_POLL: Duration = Duration::from_millis(250);

/// Largest pods file read. `kubectl get pods -o json` prints about 5 to 20 KiB per pod:
/// a node's pods (110 by default, a few hundred at most) take a few MiB, and 64 MiB holds
/// the pods of a whole cluster of several thousand. Loading holds the text and the pods'
/// metadata, each Pod converted as it is parsed (`items_as_meta`).
pub const MAX_PODS_FILE_BYTES: u64 = 64 * boundedfile::MIB;

/// The pods file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum PodsFileError {
    /// The file could not be read: missing, unreadable, not a regular file, or larger than
    /// [`MAX_PODS_FILE_BYTES`].
    #[error("pods file {path}: {source}", path = path.display())]
    Read {
        /// The pods file.
        path: PathBuf,
        /// Why.
        #[source]
        source: ReadError,
    },
    /// The JSON nests arrays and objects deeper than [`MAX_NESTING`] levels.
    #[error("pods file {path}: {source}", path = path.display())]
    TooDeep {
        /// The pods file.
        path: PathBuf,
        /// The cap and where it was passed.
        #[source]
        source: TooDeep,
    },
    /// The file is not a Pod or a List of Pods.
    #[error(
        "pods file {path}: not a Pod or a List of Pods (`kubectl get pods -o json`): {source}",
        path = path.display()
    )]
    Parse {
        /// The pods file.
        path: PathBuf,
        /// What the JSON parser found.
        #[source]
        source: serde_json::Error,
    },
}

/// A pods file's top level: a List of Pods (`items`) or a single Pod (its own fields), in
/// one struct parsed as it is read. An untagged enum of the two would first copy the
/// whole document into an intermediate tree to try each shape in turn.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PodsJson {
    api_version: Option<String>,
    kind: Option<String>,
    #[serde(default, deserialize_with = "items_as_meta")]
    items: Option<Vec<PodMeta>>,
    metadata: Option<ObjectMeta>,
    spec: Option<PodSpec>,
    status: Option<PodStatus>,
}

/// A List's `items`, each Pod converted as soon as it is parsed: a parsed Pod takes
/// several times the memory of its text. Measured on a 63 MiB list of 17,924 pods: all
/// parsed Pods held at once, 440 MB more RSS; converted one by one, 45 MB.
fn items_as_meta<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<Vec<PodMeta>>, D::Error> {
    struct Items;

    impl<'de> serde::de::Visitor<'de> for Items {
        type Value = Vec<PodMeta>;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a list of Pods")
        }

        fn visit_seq<A: serde::de::SeqAccess<'de>>(
            self,
            mut seq: A,
        ) -> Result<Self::Value, A::Error> {
            let mut pods = Vec::new();
            while let Some(pod) = seq.next_element::<Pod>()? {
                pods.extend(PodMeta::from_pod(&pod));
            }
            Ok(pods)
        }
    }

    deserializer.deserialize_seq(Items).map(Some)
}

impl PodsJson {
    /// The pods: the List's items, or the one Pod.
    fn pods(self) -> Result<Vec<PodMeta>, serde_json::Error> {
        if let Some(items) = self.items {
            return Ok(items);
        }
        // A single Pod: what the Pod type checks itself when it is parsed alone.
        let kind = self.kind.as_deref().unwrap_or("Pod");
        let api_version = self.api_version.as_deref().unwrap_or("v1");
        if kind != "Pod" || api_version != "v1" {
            return Err(serde::de::Error::custom(format!(
                "expected a List with `items` or a Pod (apiVersion v1), got kind `{kind}` \
                 apiVersion `{api_version}` without `items`"
            )));
        }
        let pod = Pod {
            metadata: self.metadata.unwrap_or_default(),
            spec: self.spec,
            status: self.status,
        };
        Ok(PodMeta::from_pod(&pod).into_iter().collect())
    }
}

/// Reads and converts a pods file. Blocking: from async code, [`load_async`].
pub fn load(path: &Path) -> Result<Vec<PodMeta>, PodsFileError> {
    let bytes =
        boundedfile::read(path, MAX_PODS_FILE_BYTES).map_err(|source| PodsFileError::Read {
            path: path.to_owned(),
            source,
        })?;
    // serde_json has a recursion limit of its own (128); this one comes with the
    // position and the same message as policies and the config.
    boundedfile::check_json_nesting(&bytes, MAX_NESTING).map_err(|source| {
        PodsFileError::TooDeep {
            path: path.to_owned(),
            source,
        }
    })?;
    let parse_error = |source| PodsFileError::Parse {
        path: path.to_owned(),
        source,
    };
    let parsed: PodsJson = serde_json::from_slice(&bytes).map_err(parse_error)?;
    drop(bytes);
    parsed.pods().map_err(parse_error)
}

/// [`load`] on the blocking pool, off the runtime's workers.
pub async fn load_async(path: PathBuf) -> Result<Vec<PodMeta>, PodsFileError> {
    let p = path.clone();
    match tokio::task::spawn_blocking(move || load(&p)).await {
        Ok(result) => result,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        // Cancelled: the runtime is shutting down.
        Err(e) => Err(PodsFileError::Read {
            path,
            source: ReadError::Io(std::io::Error::other(e)),
        }),
    }
}

fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

/// Loads `path` into `store` now, then reloads it whenever it changes. A file that fails
/// to load keeps the pods of the last good version, and the failure is logged once per
/// change. Looking at the file and loading it happen on the blocking pool, and both are
/// bounded, so one bad version costs one error and the next poll comes on time.
pub fn spawn(path: PathBuf, store: Arc<PodStore>, poll: Duration) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut last = None;
        let mut tick = tokio::time::interval(poll);
        // A slow load is followed by the next poll, not by a burst of catch-up ticks.
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let p = path.clone();
            let Ok(now) = tokio::task::spawn_blocking(move || stamp(&p)).await else {
                continue;
            };
            if now == last {
                continue;
            }
            last = now;
            match load_async(path.clone()).await {
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
                r#"{{"apiVersion":"v1","kind":"List","metadata":{{"resourceVersion":"","continue":""}},"items":[{},{}]}}"#,
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
        // Not a Pod, and no items: said so, not read as an empty pod.
        std::fs::write(
            &bad,
            r#"{"apiVersion":"apps/v1","kind":"Deployment","spec":{}}"#,
        )
        .expect("write");
        let err = load(&bad).expect_err("a Deployment").to_string();
        assert!(err.contains("kind `Deployment`"), "{err}");
        // An item that is not a Pod fails the list, with its position.
        std::fs::write(
            &bad,
            r#"{"kind":"List","items":[{"apiVersion":"v1","kind":"Service"}]}"#,
        )
        .expect("write");
        let err = load(&bad).expect_err("a Service item").to_string();
        assert!(err.contains("Service") && err.contains("column"), "{err}");
        // Deeper than the cap: refused before serde_json, with the position.
        let deep = format!(r#"{{"items":[{}]}}"#, "[".repeat(70) + &"]".repeat(70));
        std::fs::write(&bad, deep).expect("write");
        let err = load(&bad).expect_err("too deep").to_string();
        assert_eq!(
            err,
            format!(
                "pods file {}: nested deeper than 64 levels at line 1 column 73",
                bad.display()
            )
        );
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
