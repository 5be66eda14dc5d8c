//! What a credential path is and whose it is.
//!
//! Paths are first normalized, so that the many spellings of one file compare equal:
//! repeated slashes, `.` and `..`, `/var/run` (a symlink to `/run`), and the kubelet's
//! atomic-writer directories (`..data` and `..2026_01_01_00_00_00.123456789`, which the
//! kubelet swaps to update projected and Secret volumes). Then the path is classified and
//! its owner found: the pod UID in `<kubelet_root>/pods/<uid>/volumes/...`, or the reader's
//! own pod for the in-container paths. The daemon never opens these files.

use super::pods::{ContainerMeta, VolumeKind};

pub use crate::events::{CredentialClass, Owner};

/// Normalizes a path lexically (no file system access).
pub fn normalize(path: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for c in path.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            // The kubelet's atomic writer: `..data` and `..<timestamp>` hold the current
            // version of a volume; the files are the same files.
            c if c.starts_with("..") => {}
            c => parts.push(c),
        }
    }
    // `/var/run` is `/run`.
    let skip = usize::from(parts.first() == Some(&"var") && parts.get(1) == Some(&"run"));
    // Built in one allocation: this runs for every open.
    let mut out = String::with_capacity(path.len() + 1);
    for part in &parts[skip..] {
        out.push('/');
        out.push_str(part);
    }
    if out.is_empty() {
        out.push('/');
    }
    out
}

/// Where the kubelet keeps pods, normalized, without a trailing slash.
fn kubelet_pods_dir(kubelet_root: &str) -> String {
    format!("{}/pods/", normalize(kubelet_root).trim_end_matches('/'))
}

/// The result of classifying one path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Classified {
    pub class: CredentialClass,
    /// The owner's pod UID, when the path names one (`None` for node credentials).
    pub owner_pod_uid: Option<String>,
    /// For `/proc/<pid>/environ`.
    pub environ_pid: Option<u32>,
    /// The normalized path.
    pub normalized: String,
}

fn file_name(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// Class of a file in a projected volume.
pub fn projected_class(volume: &str, file: &str) -> CredentialClass {
    match file {
        "ca.crt" | "namespace" => CredentialClass::NonSecret,
        "token" if volume.starts_with("kube-api-access-") => CredentialClass::ServiceAccountToken,
        _ => CredentialClass::ProjectedToken,
    }
}

/// Classifies a path opened by a process of the pod `reader_uid` (from its cgroup), whose
/// container spec is `reader_container` when the pod's metadata is known.
pub fn classify(
    raw_path: &str,
    kubelet_root: &str,
    reader_uid: Option<&str>,
    reader_container: Option<&ContainerMeta>,
) -> Classified {
    let normalized = normalize(raw_path);
    let reader_uid = reader_uid.map(str::to_owned);
    let done = |class, owner_pod_uid: Option<String>| Classified {
        class,
        owner_pod_uid,
        environ_pid: None,
        normalized: normalized.clone(),
    };
    let file = file_name(&normalized);

    // The kubelet's view: <root>/pods/<uid>/volumes/<plugin>/<volume>/<file...>
    let pods_dir = kubelet_pods_dir(kubelet_root);
    if let Some(rest) = normalized.strip_prefix(&pods_dir) {
        let mut it = rest.split('/');
        let uid = it.next().filter(|u| !u.is_empty()).map(str::to_owned);
        let (section, plugin, volume) = (it.next(), it.next(), it.next());
        let has_file = it.next().is_some();
        let class = match (section, plugin, volume, has_file) {
            (Some("volumes"), Some("kubernetes.io~projected"), Some(v), true) => {
                projected_class(v, file)
            }
            (
                Some("volumes"),
                Some("kubernetes.io~secret" | "kubernetes.io~csi"),
                Some(_),
                true,
            ) => CredentialClass::SecretVolume,
            _ => CredentialClass::Other,
        };
        return done(class, uid);
    }
    let kroot = normalize(kubelet_root);
    if normalized.starts_with(&format!("{kroot}/pki/")) {
        return done(CredentialClass::NodePki, None);
    }
    if normalized == format!("{kroot}/kubeconfig") || normalized.ends_with("/kubelet.conf") {
        return done(CredentialClass::NodeKubeconfig, None);
    }

    // In-container paths, owned by the reader's pod.
    if let Some(rest) = normalized.strip_prefix("/run/secrets/") {
        let class = if let Some(f) = rest.strip_prefix("kubernetes.io/serviceaccount/") {
            match f {
                "token" => CredentialClass::ServiceAccountToken,
                "ca.crt" | "namespace" => CredentialClass::NonSecret,
                _ => CredentialClass::Other,
            }
        } else if rest.starts_with("eks.amazonaws.com/serviceaccount/")
            || rest.starts_with("azure/tokens/")
            || rest.starts_with("tokens/")
        {
            CredentialClass::ProjectedToken
        } else {
            CredentialClass::SecretVolume
        };
        return done(class, reader_uid);
    }
    // Secret and projected volumes at custom mount paths, from the reader's pod spec.
    if let Some(container) = reader_container {
        let best = container
            .mounts
            .iter()
            .filter(|m| m.kind != VolumeKind::Other)
            .filter(|m| {
                let mp = normalize(&m.mount_path);
                normalized
                    .strip_prefix(&mp)
                    .is_some_and(|r| r.starts_with('/'))
            })
            .max_by_key(|m| m.mount_path.len());
        if let Some(m) = best {
            let class = match m.kind {
                VolumeKind::Secret => CredentialClass::SecretVolume,
                _ => projected_class(&m.volume, file),
            };
            return done(class, reader_uid);
        }
    }

    // /proc/<pid>/environ
    if let Some(pid) = normalized
        .strip_prefix("/proc/")
        .and_then(|r| r.strip_suffix("/environ"))
    {
        let mut c = done(CredentialClass::ProcEnviron, None);
        c.environ_pid = pid.parse().ok();
        return c;
    }

    // Node credentials.
    if normalized.starts_with("/etc/kubernetes/pki/") {
        return done(CredentialClass::NodePki, None);
    }
    if (normalized.starts_with("/etc/kubernetes/") && normalized.ends_with(".conf"))
        || normalized.starts_with("/etc/rancher/k3s/")
        || normalized.contains("/.kube/")
    {
        return done(CredentialClass::NodeKubeconfig, None);
    }
    if normalized.starts_with("/var/lib/rancher/k3s/server/") {
        return done(CredentialClass::NodePki, None);
    }
    if normalized.contains("/.aws/")
        || normalized.contains("/.config/gcloud/")
        || normalized.contains("/.azure/")
        || file == "application_default_credentials.json"
    {
        return done(CredentialClass::CloudCredentials, None);
    }
    done(CredentialClass::Other, None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::pods::MountMeta;

    const UID: &str = "1f7c9a2e-5b3d-4c1a-9e8f-0a1b2c3d4e5f";

    #[test]
    fn normalizes_every_spelling_of_one_file() {
        let want = format!(
            "/var/lib/kubelet/pods/{UID}/volumes/kubernetes.io~projected/kube-api-access-x/token"
        );
        for p in [
            format!("/var/lib/kubelet/pods/{UID}/volumes/kubernetes.io~projected/kube-api-access-x/..data/token"),
            format!("/var/lib/kubelet/pods/{UID}/volumes/kubernetes.io~projected/kube-api-access-x/..2026_11_23_07_00_00.123456789/token"),
            format!("//var/lib/kubelet//pods/{UID}/./volumes/kubernetes.io~projected/kube-api-access-x/sub/../token"),
        ] {
            assert_eq!(normalize(&p), want, "{p}");
        }
        assert_eq!(
            normalize("/var/run/secrets/kubernetes.io/serviceaccount/..data/token"),
            "/run/secrets/kubernetes.io/serviceaccount/token"
        );
        assert_eq!(normalize("/../.."), "/");
        assert_eq!(normalize("/var/runner/x"), "/var/runner/x");
    }

    fn pod(mounts: Vec<MountMeta>) -> crate::identity::pods::PodMeta {
        crate::identity::pods::PodMeta {
            uid: UID.to_owned(),
            namespace: "agents".into(),
            name: "a".into(),
            labels: Default::default(),
            service_account: "agent-worker-1".into(),
            node_name: None,
            containers: vec![ContainerMeta {
                name: "agent".into(),
                image: "img".into(),
                container_id: Some("abc".into()),
                mounts,
            }],
            pod_ips: vec![],
            truncated: false,
            labels_truncated: 0,
        }
    }

    fn class_of(path: &str) -> (CredentialClass, Option<String>) {
        let p = pod(vec![
            MountMeta {
                volume: "openai".into(),
                kind: VolumeKind::Secret,
                mount_path: "/etc/openai".into(),
            },
            MountMeta {
                volume: "aws-iam-token".into(),
                kind: VolumeKind::Projected,
                mount_path: "/var/run/aws/token-dir".into(),
            },
            MountMeta {
                volume: "config".into(),
                kind: VolumeKind::Other,
                mount_path: "/etc/app".into(),
            },
        ]);
        let c = classify(path, "/var/lib/kubelet", Some(&p.uid), p.containers.first());
        (c.class, c.owner_pod_uid)
    }

    #[test]
    fn classifies_and_finds_owners() {
        use CredentialClass::*;
        let own = Some(UID.to_owned());
        let other = "0a0a0a0a-1111-2222-3333-444444444444";
        let kubelet = |rest: &str| format!("/var/lib/kubelet/pods/{other}/volumes/{rest}");
        let cases: Vec<(String, CredentialClass, Option<String>)> = vec![
            (
                "/var/run/secrets/kubernetes.io/serviceaccount/token".into(),
                ServiceAccountToken,
                own.clone(),
            ),
            (
                "/run/secrets/kubernetes.io/serviceaccount/..data/token".into(),
                ServiceAccountToken,
                own.clone(),
            ),
            (
                "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt".into(),
                NonSecret,
                own.clone(),
            ),
            (
                "/var/run/secrets/kubernetes.io/serviceaccount/namespace".into(),
                NonSecret,
                own.clone(),
            ),
            (
                "/var/run/secrets/eks.amazonaws.com/serviceaccount/token".into(),
                ProjectedToken,
                own.clone(),
            ),
            (
                "/var/run/secrets/azure/tokens/azure-identity-token".into(),
                ProjectedToken,
                own.clone(),
            ),
            ("/etc/openai/api-key".into(), SecretVolume, own.clone()),
            (
                "/etc/openai/..data/api-key".into(),
                SecretVolume,
                own.clone(),
            ),
            (
                "/var/run/aws/token-dir/token".into(),
                ProjectedToken,
                own.clone(),
            ),
            ("/etc/app/settings.yaml".into(), Other, None),
            ("/etc/openaiX/key".into(), Other, None),
            (
                kubelet("kubernetes.io~projected/kube-api-access-9z/..2026_11_23_07_00_00.1/token"),
                ServiceAccountToken,
                Some(other.into()),
            ),
            (
                kubelet("kubernetes.io~projected/kube-api-access-9z/ca.crt"),
                NonSecret,
                Some(other.into()),
            ),
            (
                kubelet("kubernetes.io~projected/aws-iam-token/token"),
                ProjectedToken,
                Some(other.into()),
            ),
            (
                kubelet("kubernetes.io~secret/db-password/password"),
                SecretVolume,
                Some(other.into()),
            ),
            (
                kubelet("kubernetes.io~csi/secrets-store/key"),
                SecretVolume,
                Some(other.into()),
            ),
            (
                "/var/lib/kubelet/pki/kubelet-client-current.pem".into(),
                NodePki,
                None,
            ),
            ("/var/lib/kubelet/kubeconfig".into(), NodeKubeconfig, None),
            ("/etc/kubernetes/admin.conf".into(), NodeKubeconfig, None),
            ("/etc/kubernetes/kubelet.conf".into(), NodeKubeconfig, None),
            ("/etc/kubernetes/pki/apiserver.key".into(), NodePki, None),
            ("/etc/rancher/k3s/k3s.yaml".into(), NodeKubeconfig, None),
            ("/root/.kube/config".into(), NodeKubeconfig, None),
            ("/root/.aws/credentials".into(), CloudCredentials, None),
            (
                "/root/.config/gcloud/application_default_credentials.json".into(),
                CloudCredentials,
                None,
            ),
            (
                "/root/.azure/msal_token_cache.json".into(),
                CloudCredentials,
                None,
            ),
        ];
        for (path, class, owner) in cases {
            assert_eq!(class_of(&path), (class, owner), "{path}");
        }
    }

    #[test]
    fn environ_names_the_process() {
        let c = classify("/proc/4242/environ", "/var/lib/kubelet", None, None);
        assert_eq!(c.class, CredentialClass::ProcEnviron);
        assert_eq!(c.environ_pid, Some(4242));
        assert_eq!(
            classify("/proc/self/environ", "/var/lib/kubelet", None, None).environ_pid,
            None
        );
    }

    #[test]
    fn a_custom_kubelet_root_is_honoured() {
        let c = classify(
            &format!("/tmp/k/pods/{UID}/volumes/kubernetes.io~secret/s/x"),
            "/tmp/k/",
            None,
            None,
        );
        assert_eq!(
            (c.class, c.owner_pod_uid.as_deref()),
            (CredentialClass::SecretVolume, Some(UID))
        );
    }

    #[test]
    fn host_readers_own_no_in_container_path() {
        let c = classify(
            "/run/secrets/kubernetes.io/serviceaccount/token",
            "/var/lib/kubelet",
            None,
            None,
        );
        assert_eq!(
            (c.class, c.owner_pod_uid),
            (CredentialClass::ServiceAccountToken, None)
        );
        // A pod whose metadata is unknown still owns its in-container token.
        let c = classify(
            "/run/secrets/kubernetes.io/serviceaccount/token",
            "/var/lib/kubelet",
            Some(UID),
            None,
        );
        assert_eq!(c.owner_pod_uid.as_deref(), Some(UID));
    }
}
