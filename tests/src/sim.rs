//! A simulated Kubernetes node: pod cgroups named as the kubelet's systemd driver names
//! them, pods files as `kubectl get pods -o json` prints them, a kubelet root laid out as
//! the kubelet lays out projected volumes, and processes run inside a pod with the
//! container's view of its token (a private mount namespace).

use std::{
    cell::RefCell,
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
    /// Volume filesystems mounted for this pod, unmounted on drop.
    mounts: RefCell<Vec<PathBuf>>,
}

impl Drop for SimPod {
    fn drop(&mut self) {
        for m in self.mounts.borrow_mut().drain(..).rev() {
            unmount(&m);
        }
    }
}

/// Mounts a fresh tmpfs at `dir` (created if needed), as the kubelet mounts every Secret
/// and projected volume.
pub fn mount_tmpfs(dir: &Path) {
    std::fs::create_dir_all(dir).expect("mkdir volume");
    let out = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m,mode=0755", "tmpfs"])
        .arg(dir)
        .output()
        .expect("mount");
    assert!(
        out.status.success(),
        "mount tmpfs {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Unmounts `dir` (lazily, so a test's leftover process cannot keep it busy).
pub fn unmount(dir: &Path) {
    let _ = Command::new("umount").arg("-l").arg(dir).output();
}

/// Writes `files` into a volume directory in the kubelet's atomic-writer pattern: a new
/// timestamped directory, then the `..data` symlink swapped to it by rename, then the old
/// directory removed. The first call also creates the per-file symlinks (`token ->
/// ..data/token`).
pub fn atomic_write(vol: &Path, stamp: &str, files: &[&str]) {
    let ts = vol.join(format!("..{stamp}"));
    std::fs::create_dir_all(&ts).expect("mkdir timestamp dir");
    for f in files {
        std::fs::write(ts.join(f), "fixture, not a credential\n").expect("write");
        let link = vol.join(f);
        if link.symlink_metadata().is_err() {
            std::os::unix::fs::symlink(format!("..data/{f}"), &link).expect("symlink");
        }
    }
    let old = std::fs::read_link(vol.join("..data")).ok();
    let tmp = vol.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(format!("..{stamp}"), &tmp).expect("..data_tmp");
    std::fs::rename(&tmp, vol.join("..data")).expect("swap ..data");
    if let Some(old) = old {
        if old != Path::new(&format!("..{stamp}")) {
            let _ = std::fs::remove_dir_all(vol.join(old));
        }
    }
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
            mounts: RefCell::new(Vec::new()),
        }
    }

    /// The pod as `kubectl get pods -o json` prints it.
    pub fn json(&self, extra_volume: Option<(&str, &str)>) -> String {
        let extra: Vec<(String, String)> = extra_volume
            .map(|(v, p)| (v.to_owned(), p.to_owned()))
            .into_iter()
            .collect();
        self.json_with_secrets(&extra)
    }

    /// The pod with extra Secret volumes mounted at the given (volume, mount path)s.
    pub fn json_with_secrets(&self, secrets: &[(String, String)]) -> String {
        let extra_mount: String = secrets
            .iter()
            .map(|(vol, path)| format!(r#",{{"name":"{vol}","mountPath":"{path}"}}"#))
            .collect();
        let extra_vol: String = secrets
            .iter()
            .map(|(vol, _)| format!(r#",{{"name":"{vol}","secret":{{"secretName":"{vol}"}}}}"#))
            .collect();
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

    /// Mounts the pod's token volume in the kubelet root as its own tmpfs, written with
    /// the kubelet's atomic-writer structure; returns the volume directory.
    pub fn kubelet_volume(&self, kubelet_root: &Path) -> PathBuf {
        let vol = kubelet_root.join(format!(
            "pods/{}/volumes/kubernetes.io~projected/{}",
            self.uid, self.token_volume
        ));
        mount_tmpfs(&vol);
        self.mounts.borrow_mut().push(vol.clone());
        atomic_write(
            &vol,
            "2026_11_23_07_00_00.000000001",
            &["token", "ca.crt", "namespace"],
        );
        vol
    }

    /// Mounts a Secret volume `name` of the pod as its own tmpfs holding `files`; returns
    /// the volume directory.
    pub fn secret_volume(&self, kubelet_root: &Path, name: &str, files: &[&str]) -> PathBuf {
        let vol = kubelet_root.join(format!(
            "pods/{}/volumes/kubernetes.io~secret/{name}",
            self.uid
        ));
        mount_tmpfs(&vol);
        self.mounts.borrow_mut().push(vol.clone());
        atomic_write(&vol, "2026_11_23_07_00_00.000000001", files);
        vol
    }

    /// Unmounts the pod's volumes, as the kubelet does when the pod is deleted.
    pub fn unmount_volumes(&self) {
        for m in self.mounts.borrow_mut().drain(..).rev() {
            unmount(&m);
        }
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
/// The shell script that puts a process into `pod` (cgroup, private mount namespace with
/// the token at the in-container path) and then runs `tail`.
fn pod_script(pod: &SimPod, kubelet_root: &Path, tail: &str) -> String {
    let vol = kubelet_root.join(format!(
        "pods/{}/volumes/kubernetes.io~projected/{}",
        pod.uid, pod.token_volume
    ));
    format!(
        "set -e; echo $$ > {cg}/cgroup.procs; mount -t tmpfs tmpfs /run; \
         mkdir -p /run/secrets/kubernetes.io/serviceaccount; \
         mount --bind {vol} /run/secrets/kubernetes.io/serviceaccount; {tail}",
        cg = pod.cgroup.path.display(),
        vol = vol.display(),
    )
}

/// Starts a long-lived process of `pod` (am-testkid lingering `linger_ms`) and returns it;
/// its pid is the process's pid (unshare and sh exec in place).
pub fn spawn_in_pod(pod: &SimPod, kubelet_root: &Path, linger_ms: u64) -> std::process::Child {
    let script = pod_script(
        pod,
        kubelet_root,
        &format!("exec {} --linger-ms {linger_ms}", testkid().display()),
    );
    Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("unshare")
}

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
        // Recursive, as the runtime mounts a hostPath: the volume filesystems mounted
        // below a kubelet root come along.
        script.push_str(&format!(
            "mkdir -p {container}; mount --rbind {} {container}; ",
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

/// Writes the AgentPolicy both detection tests use: every simulated pod's ServiceAccount
/// (`sa-agent-*`) is a proxy tier whose credentials only am-testkid may read and whose
/// egress is the API server and DNS.
pub fn proxy_policy(path: &Path) {
    std::fs::write(
        path,
        format!(
            "apiVersion: agent-monitor.dev/v1alpha1\nkind: AgentPolicy\nmetadata:\n  name: proxies\n  namespace: agents\n\
             spec:\n  selector:\n    namespaces: [agents]\n    serviceAccounts: [\"sa-agent-*\"]\n  tier: proxy\n\
             \x20 credentials:\n    executables: [\"{}\"]\n  egress:\n    allow:\n      - class: api-server\n      - class: dns\n",
            testkid().display()
        ),
    )
    .expect("write policy");
}
