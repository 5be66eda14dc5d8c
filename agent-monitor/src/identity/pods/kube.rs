//! Pod source: a `kube` watcher on the pods of this node.
//!
//! The monitor runs as a DaemonSet, so each instance only needs the pods the scheduler put
//! on its own node: it lists and watches pods with the field selector
//! `spec.nodeName=<node>`, which keeps both the API server's work and our memory
//! proportional to one node.
//!
//! [`kube::runtime::watcher`] does the list+watch protocol (paging, resuming from the
//! last resourceVersion, relisting after a 410 Gone). This module only maps its events
//! onto the [`PodStore`]:
//! - `Init` .. `InitApply`* .. `InitDone`: a full (re)list, buffered and then swapped in with
//!   [`PodStore::replace_all`], so pods deleted while the watch was broken disappear and
//!   readers never see a half-listed store;
//! - `Apply`: [`PodStore::upsert`]; `Delete`: [`PodStore::remove`].

use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::{
    runtime::{watcher, WatchStreamExt},
    Api, ResourceExt,
};

use super::{PodMeta, PodStore};

/// Errors of the kube pod source. Transient API errors are not among them: the watcher
/// retries those with backoff, so only what cannot heal by retrying stops the source.
#[derive(Debug, thiserror::Error)]
pub enum KubeSourceError {
    /// No node name was given. The field selector `spec.nodeName=` would then match the
    /// pods not yet scheduled anywhere instead of this node's pods.
    #[error("no node name to select pods by (set NODE_NAME from the downward API)")]
    EmptyNodeName,
    /// The watch stream ended. It only does so once the backoff has given up; the last
    /// error it reported, if any, is the cause.
    #[error("the pod watch stream ended")]
    StreamEnded {
        /// The last error the watcher reported before ending.
        #[source]
        last_error: Option<watcher::Error>,
    },
}

/// Watches the pods scheduled on `node_name` and keeps `store` equal to the API server's
/// view of them: the initial list, then every added, modified and deleted pod; after a
/// 410 Gone or any other desync, the relist replaces the whole store.
///
/// Watch errors are logged and retried with the watcher's default exponential backoff
/// instead of ending the source: a monitor that stops tracking pods after one API server
/// restart would silently lose pod identities. Runs until the returned future is dropped.
pub async fn run(
    client: kube::Client,
    node_name: String,
    store: Arc<PodStore>,
) -> Result<(), KubeSourceError> {
    if node_name.is_empty() {
        return Err(KubeSourceError::EmptyNodeName);
    }
    let api: Api<Pod> = Api::all(client);
    let config = watcher::Config::default().fields(&format!("spec.nodeName={node_name}"));
    // Managed fields are often the bulk of a pod object and PodMeta never reads them;
    // they are dropped as each pod arrives rather than carried into the conversion.
    let mut events = std::pin::pin!(watcher(api, config)
        .modify(|pod| pod.managed_fields_mut().clear())
        .default_backoff());

    // The pods of a (re)list in progress; `None` outside one.
    let mut relist: Option<Vec<PodMeta>> = None;
    let mut last_error = None;
    while let Some(event) = events.next().await {
        match event {
            Ok(event) => apply(&store, &mut relist, event),
            Err(e) => {
                // Once per backoff while the API server is away: counted, not repeated.
                crate::warn_limited!(
                    "pod-watch",
                    "pod watch on node {node_name}: {e}; retrying with backoff"
                );
                last_error = Some(e);
            }
        }
    }
    Err(KubeSourceError::StreamEnded { last_error })
}

/// Applies one watcher event to the store; `relist` buffers the pods of a (re)list.
fn apply(store: &PodStore, relist: &mut Option<Vec<PodMeta>>, event: watcher::Event<Pod>) {
    match event {
        // A (re)list starts; a previous one that failed part-way is discarded with it.
        watcher::Event::Init => *relist = Some(Vec::new()),
        watcher::Event::InitApply(pod) => {
            if let Some(meta) = convert(&pod) {
                match relist {
                    Some(pods) => pods.push(meta),
                    // The watcher always sends Init first; upserting keeps the pod anyway.
                    None => store.upsert(meta),
                }
            }
        }
        watcher::Event::InitDone => {
            let pods = relist.take().unwrap_or_default();
            tracing::info!("pod list: {} pods on this node", pods.len());
            store.replace_all(pods);
        }
        watcher::Event::Apply(pod) => {
            if let Some(meta) = convert(&pod) {
                store.upsert(meta);
            }
        }
        watcher::Event::Delete(pod) => match pod.metadata.uid.as_deref() {
            Some(uid) => store.remove(uid),
            None => tracing::debug!("deleted pod {} has no uid; ignored", pod.name_any()),
        },
    }
}

/// [`PodMeta::from_pod`], logging the (malformed) pods without a UID it skips.
fn convert(pod: &Pod) -> Option<PodMeta> {
    let meta = PodMeta::from_pod(pod);
    if meta.is_none() {
        tracing::debug!("pod {} has no uid; ignored", pod.name_any());
    }
    meta
}

/// Spawns [`run`] on the current tokio runtime. A fatal error is logged and ends the task;
/// the store keeps the pods it last had.
pub fn spawn(
    client: kube::Client,
    node_name: String,
    store: Arc<PodStore>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        if let Err(e) = run(client, node_name, store).await {
            match std::error::Error::source(&e) {
                Some(cause) => tracing::error!("kube pod source stopped: {e}: {cause}"),
                None => tracing::error!("kube pod source stopped: {e}"),
            }
        }
    })
}
