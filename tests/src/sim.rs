//! A simulated Kubernetes node: pod cgroups named as the kubelet's systemd driver names
//! them, pods files as `kubectl get pods -o json` prints them, a kubelet root laid out as
//! the kubelet lays out projected volumes, and processes run inside a pod with the
//! container's view of its token (a private mount namespace).

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

use crate::{testkid, TestCgroup};

/// Namespace of every simulated pod.
pub const NS: &str = "agents";

pub struct SimPod {
    pub uid: String,
    pub name: String,
    pub sa: String,
    pub agent: String,
    pub container_id: String,
    pub token_volume: String,
    pub cgroup: TestCgroup,
}

pub fn hex64(seed: u32) -> String {
    format!("{:08x}", seed).repeat(8)
}

pub fn uid(seed: u32) -> String {
    format!("{seed:08x}-5b3d-4c1a-9e8f-0a1b2c3d4e5f")
}

impl SimPod {
    /// A pod's container cgroup under `top`, named as the systemd driver names it.
    pub fn new(top: &str, seed: u32, name: &str, agent: &str) -> Self {
        let uid = uid(seed);
        let container_id = hex64(seed);
        let slice = format!("kubepods-burstable-pod{}.slice", uid.replace('-', "_"));
        let cgroup = TestCgroup::create(&format!(
            "{top}/kubepods.slice/kubepods-burstable.slice/{slice}/cri-containerd-{container_id}.scope"
        ));
        Self {
            uid,
            name: name.to_owned(),
            sa: format!("sa-{name}"),
            agent: agent.to_owned(),
            container_id,
            token_volume: format!("kube-api-access-{}", &name[name.len() - 1..]),
            cgroup,
        }
    }

    /// The pod as `kubectl get pods -o json` prints it.
    pub fn json(&self, extra_volume: Option<(&str, &str)>) -> String {
        let (extra_mount, extra_vol) = match extra_volume {
            Some((vol, path)) => (
                format!(r#",{{"name":"{vol}","mountPath":"{path}"}}"#),
                format!(r#",{{"name":"{vol}","secret":{{"secretName":"{vol}"}}}}"#),
            ),
            None => (String::new(), String::new()),
        };
        format!(
            r#"{{"apiVersion":"v1","kind":"Pod",
              "metadata":{{"name":"{name}","namespace":"{NS}","uid":"{uid}",
                          "labels":{{"agent-monitor.dev/agent":"{agent}","agent-monitor.dev/tier":"worker"}}}},
              "spec":{{"serviceAccountName":"{sa}","nodeName":"node-a",
                      "containers":[{{"name":"agent","image":"ghcr.io/acme/agent:1",
                        "volumeMounts":[{{"name":"{vol}","mountPath":"/var/run/secrets/kubernetes.io/serviceaccount"}}{extra_mount}]}}],
                      "volumes":[{{"name":"{vol}","projected":{{"sources":[]}}}}{extra_vol}]}},
              "status":{{"containerStatuses":[{{"name":"agent","containerID":"containerd://{cid}","image":"x","imageID":"y","ready":true,"restartCount":0}}]}}}}"#,
            name = self.name,
            uid = self.uid,
            agent = self.agent,
            sa = self.sa,
            vol = self.token_volume,
            cid = self.container_id,
        )
    }

    /// Lays out the pod's token volume in the kubelet root with the kubelet's atomic-writer
    /// structure; returns the volume directory.
    pub fn kubelet_volume(&self, kubelet_root: &Path) -> PathBuf {
        let vol = kubelet_root.join(format!(
            "pods/{}/volumes/kubernetes.io~projected/{}",
            self.uid, self.token_volume
        ));
        let ts = "..2026_11_23_07_00_00.000000001";
        std::fs::create_dir_all(vol.join(ts)).expect("mkdir volume");
        for f in ["token", "ca.crt", "namespace"] {
            std::fs::write(vol.join(ts).join(f), "fixture, not a credential\n").expect("write");
            std::os::unix::fs::symlink(format!("..data/{f}"), vol.join(f)).expect("symlink");
        }
        std::os::unix::fs::symlink(ts, vol.join("..data")).expect("..data");
        vol
    }
}

pub fn pods_file(path: &Path, pods: &[String]) {
    let tmp = path.with_extension("tmp");
    std::fs::write(
        &tmp,
        format!(
            r#"{{"apiVersion":"v1","kind":"List","items":[{}]}}"#,
            pods.join(",")
        ),
    )
    .expect("write pods file");
    std::fs::rename(&tmp, path).expect("replace pods file");
}

/// Runs am-testkid with `actions` as a process of `pod`: in its cgroup, in a private mount
/// namespace where the pod's token volume is mounted at the in-container path
/// `/var/run/secrets/kubernetes.io/serviceaccount` (and `extra` bind mounts, as
/// (host dir, container dir)). With `via_shell`, `actions` is a shell command instead.
pub fn run_in_pod(
    pod: &SimPod,
    kubelet_root: &Path,
    extra: &[(PathBuf, &str)],
    actions: &[String],
    via_shell: bool,
) -> Output {
    let vol = kubelet_root.join(format!(
        "pods/{}/volumes/kubernetes.io~projected/{}",
        pod.uid, pod.token_volume
    ));
    let mut script = format!(
        "set -e; echo $$ > {cg}/cgroup.procs; mount -t tmpfs tmpfs /run; \
         mkdir -p /run/secrets/kubernetes.io/serviceaccount; \
         mount --bind {vol} /run/secrets/kubernetes.io/serviceaccount; ",
        cg = pod.cgroup.path.display(),
        vol = vol.display(),
    );
    for (host, container) in extra {
        script.push_str(&format!(
            "mkdir -p {container}; mount --bind {} {container}; ",
            host.display()
        ));
    }
    if via_shell {
        script.push_str(&actions.join(" "));
    } else {
        script.push_str(&format!(
            "exec {} {}",
            testkid().display(),
            actions.join(" ")
        ));
    }
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .output()
        .expect("unshare");
    assert!(
        out.status.success(),
        "process in pod {} failed: {}",
        pod.name,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}
