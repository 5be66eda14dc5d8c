//! The Kubernetes manifests of `deploy/`, as `kubectl kustomize` renders them: every object
//! is a known type without unknown fields, the DaemonSet keeps its security invariants,
//! RBAC stays read-only, the CRD is the one the Rust types generate, the configs parse as
//! agent-monitor configs, and the two-tier example's policies are valid and select its
//! workloads.
//!
//! Needs `kubectl` (with its built-in kustomize) on PATH; no cluster, no root.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
};

use agent_monitor::{
    config::{Config, PodSourceKind},
    identity::Workload,
    policy::{crd_yaml, validate_policy, AgentPolicy, PolicySet, Tier},
};
use k8s_openapi::{
    api::{
        apps::v1::{DaemonSet, Deployment},
        core::v1::{ConfigMap, Container, Namespace, PodSpec, Service, ServiceAccount},
        networking::v1::NetworkPolicy,
        rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding, Subject},
        scheduling::v1::PriorityClass,
    },
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use kube::CustomResourceExt as _;
use serde::{de::DeserializeOwned, Serialize};
use serde_json::Value;

/// The capabilities the daemon's container adds, as README.md documents them (without the
/// `CAP_` prefix, as Kubernetes spells them). The set is still being measured: change it
/// here, in deploy/base/daemonset.yaml and in README.md together.
const DOCUMENTED_CAPABILITIES: &[&str] = &["BPF", "PERFMON"];

/// What each overlay changes in deploy/base/config.yaml: the key path it adds and the
/// value it adds there. An overlay that is not listed here fails the test.
fn overlay_config_changes() -> BTreeMap<&'static str, (&'static [&'static str], Value)> {
    BTreeMap::from([
        (
            "falcosidekick",
            (
                &["falcosidekick"][..],
                serde_json::json!({"url": "http://falcosidekick.falco.svc:2801/"}),
            ),
        ),
        (
            "mtls",
            (
                &["grpc", "tls"][..],
                serde_json::json!({
                    "cert": "/etc/agent-monitor/tls/tls.crt",
                    "key": "/etc/agent-monitor/tls/tls.key",
                    "client_ca": "/etc/agent-monitor/tls/ca.crt",
                }),
            ),
        ),
    ])
}

/// The hostPath volumes of the daemon: host path, mount path, mount propagation.
const HOST_PATHS: &[(&str, &str, Option<&str>)] = &[
    ("/sys/kernel/tracing", "/sys/kernel/tracing", None),
    ("/sys/kernel/btf", "/sys/kernel/btf", None),
    (
        "/sys/fs/cgroup",
        "/host/sys/fs/cgroup",
        Some("HostToContainer"),
    ),
    (
        "/var/lib/kubelet",
        "/var/lib/kubelet",
        Some("HostToContainer"),
    ),
    ("/etc/kubernetes", "/etc/kubernetes", None),
    (JOURNAL_HOST_PATH, JOURNAL_HOST_PATH, None),
];

/// The one hostPath the daemon writes, and the only one created on the host if missing
/// (DirectoryOrCreate): the forensic journal (`journal.dir`), which must outlive the pod,
/// so it cannot be an emptyDir. The directory is the daemon's own (nothing else of the
/// host is under it), which is what makes it safe to mount read-write and to create.
/// Every other hostPath stays read-only and must exist already.
const JOURNAL_HOST_PATH: &str = "/var/lib/agent-monitor/journal";

const COMMON_LABEL: (&str, &str) = ("app.kubernetes.io/name", "agent-monitor");

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the crate is in a workspace")
        .to_owned()
}

// ---------------------------------------------------------------------------------------
// Rendering and typing
// ---------------------------------------------------------------------------------------

/// One rendered object, typed by its kind.
#[derive(Debug)]
enum Object {
    Namespace(Namespace),
    PriorityClass(PriorityClass),
    ServiceAccount(ServiceAccount),
    ClusterRole(ClusterRole),
    ClusterRoleBinding(ClusterRoleBinding),
    Role(Role),
    RoleBinding(RoleBinding),
    ConfigMap(ConfigMap),
    Service(Service),
    NetworkPolicy(NetworkPolicy),
    DaemonSet(DaemonSet),
    Deployment(Deployment),
    CustomResourceDefinition(CustomResourceDefinition),
    AgentPolicy(AgentPolicy),
}

/// The objects of `kinds!(rendered, Kind)`, as `Vec<&Kind>`.
macro_rules! kinds {
    ($rendered:expr, $kind:ident) => {
        $rendered
            .objects
            .iter()
            .filter_map(|o| match o {
                Object::$kind(x) => Some(x),
                _ => None,
            })
            .collect::<Vec<_>>()
    };
}

/// One kustomization, rendered.
#[derive(Debug)]
struct Rendered {
    /// `base`, `overlays/mtls`, `examples/two-tier`: the directory under deploy/.
    name: String,
    objects: Vec<Object>,
}

/// Runs `kubectl kustomize` on `deploy/<dir>`.
fn kustomize(dir: &str) -> String {
    let path = repo_root().join("deploy").join(dir);
    let out = match Command::new("kubectl").arg("kustomize").arg(&path).output() {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "kubectl is not installed (or not on PATH): the deploy/ manifests are rendered \
             with `kubectl kustomize` (kubectl 1.27 or later, offline, no cluster needed)"
        ),
        Err(e) => panic!("running kubectl kustomize {}: {e}", path.display()),
    };
    assert!(
        out.status.success(),
        "kubectl kustomize {} failed ({}):\n{}",
        path.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("kubectl prints UTF-8")
}

/// The documents of a multi-document YAML stream, as JSON values; empty ones skipped.
fn documents(text: &str, what: &str) -> Vec<Value> {
    serde_saphyr::from_multiple::<Value>(text)
        .unwrap_or_else(|e| panic!("{what}: {e}"))
        .into_iter()
        .filter(|v| !v.is_null())
        .collect()
}

/// Whether a value is what a type writes for a field the input left out: serde `default`
/// fields that the type always serializes (AgentPolicy's `selector: {}`, `disabled: false`)
/// come back from the round trip without having been written. They mean the same as the
/// absent field, so they are no difference; a non-empty added value is.
fn is_default_like(v: &Value) -> bool {
    match v {
        Value::Null | Value::Bool(false) => true,
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        _ => false,
    }
}

/// The differences between the rendered object and its round trip through its type, as
/// JSON paths. A field the type does not know is missing from the round trip. Besides
/// default-like added fields ([`is_default_like`]) and numbers compared by value (`0` and
/// `0.0`), nothing is normalized: k8s-openapi keeps int-or-string values as they were
/// written (`IntOrString::Int` / `::String`) and quantities are strings in these manifests.
fn differences(path: &str, rendered: &Value, back: &Value, out: &mut Vec<String>) {
    match (rendered, back) {
        (Value::Object(r), Value::Object(b)) => {
            for (k, rv) in r {
                let p = format!("{path}.{k}");
                match b.get(k) {
                    Some(bv) => differences(&p, rv, bv, out),
                    None => out.push(format!("{p}: unknown to the type (dropped by it)")),
                }
            }
            for (k, bv) in b {
                if !r.contains_key(k) && !is_default_like(bv) {
                    out.push(format!("{path}.{k}: added by the type as {bv}"));
                }
            }
        }
        (Value::Array(r), Value::Array(b)) if r.len() == b.len() => {
            for (i, (rv, bv)) in r.iter().zip(b).enumerate() {
                differences(&format!("{path}[{i}]"), rv, bv, out);
            }
        }
        _ if rendered == back => {}
        // A JSON number is a number: k8s-openapi holds JSON-schema bounds (`minimum: 0`) as
        // f64 and writes them back as `0.0`, the same value.
        (Value::Number(r), Value::Number(b)) if r.as_f64() == b.as_f64() => {}
        _ => out.push(format!("{path}: rendered {rendered}, read back as {back}")),
    }
}

/// `value` as a `T`, failing on anything `T` does not represent exactly.
fn typed<T: DeserializeOwned + Serialize>(value: &Value, what: &str) -> T {
    let object: T = serde_json::from_value(value.clone())
        .unwrap_or_else(|e| panic!("{what}: does not parse as its type: {e}"));
    let back = serde_json::to_value(&object).expect("a typed object serializes");
    let mut diffs = Vec::new();
    differences("$", value, &back, &mut diffs);
    assert!(
        diffs.is_empty(),
        "{what}: fields that its type does not know or reads differently (misspelt or \
         misplaced?):\n  {}",
        diffs.join("\n  ")
    );
    object
}

fn to_object(value: &Value, origin: &str) -> Object {
    let kind = value["kind"].as_str().unwrap_or_default();
    let api_version = value["apiVersion"].as_str().unwrap_or_default();
    let name = value["metadata"]["name"].as_str().unwrap_or_default();
    let what = format!("{origin}: {api_version} {kind} {name:?}");
    match kind {
        "Namespace" => Object::Namespace(typed(value, &what)),
        "PriorityClass" => Object::PriorityClass(typed(value, &what)),
        "ServiceAccount" => Object::ServiceAccount(typed(value, &what)),
        "ClusterRole" => Object::ClusterRole(typed(value, &what)),
        "ClusterRoleBinding" => Object::ClusterRoleBinding(typed(value, &what)),
        "Role" => Object::Role(typed(value, &what)),
        "RoleBinding" => Object::RoleBinding(typed(value, &what)),
        "ConfigMap" => Object::ConfigMap(typed(value, &what)),
        "Service" => Object::Service(typed(value, &what)),
        "NetworkPolicy" => Object::NetworkPolicy(typed(value, &what)),
        "DaemonSet" => Object::DaemonSet(typed(value, &what)),
        "Deployment" => Object::Deployment(typed(value, &what)),
        "CustomResourceDefinition" => Object::CustomResourceDefinition(typed(value, &what)),
        "AgentPolicy" => {
            // kube's AgentPolicy reads apiVersion and kind without checking them; the
            // round trip writes its own, so a wrong apiVersion shows as a difference.
            Object::AgentPolicy(typed(value, &what))
        }
        _ => panic!(
            "{what}: kind {kind:?} is not one this test knows; add it to `Object` with its \
             k8s-openapi type"
        ),
    }
}

/// Every kustomization under deploy/: the base, each overlay, and the two-tier example.
fn kustomizations() -> Vec<String> {
    let mut out = vec!["base".to_owned()];
    let overlays = repo_root().join("deploy/overlays");
    let mut names: Vec<String> = std::fs::read_dir(&overlays)
        .unwrap_or_else(|e| panic!("{}: {e}", overlays.display()))
        .map(|e| e.expect("directory entry"))
        .filter(|e| e.path().join("kustomization.yaml").is_file())
        .map(|e| format!("overlays/{}", e.file_name().to_string_lossy()))
        .collect();
    names.sort();
    assert!(!names.is_empty(), "no overlays in {}", overlays.display());
    out.extend(names);
    out.push("examples/two-tier".to_owned());
    out
}

/// All kustomizations, rendered once per test binary.
fn rendered() -> &'static [Rendered] {
    static RENDERED: OnceLock<Vec<Rendered>> = OnceLock::new();
    RENDERED.get_or_init(|| {
        kustomizations()
            .into_iter()
            .map(|name| {
                let text = kustomize(&name);
                let origin = format!("deploy/{name}");
                let objects = documents(&text, &origin)
                    .iter()
                    .map(|v| to_object(v, &origin))
                    .collect();
                Rendered { name, objects }
            })
            .collect()
    })
}

fn render_of(name: &str) -> &'static Rendered {
    rendered()
        .iter()
        .find(|r| r.name == name)
        .unwrap_or_else(|| panic!("deploy/{name} was not rendered"))
}

/// The DaemonSet of `deploy/base` as `kubectl kustomize` renders it.
pub fn base_daemonset() -> DaemonSet {
    let base = render_of("base");
    let daemonsets = kinds!(base, DaemonSet);
    assert_eq!(daemonsets.len(), 1, "deploy/base has one DaemonSet");
    daemonsets[0].clone()
}

/// Renders that hold the daemon (the base and its overlays).
fn daemon_renders() -> Vec<&'static Rendered> {
    rendered()
        .iter()
        .filter(|r| r.name == "base" || r.name.starts_with("overlays/"))
        .collect()
}

fn pod_spec(ds: &DaemonSet) -> &PodSpec {
    ds.spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .expect("DaemonSet has a pod spec")
}

fn daemon_container(ds: &DaemonSet) -> &Container {
    let spec = pod_spec(ds);
    assert_eq!(spec.containers.len(), 1, "the daemon pod has one container");
    assert!(
        spec.init_containers.as_ref().is_none_or(Vec::is_empty),
        "the daemon pod has no init containers"
    );
    &spec.containers[0]
}

// ---------------------------------------------------------------------------------------
// Every object
// ---------------------------------------------------------------------------------------

#[test]
fn every_kustomization_renders_into_known_types() {
    for r in rendered() {
        assert!(!r.objects.is_empty(), "deploy/{} renders nothing", r.name);
    }
    for r in daemon_renders() {
        let ns = kinds!(r, Namespace);
        assert_eq!(ns.len(), 1, "deploy/{}: one Namespace", r.name);
        assert_eq!(ns[0].metadata.name.as_deref(), Some("agent-monitor"));
        assert_eq!(kinds!(r, DaemonSet).len(), 1, "deploy/{}", r.name);
        assert_eq!(
            kinds!(r, CustomResourceDefinition).len(),
            1,
            "deploy/{}",
            r.name
        );
    }
}

/// Both the daemon and the example workloads: nothing privileged, no escalation, a
/// read-only root, all capabilities dropped (the daemon adds exactly the documented ones),
/// hostPath mounts read-only (but the daemon's journal, JOURNAL_HOST_PATH), all three probes (startup for the daemon), requests and a
/// memory limit.
#[test]
fn containers_are_locked_down() {
    let documented: Vec<String> = DOCUMENTED_CAPABILITIES
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
    for r in rendered() {
        let mut pods: Vec<(String, &PodSpec, bool)> = Vec::new();
        for ds in kinds!(r, DaemonSet) {
            pods.push((
                format!("deploy/{}: DaemonSet {:?}", r.name, ds.metadata.name),
                pod_spec(ds),
                true,
            ));
        }
        for d in kinds!(r, Deployment) {
            let spec = d
                .spec
                .as_ref()
                .and_then(|s| s.template.spec.as_ref())
                .expect("Deployment has a pod spec");
            pods.push((
                format!("deploy/{}: Deployment {:?}", r.name, d.metadata.name),
                spec,
                false,
            ));
        }
        for (what, spec, is_daemon) in pods {
            assert_ne!(spec.host_network, Some(true), "{what}: hostNetwork");
            assert_ne!(spec.host_ipc, Some(true), "{what}: hostIPC");
            let seccomp = spec
                .security_context
                .as_ref()
                .and_then(|s| s.seccomp_profile.as_ref())
                .map(|p| p.type_.as_str());
            assert_eq!(seccomp, Some("RuntimeDefault"), "{what}: seccomp profile");
            let host_volumes: BTreeMap<&str, &str> = spec
                .volumes
                .iter()
                .flatten()
                .filter_map(|v| Some((v.name.as_str(), v.host_path.as_ref()?.path.as_str())))
                .collect();
            let containers = spec
                .containers
                .iter()
                .chain(spec.init_containers.iter().flatten());
            for c in containers {
                let what = format!("{what}, container {}", c.name);
                let sc = c
                    .security_context
                    .as_ref()
                    .unwrap_or_else(|| panic!("{what}: no securityContext"));
                assert_ne!(sc.privileged, Some(true), "{what}: privileged");
                assert_eq!(
                    sc.allow_privilege_escalation,
                    Some(false),
                    "{what}: allowPrivilegeEscalation must be false"
                );
                assert_eq!(
                    sc.read_only_root_filesystem,
                    Some(true),
                    "{what}: readOnlyRootFilesystem must be true"
                );
                let caps = sc
                    .capabilities
                    .as_ref()
                    .unwrap_or_else(|| panic!("{what}: no capabilities"));
                assert_eq!(
                    caps.drop.as_deref(),
                    Some(&["ALL".to_owned()][..]),
                    "{what}: capabilities.drop must be exactly [ALL]"
                );
                let added = caps.add.clone().unwrap_or_default();
                if is_daemon {
                    assert_eq!(
                        added, documented,
                        "{what}: capabilities.add must be exactly DOCUMENTED_CAPABILITIES"
                    );
                } else {
                    assert!(added.is_empty(), "{what}: adds capabilities {added:?}");
                }
                for m in c.volume_mounts.iter().flatten() {
                    let Some(host) = host_volumes.get(m.name.as_str()) else {
                        continue;
                    };
                    // The journal, by host and mount path: see JOURNAL_HOST_PATH.
                    let journal = is_daemon
                        && *host == JOURNAL_HOST_PATH
                        && m.mount_path == JOURNAL_HOST_PATH;
                    if !journal {
                        assert_eq!(
                            m.read_only,
                            Some(true),
                            "{what}: hostPath volume {} mounted at {} must be readOnly",
                            m.name,
                            m.mount_path
                        );
                    }
                }
                assert!(c.liveness_probe.is_some(), "{what}: no livenessProbe");
                assert!(c.readiness_probe.is_some(), "{what}: no readinessProbe");
                if is_daemon {
                    assert!(c.startup_probe.is_some(), "{what}: no startupProbe");
                }
                let resources = c
                    .resources
                    .as_ref()
                    .unwrap_or_else(|| panic!("{what}: no resources"));
                let requests = resources.requests.clone().unwrap_or_default();
                let limits = resources.limits.clone().unwrap_or_default();
                for key in ["cpu", "memory"] {
                    assert!(requests.contains_key(key), "{what}: no {key} request");
                }
                assert!(limits.contains_key("memory"), "{what}: no memory limit");
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// The daemon
// ---------------------------------------------------------------------------------------

#[test]
fn daemonset_runs_the_daemon_on_every_node() {
    assert_eq!(
        base_daemonset().metadata.name.as_deref(),
        Some("agent-monitor")
    );
    for r in daemon_renders() {
        let ds = kinds!(r, DaemonSet)[0];
        let what = format!("deploy/{}: DaemonSet", r.name);
        assert_eq!(ds.metadata.name.as_deref(), Some("agent-monitor"), "{what}");
        assert_eq!(
            ds.metadata.namespace.as_deref(),
            Some("agent-monitor"),
            "{what}"
        );
        let spec = pod_spec(ds);
        let c = daemon_container(ds);
        assert_eq!(c.name, "agent-monitor", "{what}");
        let image = c.image.as_deref().unwrap_or_default();
        assert!(
            image.contains("agent-monitor"),
            "{what}: image {image:?} is not agent-monitor's"
        );
        assert_eq!(spec.host_pid, Some(true), "{what}: hostPID");
        assert_eq!(
            spec.service_account_name.as_deref(),
            Some("agent-monitor"),
            "{what}"
        );
        assert_eq!(
            spec.priority_class_name.as_deref(),
            Some("agent-monitor-node-critical"),
            "{what}"
        );
        assert!(
            kinds!(r, PriorityClass)
                .iter()
                .any(|p| p.metadata.name.as_deref() == Some("agent-monitor-node-critical")),
            "{what}: its PriorityClass is not rendered"
        );
        let tolerations = spec.tolerations.clone().unwrap_or_default();
        assert!(
            tolerations
                .iter()
                .any(|t| t.operator.as_deref() == Some("Exists")
                    && t.key.is_none()
                    && t.effect.is_none()),
            "{what}: must tolerate every taint (operator: Exists, no key, no effect)"
        );
        assert_eq!(spec.termination_grace_period_seconds, Some(30), "{what}");
        let sc = c.security_context.as_ref().expect("checked elsewhere");
        assert_eq!(sc.run_as_user, Some(0), "{what}: runAsUser");
        assert_eq!(sc.run_as_non_root, Some(false), "{what}: runAsNonRoot");

        // NODE_NAME from the downward API.
        let node_name = c
            .env
            .iter()
            .flatten()
            .find(|e| e.name == "NODE_NAME")
            .unwrap_or_else(|| panic!("{what}: no NODE_NAME env"));
        let field = node_name
            .value_from
            .as_ref()
            .and_then(|v| v.field_ref.as_ref())
            .map(|f| f.field_path.as_str());
        assert_eq!(field, Some("spec.nodeName"), "{what}: NODE_NAME");
        assert!(
            node_name.value.is_none(),
            "{what}: NODE_NAME has a literal value"
        );

        // Probes on the admin port.
        for (probe, path) in [
            (&c.startup_probe, "/readyz"),
            (&c.readiness_probe, "/readyz"),
            (&c.liveness_probe, "/healthz"),
        ] {
            let get = probe
                .as_ref()
                .and_then(|p| p.http_get.as_ref())
                .unwrap_or_else(|| panic!("{what}: {path} probe is not httpGet"));
            assert_eq!(get.path.as_deref(), Some(path), "{what}");
            assert_eq!(
                get.port,
                k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(9880),
                "{what}: {path} probe port"
            );
        }
        let startup = c.startup_probe.as_ref().expect("checked above");
        let budget = startup.period_seconds.unwrap_or(10) * startup.failure_threshold.unwrap_or(3);
        assert!(
            (30..=120).contains(&budget),
            "{what}: the startup probe allows {budget} s"
        );
        let ports: BTreeMap<i32, Option<String>> = c
            .ports
            .iter()
            .flatten()
            .map(|p| (p.container_port, p.name.clone()))
            .collect();
        assert_eq!(
            ports,
            BTreeMap::from([
                (50051, Some("grpc".to_owned())),
                (9880, Some("metrics".to_owned()))
            ]),
            "{what}: container ports"
        );

        // The hostPath volumes, read-only, at their paths, with their propagation.
        let volumes = spec.volumes.clone().unwrap_or_default();
        let mounts = c.volume_mounts.clone().unwrap_or_default();
        let mut host_paths: Vec<(String, String, Option<String>)> = Vec::new();
        for v in &volumes {
            let Some(hp) = &v.host_path else { continue };
            let m = mounts
                .iter()
                .find(|m| m.name == v.name)
                .unwrap_or_else(|| panic!("{what}: hostPath volume {} is not mounted", v.name));
            if hp.path == JOURNAL_HOST_PATH {
                // The journal's own directory (see JOURNAL_HOST_PATH): created on a new
                // node and written, and mounted nowhere else.
                assert_eq!(
                    hp.type_.as_deref(),
                    Some("DirectoryOrCreate"),
                    "{what}: the journal hostPath"
                );
                assert_ne!(
                    m.read_only,
                    Some(true),
                    "{what}: the journal must be writable"
                );
            } else {
                assert_ne!(
                    hp.type_.as_deref(),
                    Some("DirectoryOrCreate"),
                    "{what}: hostPath {} must not be created on the host",
                    hp.path
                );
            }
            host_paths.push((
                hp.path.clone(),
                m.mount_path.clone(),
                m.mount_propagation.clone(),
            ));
        }
        host_paths.sort();
        let mut want: Vec<(String, String, Option<String>)> = HOST_PATHS
            .iter()
            .map(|(h, m, p)| ((*h).to_owned(), (*m).to_owned(), p.map(str::to_owned)))
            .collect();
        want.sort();
        assert_eq!(host_paths, want, "{what}: hostPath volumes");

        // Every ConfigMap the pod mounts is rendered alongside it.
        for v in &volumes {
            if let Some(cm) = &v.config_map {
                assert!(
                    kinds!(r, ConfigMap)
                        .iter()
                        .any(|m| m.metadata.name.as_deref() == Some(cm.name.as_str())),
                    "{what}: ConfigMap {} is not rendered",
                    cm.name
                );
            }
        }

        // The Service and the NetworkPolicy select the daemon's pods.
        let pod_labels = ds
            .spec
            .as_ref()
            .and_then(|s| s.template.metadata.as_ref())
            .and_then(|m| m.labels.clone())
            .unwrap_or_default();
        assert_eq!(
            pod_labels.get(COMMON_LABEL.0).map(String::as_str),
            Some(COMMON_LABEL.1),
            "{what}: pod label"
        );
        let selects = |selector: &BTreeMap<String, String>| {
            !selector.is_empty() && selector.iter().all(|(k, v)| pod_labels.get(k) == Some(v))
        };
        let selector = ds
            .spec
            .as_ref()
            .and_then(|s| s.selector.match_labels.clone())
            .unwrap_or_default();
        assert!(selects(&selector), "{what}: selector {selector:?}");
        let services = kinds!(r, Service);
        assert_eq!(services.len(), 1, "{what}: one Service");
        let svc = services[0].spec.as_ref().expect("Service spec");
        assert!(
            selects(&svc.selector.clone().unwrap_or_default()),
            "{what}: the Service does not select the daemon"
        );
        let svc_ports: BTreeSet<i32> = svc.ports.iter().flatten().map(|p| p.port).collect();
        assert_eq!(
            svc_ports,
            BTreeSet::from([50051, 9880]),
            "{what}: Service ports"
        );
        let policies = kinds!(r, NetworkPolicy);
        assert_eq!(policies.len(), 1, "{what}: one NetworkPolicy");
        let np = policies[0].spec.as_ref().expect("NetworkPolicy spec");
        assert!(
            selects(
                &np.pod_selector
                    .clone()
                    .unwrap_or_default()
                    .match_labels
                    .unwrap_or_default()
            ),
            "{what}: the NetworkPolicy does not select the daemon"
        );
    }
}

/// The base's NetworkPolicy admits gRPC from its own namespace only.
#[test]
fn base_grpc_is_reachable_from_its_namespace_only() {
    let base = render_of("base");
    let np = kinds!(base, NetworkPolicy)[0]
        .spec
        .as_ref()
        .expect("NetworkPolicy spec");
    let ingress = np.ingress.clone().unwrap_or_default();
    for rule in &ingress {
        let ports: Vec<_> = rule
            .ports
            .iter()
            .flatten()
            .filter_map(|p| p.port.clone())
            .collect();
        let grpc =
            ports.contains(&k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(50051));
        if grpc {
            let from = rule.from.clone().unwrap_or_default();
            assert!(!from.is_empty(), "gRPC open to every source: {rule:?}");
            for peer in &from {
                assert!(
                    peer.namespace_selector.is_none() && peer.ip_block.is_none(),
                    "gRPC reachable from outside the namespace: {peer:?}"
                );
            }
        }
    }
}

#[test]
fn the_cluster_role_is_read_only_on_pods_and_agentpolicies() {
    for r in daemon_renders() {
        let roles = kinds!(r, ClusterRole);
        assert_eq!(roles.len(), 1, "deploy/{}: one ClusterRole", r.name);
        let role = roles[0];
        assert_eq!(
            grants(role.rules.as_deref().unwrap_or_default()),
            read_only(&[("", "pods"), ("agent-monitor.dev", "agentpolicies")]),
            "deploy/{}: ClusterRole rules",
            r.name
        );
        assert!(role.aggregation_rule.is_none(), "deploy/{}", r.name);
        let bindings = kinds!(r, ClusterRoleBinding);
        assert_eq!(
            bindings.len(),
            1,
            "deploy/{}: one ClusterRoleBinding",
            r.name
        );
        let b = bindings[0];
        assert_eq!(b.role_ref.kind, "ClusterRole");
        assert_eq!(
            Some(b.role_ref.name.as_str()),
            role.metadata.name.as_deref()
        );
        assert_eq!(
            service_accounts(b.subjects.as_deref().unwrap_or_default()),
            BTreeSet::from([("agent-monitor".to_owned(), "agent-monitor".to_owned())]),
            "deploy/{}: ClusterRoleBinding subjects",
            r.name
        );
        assert!(
            kinds!(r, ServiceAccount)
                .iter()
                .any(|s| s.metadata.name.as_deref() == Some("agent-monitor")),
            "deploy/{}: the ServiceAccount is not rendered",
            r.name
        );
    }
}

/// (apiGroup, resource, verb) triples; a rule with resourceNames or nonResourceURLs fails.
fn grants(rules: &[PolicyRule]) -> BTreeSet<(String, String, String)> {
    let mut out = BTreeSet::new();
    for rule in rules {
        assert!(
            rule.resource_names.is_none() && rule.non_resource_urls.is_none(),
            "rule with resourceNames or nonResourceURLs: {rule:?}"
        );
        for g in rule.api_groups.iter().flatten() {
            for res in rule.resources.iter().flatten() {
                for v in &rule.verbs {
                    out.insert((g.clone(), res.clone(), v.clone()));
                }
            }
        }
    }
    out
}

fn read_only(resources: &[(&str, &str)]) -> BTreeSet<(String, String, String)> {
    let mut out = BTreeSet::new();
    for (g, r) in resources {
        for v in ["get", "list", "watch"] {
            out.insert(((*g).to_owned(), (*r).to_owned(), v.to_owned()));
        }
    }
    out
}

/// (namespace, name) of the ServiceAccount subjects; any other kind of subject fails.
fn service_accounts(subjects: &[Subject]) -> BTreeSet<(String, String)> {
    subjects
        .iter()
        .map(|s| {
            assert_eq!(s.kind, "ServiceAccount", "subject {s:?}");
            (s.namespace.clone().unwrap_or_default(), s.name.clone())
        })
        .collect()
}

/// The CRD in the render is, as a parsed value, the one the Rust types generate.
#[test]
fn rendered_crd_is_the_generated_one() {
    let generated = serde_json::to_value(AgentPolicy::crd()).expect("CRD to JSON");
    let from_yaml: Value = serde_saphyr::from_str(&crd_yaml()).expect("crd_yaml() parses");
    assert_eq!(generated, from_yaml, "crd_yaml() is AgentPolicy::crd()");
    for r in daemon_renders() {
        let crds = kinds!(r, CustomResourceDefinition);
        let mut crd = serde_json::to_value(crds[0]).expect("CRD to JSON");
        // deploy/base labels every object it renders with app.kubernetes.io/name (so
        // `kubectl get crd -l app.kubernetes.io/name=agent-monitor` finds it); that label
        // is the only thing kustomize adds.
        let labels = crd["metadata"]["labels"]
            .as_object_mut()
            .unwrap_or_else(|| panic!("deploy/{}: the CRD has no labels", r.name));
        assert_eq!(
            labels.remove(COMMON_LABEL.0),
            Some(Value::from(COMMON_LABEL.1)),
            "deploy/{}: CRD label",
            r.name
        );
        if labels.is_empty() {
            crd["metadata"]
                .as_object_mut()
                .expect("metadata")
                .remove("labels");
        }
        let mut diffs = Vec::new();
        differences("$", &crd, &generated, &mut diffs);
        differences("$", &generated, &crd, &mut diffs);
        assert!(
            crd == generated,
            "deploy/{}: the CRD differs from AgentPolicy::crd():\n  {}",
            r.name,
            diffs.join("\n  ")
        );
    }
}

// ---------------------------------------------------------------------------------------
// The daemon's config
// ---------------------------------------------------------------------------------------

/// The text of the config file the DaemonSet passes to `--config`, from the ConfigMap
/// mounted there.
fn daemon_config_text(r: &Rendered) -> String {
    let ds = kinds!(r, DaemonSet)[0];
    let c = daemon_container(ds);
    let args = c.args.clone().unwrap_or_default();
    assert_eq!(
        args.first().map(String::as_str),
        Some("run"),
        "deploy/{}: args {args:?}",
        r.name
    );
    let file = args
        .iter()
        .position(|a| a == "--config")
        .and_then(|i| args.get(i + 1))
        .unwrap_or_else(|| panic!("deploy/{}: no --config in {args:?}", r.name));
    let mount = c
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| {
            let sub = m.sub_path.as_deref().unwrap_or_default();
            let dir = m.mount_path.trim_end_matches('/');
            (sub.is_empty() && file.starts_with(&format!("{dir}/"))) || m.mount_path == *file
        })
        .unwrap_or_else(|| panic!("deploy/{}: nothing is mounted at {file}", r.name));
    let key = match mount.sub_path.as_deref() {
        Some(sub) if !sub.is_empty() => sub.to_owned(),
        _ => file[mount.mount_path.trim_end_matches('/').len() + 1..].to_owned(),
    };
    let volume = pod_spec(ds)
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == mount.name)
        .expect("the mount's volume");
    let cm_name = &volume
        .config_map
        .as_ref()
        .unwrap_or_else(|| panic!("deploy/{}: {file} is not from a ConfigMap", r.name))
        .name;
    let cm = kinds!(r, ConfigMap)
        .into_iter()
        .find(|m| m.metadata.name.as_deref() == Some(cm_name.as_str()))
        .unwrap_or_else(|| panic!("deploy/{}: ConfigMap {cm_name} is not rendered", r.name));
    cm.data
        .as_ref()
        .and_then(|d| d.get(&key))
        .unwrap_or_else(|| panic!("deploy/{}: ConfigMap {cm_name} has no key {key}", r.name))
        .clone()
}

/// The config as agent-monitor reads it in the pod, where NODE_NAME is set (Config::parse
/// reads it from the environment; the test sets the same field in the text instead of
/// changing the process environment under other tests).
fn parse_daemon_config(r: &Rendered, text: &str) -> Config {
    let mut value: Value =
        serde_saphyr::from_str(text).unwrap_or_else(|e| panic!("deploy/{}: config: {e}", r.name));
    let pods = value
        .get_mut("identity")
        .and_then(|v| v.get_mut("pods"))
        .and_then(Value::as_object_mut)
        .unwrap_or_else(|| panic!("deploy/{}: config has no identity.pods", r.name));
    assert!(
        !pods.contains_key("node_name"),
        "deploy/{}: identity.pods.node_name is set; it comes from NODE_NAME",
        r.name
    );
    pods.insert("node_name".into(), "node-from-downward-api".into());
    let text = serde_saphyr::to_string(&value).expect("YAML");
    let file = PathBuf::from(format!("deploy/{}/config.yaml", r.name));
    Config::parse(&text, &file).unwrap_or_else(|e| panic!("{e}"))
}

fn port_of(listen: &str) -> u16 {
    listen
        .parse::<std::net::SocketAddr>()
        .unwrap_or_else(|e| panic!("{listen:?}: {e}"))
        .port()
}

#[test]
fn daemon_configs_parse_and_match_the_pod() {
    for r in daemon_renders() {
        let text = daemon_config_text(r);
        let config = parse_daemon_config(r, &text);
        let what = format!("deploy/{}: config", r.name);
        assert_eq!(config.output, "none", "{what}: events go to gRPC clients");
        assert_eq!(config.alerts.output, "-", "{what}");
        assert_eq!(config.identity.pods.source, PodSourceKind::Kube, "{what}");
        assert_eq!(port_of(&config.grpc.listen), 50051, "{what}");
        assert_eq!(port_of(&config.admin.listen), 9880, "{what}");

        let ds = kinds!(r, DaemonSet)[0];
        let c = daemon_container(ds);
        let spec = pod_spec(ds);
        let mount_of = |path: &str| {
            let path = path.trim_end_matches('/');
            c.volume_mounts
                .iter()
                .flatten()
                .find(|m| m.mount_path.trim_end_matches('/') == path)
                .unwrap_or_else(|| panic!("{what}: nothing is mounted at {path}"))
        };
        let host_path_of = |path: &str| {
            let m = mount_of(path);
            spec.volumes
                .iter()
                .flatten()
                .find(|v| v.name == m.name)
                .and_then(|v| v.host_path.as_ref())
                .map(|h| h.path.clone())
                .unwrap_or_else(|| panic!("{what}: {path} is not a hostPath"))
        };
        // The kubelet root is the host's, at the same path: the kernel reports host paths.
        assert_eq!(
            host_path_of(&config.identity.kubelet_root),
            config.identity.kubelet_root,
            "{what}: identity.kubelet_root"
        );
        // Checked on the YAML: identity.cgroup_root and detect.cluster_policies are newer
        // than some versions of Config; Config::parse above rejected them if unknown.
        let value: Value = serde_saphyr::from_str(&text).expect("parsed above");
        let cgroup_root = value["identity"]["cgroup_root"]
            .as_str()
            .unwrap_or_else(|| panic!("{what}: no identity.cgroup_root"));
        assert_eq!(
            host_path_of(cgroup_root),
            "/sys/fs/cgroup",
            "{what}: identity.cgroup_root"
        );
        assert_eq!(
            value["detect"]["cluster_policies"].as_bool(),
            Some(true),
            "{what}: detect.cluster_policies"
        );
        // The journal goes to the writable hostPath, at the host's path, so it outlives
        // the pod. Checked on the YAML, as above.
        let journal = value["journal"]["dir"]
            .as_str()
            .unwrap_or_else(|| panic!("{what}: no journal.dir"));
        assert_eq!(journal, JOURNAL_HOST_PATH, "{what}: journal.dir");
        assert_eq!(
            host_path_of(journal),
            JOURNAL_HOST_PATH,
            "{what}: journal.dir"
        );
        assert_ne!(
            mount_of(journal).read_only,
            Some(true),
            "{what}: journal.dir"
        );
        for p in &config.detect.policies {
            let m = mount_of(&p.to_string_lossy());
            let volume = spec
                .volumes
                .iter()
                .flatten()
                .find(|v| v.name == m.name)
                .expect("volume");
            assert!(
                volume.config_map.is_some(),
                "{what}: detect.policies {} is not a ConfigMap",
                p.display()
            );
        }
        if let Some(tls) = &config.grpc.tls {
            for f in [Some(&tls.cert), Some(&tls.key), tls.client_ca.as_ref()]
                .into_iter()
                .flatten()
            {
                let dir = f.parent().expect("a file in a directory");
                let m = mount_of(&dir.to_string_lossy());
                assert_eq!(m.read_only, Some(true), "{what}: {}", dir.display());
                let secret = spec
                    .volumes
                    .iter()
                    .flatten()
                    .find(|v| v.name == m.name)
                    .and_then(|v| v.secret.as_ref())
                    .unwrap_or_else(|| panic!("{what}: {} is not a Secret", dir.display()));
                assert_eq!(secret.secret_name.as_deref(), Some("agent-monitor-tls"));
            }
        }
    }
}

/// Removes the value at `path` from `value` and returns it.
fn take(value: &mut Value, path: &[&str]) -> Option<Value> {
    let (last, parents) = path.split_last()?;
    let mut v = value;
    for p in parents {
        v = v.get_mut(*p)?;
    }
    v.as_object_mut()?.remove(*last)
}

#[test]
fn overlay_configs_differ_from_the_base_only_where_intended() {
    let base_text = daemon_config_text(render_of("base"));
    let base: Value = serde_saphyr::from_str(&base_text).expect("base config");
    let changes = overlay_config_changes();
    for r in daemon_renders() {
        let Some(overlay) = r.name.strip_prefix("overlays/") else {
            continue;
        };
        let (path, added) = changes.get(overlay).unwrap_or_else(|| {
            panic!(
                "deploy/{}: overlay_config_changes() does not say what it changes",
                r.name
            )
        });
        let mut config: Value =
            serde_saphyr::from_str(&daemon_config_text(r)).expect("overlay config");
        let got = take(&mut config, path)
            .unwrap_or_else(|| panic!("deploy/{}: config has no {}", r.name, path.join(".")));
        let got: Value = serde_json::to_value(got).expect("JSON");
        assert_eq!(&got, added, "deploy/{}: {}", r.name, path.join("."));
        assert!(
            config == base,
            "deploy/{}/config.yaml differs from deploy/base/config.yaml in more than {}: \
             copy the base's change over.\nbase: {}\noverlay without {}: {}",
            r.name,
            path.join("."),
            serde_json::to_string(&base).expect("JSON"),
            path.join("."),
            serde_json::to_string(&config).expect("JSON"),
        );
    }
}

/// README.md names every capability the daemon adds.
#[test]
fn readme_documents_the_capabilities() {
    let readme = std::fs::read_to_string(repo_root().join("README.md")).expect("README.md");
    let missing: Vec<String> = DOCUMENTED_CAPABILITIES
        .iter()
        .map(|c| format!("CAP_{c}"))
        .filter(|c| !readme.contains(c.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "README.md does not mention {missing:?}, which deploy/base/daemonset.yaml adds"
    );
}

// ---------------------------------------------------------------------------------------
// The two-tier example
// ---------------------------------------------------------------------------------------

const TWO_TIER_NAMESPACE: &str = "agent-system";
const TWO_TIER_AGENTS: &[(&str, Tier)] = &[
    ("agent-proxy", Tier::Proxy),
    ("agent-worker-1", Tier::Worker),
    ("agent-worker-2", Tier::Worker),
    ("agent-worker-3", Tier::Worker),
];

#[test]
fn two_tier_rbac_is_one_read_only_role_for_all_agents() {
    let r = render_of("examples/two-tier");
    assert!(kinds!(r, ClusterRole).is_empty(), "no ClusterRole");
    assert!(
        kinds!(r, ClusterRoleBinding).is_empty(),
        "no ClusterRoleBinding"
    );
    let roles = kinds!(r, Role);
    assert_eq!(roles.len(), 1, "one Role");
    let role = roles[0];
    assert_eq!(role.metadata.name.as_deref(), Some("agent-reader"));
    assert_eq!(role.metadata.namespace.as_deref(), Some(TWO_TIER_NAMESPACE));
    assert_eq!(
        grants(role.rules.as_deref().unwrap_or_default()),
        read_only(&[("", "pods"), ("", "services"), ("", "configmaps")]),
        "Role agent-reader rules"
    );
    let mut bound = BTreeSet::new();
    for b in kinds!(r, RoleBinding) {
        assert_eq!(b.role_ref.kind, "Role", "{:?}", b.metadata.name);
        assert_eq!(b.role_ref.name, "agent-reader", "{:?}", b.metadata.name);
        bound.extend(service_accounts(b.subjects.as_deref().unwrap_or_default()));
    }
    let want: BTreeSet<(String, String)> = TWO_TIER_AGENTS
        .iter()
        .map(|(n, _)| (TWO_TIER_NAMESPACE.to_owned(), (*n).to_owned()))
        .collect();
    assert_eq!(bound, want, "ServiceAccounts bound to agent-reader");
    let accounts: BTreeSet<String> = kinds!(r, ServiceAccount)
        .iter()
        .map(|s| {
            assert_eq!(s.metadata.namespace.as_deref(), Some(TWO_TIER_NAMESPACE));
            s.metadata.name.clone().unwrap_or_default()
        })
        .collect();
    let want_accounts: BTreeSet<String> = TWO_TIER_AGENTS
        .iter()
        .map(|(n, _)| (*n).to_owned())
        .collect();
    assert_eq!(accounts, want_accounts, "ServiceAccounts");
}

/// Each agent runs as its own ServiceAccount with its agent and tier labels, and the
/// example's AgentPolicies are valid and give each agent the policy of its tier.
#[test]
fn two_tier_workloads_and_policies_agree() {
    let r = render_of("examples/two-tier");
    let policies: Vec<AgentPolicy> = kinds!(r, AgentPolicy).into_iter().cloned().collect();
    assert!(!policies.is_empty(), "no AgentPolicy in the example");
    for p in &policies {
        validate_policy(p).unwrap_or_else(|e| panic!("AgentPolicy {:?}: {e}", p.metadata.name));
        assert_eq!(p.metadata.namespace.as_deref(), Some(TWO_TIER_NAMESPACE));
    }
    let set = PolicySet::from(policies);
    let deployments = kinds!(r, Deployment);
    assert_eq!(deployments.len(), TWO_TIER_AGENTS.len(), "Deployments");
    for (name, tier) in TWO_TIER_AGENTS {
        let d = deployments
            .iter()
            .find(|d| d.metadata.name.as_deref() == Some(name))
            .unwrap_or_else(|| panic!("no Deployment {name}"));
        assert_eq!(d.metadata.namespace.as_deref(), Some(TWO_TIER_NAMESPACE));
        let template = &d.spec.as_ref().expect("spec").template;
        let spec = template.spec.as_ref().expect("pod spec");
        assert_eq!(spec.service_account_name.as_deref(), Some(*name), "{name}");
        let labels = template
            .metadata
            .as_ref()
            .and_then(|m| m.labels.clone())
            .unwrap_or_default();
        let tier_name = match tier {
            Tier::Proxy => "proxy",
            Tier::Worker => "worker",
        };
        assert_eq!(
            labels.get("agent-monitor.dev/agent").map(String::as_str),
            Some(*name),
            "{name}: agent label"
        );
        assert_eq!(
            labels.get("agent-monitor.dev/tier").map(String::as_str),
            Some(tier_name),
            "{name}: tier label"
        );
        let pod_sc = spec.security_context.as_ref().expect("pod securityContext");
        assert_eq!(pod_sc.run_as_non_root, Some(true), "{name}: runAsNonRoot");
        let workload = Workload {
            namespace: Some(TWO_TIER_NAMESPACE.to_owned()),
            service_account: Some((*name).to_owned()),
            agent: Some((*name).to_owned()),
            tier: Some(tier_name.to_owned()),
            labels: labels.clone(),
            ..Workload::default()
        };
        let policy = set
            .for_workload(&workload)
            .unwrap_or_else(|| panic!("{name}: no AgentPolicy selects it"));
        assert_eq!(policy.spec.tier, Some(*tier), "{name}: policy tier");
    }
}
