//! One JSON object per line, to stdout or a file.
//!
//! Output files hold what credentials were read, by whom: they are created 0600 whatever
//! the umask. A daemon killed mid-write (SIGKILL, OOM) can leave a torn last line; the next
//! start cuts it off before appending, so every line of the file stays one whole JSON
//! object. SIGHUP reopens the file at its path, for log rotation ([`Reopen`]).

use std::{
    borrow::Cow,
    collections::hash_map::Entry,
    fs::{File, OpenOptions},
    io::{BufWriter, Write},
    os::unix::fs::{FileExt as _, OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    sync::Arc,
};

use serde_json::value::RawValue;
use tracing::{info, warn};

use super::{EventItem, Sink};
use crate::{api::pb, events::Workload};

mod event;

/// Mode of the output files the daemon creates.
pub const OUTPUT_MODE: u32 = 0o600;

/// How far back from the end a torn last line is looked for. Event lines are bounded far
/// below this (pod metadata is capped); a file that does not end in a line break within
/// this many bytes is not a torn JSON-lines file and is left alone, with an error.
pub const MAX_TORN_TAIL: u64 = 16 << 20;

/// Room a line buffer starts with: an event line with pod metadata is a few hundred
/// bytes to a couple of kilobytes.
const LINE_CAPACITY: usize = 4096;

/// Bytes buffered before a write to the destination: about a hundred event lines, so a
/// busy node's file sees one `write` per batch of events rather than one per dozen.
const WRITE_BUFFER: usize = 64 * 1024;

/// Writes each item (record or anomaly) as one line of JSON.
pub struct JsonLines<W: Write> {
    out: BufWriter<W>,
    /// The line being serialized, reused from line to line. serde_json writes a line in
    /// dozens of small pieces: appended to a `Vec` they cost a bounds check and a copy,
    /// written to the `BufWriter` each takes its `write_all` path. A line that fails to
    /// serialize also leaves nothing half-written in the output.
    line: Vec<u8>,
}

impl<W: Write> JsonLines<W> {
    pub fn new(out: W) -> Self {
        Self {
            out: BufWriter::with_capacity(WRITE_BUFFER, out),
            line: Vec::with_capacity(LINE_CAPACITY),
        }
    }
}

/// A destination that can be opened again at its path.
pub trait Reopen {
    /// Opens the destination again; the old one is closed. On error the old one is kept.
    fn reopen(&mut self) -> std::io::Result<()>;
}

/// In-memory buffers (tests) have nothing to reopen.
impl Reopen for Vec<u8> {
    fn reopen(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<R: Reopen + ?Sized> Reopen for &mut R {
    fn reopen(&mut self) -> std::io::Result<()> {
        (**self).reopen()
    }
}

/// A configured output: stdout, or a file appended to.
#[derive(Debug)]
pub enum Output {
    Stdout(std::io::Stdout),
    File { path: PathBuf, file: File },
}

impl Write for Output {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Output::Stdout(s) => s.write(buf),
            Output::File { file, .. } => file.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Output::Stdout(s) => s.flush(),
            Output::File { file, .. } => file.flush(),
        }
    }
}

impl Reopen for Output {
    fn reopen(&mut self) -> std::io::Result<()> {
        if let Output::File { path, file } = self {
            *file = open_file(path)?;
            info!("output {}: reopened", path.display());
        }
        Ok(())
    }
}

/// Opens a configured output: `-` is stdout, anything else a file opened for append (see
/// [`open_file`]).
pub fn open_writer(output: &str) -> std::io::Result<Output> {
    Ok(if output == "-" {
        Output::Stdout(std::io::stdout())
    } else {
        let path = PathBuf::from(output);
        let file = open_file(&path)?;
        Output::File { path, file }
    })
}

/// Opens a file for append, creating it with mode [`OUTPUT_MODE`]. A regular file that
/// does not end in a line break (the daemon was killed mid-write) first loses its torn
/// last line, so that appending never glues a new line onto a fragment; the bytes dropped
/// are logged. Special files (a FIFO, `/dev/null`) are opened for writing only.
pub fn open_file(path: &Path) -> std::io::Result<File> {
    let special = std::fs::metadata(path).is_ok_and(|m| !m.is_file());
    let mut options = OpenOptions::new();
    options.append(true).create(true).mode(OUTPUT_MODE);
    if !special {
        // Reading is needed to find the end of the last whole line.
        options.read(true);
    }
    let file = options.open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Ok(file);
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        // Created by someone else (or an older version): left as the operator set it,
        // but said, since the file names every credential read.
        warn!(
            "output {}: mode {mode:04o} lets other users read or write it; the daemon creates its files {OUTPUT_MODE:04o}",
            path.display()
        );
    }
    let dropped = cut_torn_tail(&file, meta.len())
        .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
    if dropped > 0 {
        warn!(
            "output {}: dropped the {dropped}-byte torn last line left by an interrupted write; every line left is whole",
            path.display()
        );
    }
    Ok(file)
}

/// Truncates `file` (of `len` bytes) after its last line break when it does not end in
/// one. Returns the bytes dropped.
fn cut_torn_tail(file: &File, len: u64) -> std::io::Result<u64> {
    if len == 0 {
        return Ok(0);
    }
    let mut last = [0u8; 1];
    file.read_exact_at(&mut last, len - 1)?;
    if last[0] == b'\n' {
        return Ok(0);
    }
    const CHUNK: u64 = 64 * 1024;
    let mut buf = vec![0u8; CHUNK as usize];
    let mut end = len;
    while end > 0 {
        if len - end >= MAX_TORN_TAIL {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "does not end in a line break and has none in its last {MAX_TORN_TAIL} bytes: not a JSON-lines output (move it away)"
                ),
            ));
        }
        let start = end.saturating_sub(CHUNK);
        let chunk = &mut buf[..(end - start) as usize];
        file.read_exact_at(chunk, start)?;
        if let Some(i) = chunk.iter().rposition(|b| *b == b'\n') {
            let keep = start + i as u64 + 1;
            file.set_len(keep)?;
            return Ok(len - keep);
        }
        end = start;
    }
    // No line break at all: the whole file is one torn line.
    file.set_len(0)?;
    Ok(len)
}

impl<W: Write> JsonLines<W> {
    /// Writes one line whose JSON `serialize` produces: serialized whole into the line
    /// buffer, then handed to the buffered writer. When `serialize` fails nothing of the
    /// line is written.
    pub fn line(
        &mut self,
        serialize: impl FnOnce(&mut serde_json::Serializer<&mut Vec<u8>>) -> std::io::Result<()>,
    ) -> std::io::Result<()> {
        self.raw_line(|line| serialize(&mut serde_json::Serializer::new(line)))
    }

    /// Writes one line that `write` appends to the (cleared) line buffer; when `write`
    /// fails nothing of the line is written.
    fn raw_line(
        &mut self,
        write: impl FnOnce(&mut Vec<u8>) -> std::io::Result<()>,
    ) -> std::io::Result<()> {
        self.line.clear();
        write(&mut self.line)?;
        self.line.push(b'\n');
        self.out.write_all(&self.line)
    }
}

impl<W: Write + Reopen> JsonLines<W> {
    /// Flushes what is buffered to the current destination, then reopens it.
    pub fn reopen(&mut self) -> std::io::Result<()> {
        self.out.flush()?;
        self.out.get_mut().reopen()
    }
}

impl<W: Write, T: serde::Serialize> Sink<T> for JsonLines<W> {
    fn write(&mut self, item: &T) -> std::io::Result<()> {
        self.line(|s| item.serialize(s).map_err(std::io::Error::other))
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

/// Workloads whose JSON [`EventLines`] keeps; past this many the cache starts again empty
/// (a node runs at most a few hundred pods' containers).
const WORKLOAD_CACHE: usize = 1024;

/// Writes each record as one line of the proto3 JSON form of `agent_monitor.v1.Event`
/// (the wire event the pipeline converted once), serialized straight into the buffered
/// writer (no intermediate JSON value), its fields in the schema's order.
///
/// The workload is most of a line (a dozen names and the pod's labels, each escaped) and
/// the same for every event of a container, so its JSON is kept per shared workload
/// ([`EventItem::workload`]) and written as it is.
pub struct EventLines<W: Write> {
    lines: JsonLines<W>,
    workloads: WorkloadJson,
}

impl<W: Write> EventLines<W> {
    pub fn new(out: W) -> Self {
        Self {
            lines: JsonLines::new(out),
            workloads: WorkloadJson::default(),
        }
    }
}

/// The JSON of shared workloads, by the workload's address. Each entry holds its workload,
/// so no other workload can be allocated at that address while the entry is kept.
#[derive(Default)]
struct WorkloadJson(foldhash::HashMap<usize, (Arc<Workload>, Box<RawValue>)>);

impl WorkloadJson {
    /// The JSON of the workload of an event: its shared workload's, kept, or the one in
    /// its wire form (a loss report's).
    fn get<'a>(
        &'a mut self,
        shared: Option<&Arc<Workload>>,
        wire: Option<&pb::Workload>,
    ) -> serde_json::Result<Option<Cow<'a, RawValue>>> {
        let Some(shared) = shared else {
            return wire
                .map(|w| serde_json::value::to_raw_value(w).map(Cow::Owned))
                .transpose();
        };
        let key = Arc::as_ptr(shared) as usize;
        if self.0.len() >= WORKLOAD_CACHE && !self.0.contains_key(&key) {
            self.0.clear();
        }
        let (_, json) = match self.0.entry(key) {
            Entry::Occupied(kept) => kept.into_mut(),
            Entry::Vacant(slot) => {
                let json = serde_json::value::to_raw_value(&pb::Workload::from(&**shared))?;
                slot.insert((shared.clone(), json))
            }
        };
        Ok(Some(Cow::Borrowed(json)))
    }
}

impl<W: Write + Reopen> Sink<EventItem> for EventLines<W> {
    fn write(&mut self, e: &EventItem) -> std::io::Result<()> {
        let (shared, e) = (e.workload.as_ref(), &*e.api);
        let workload = self
            .workloads
            .get(shared, e.workload.as_ref())
            .map_err(std::io::Error::other)?;
        self.lines
            .raw_line(|line| event::write_event(line, e, workload.as_deref()))
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Sink::<serde_json::Value>::flush(&mut self.lines)
    }

    fn reopen(&mut self) -> std::io::Result<()> {
        self.lines.reopen()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{LostRecord, Record};

    #[test]
    fn one_line_per_record() {
        let mut buf = Vec::new();
        {
            let mut sink = JsonLines::new(&mut buf);
            for seq in 1..=2 {
                let rec = Record::Lost(LostRecord {
                    seq,
                    time: "t".into(),
                    lane: "network".into(),
                    count: 1,
                    total: seq,
                    reason: crate::events::LostReason::RingFull,
                    workload: None,
                });
                sink.write(&rec).expect("write");
            }
            Sink::<Record>::flush(&mut sink).expect("flush");
        }
        let text = String::from_utf8(buf).expect("utf-8");
        let lines: Vec<_> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        let v: serde_json::Value = serde_json::from_str(lines[1]).expect("json");
        assert_eq!(v["type"], "lost");
        assert_eq!(v["total"], 2);
    }

    /// What [`EventLines`] writes for `items`.
    fn event_lines(items: &[EventItem]) -> String {
        let mut buf = Vec::new();
        {
            let mut lines = EventLines::new(&mut buf);
            for item in items {
                lines.write(item).expect("write");
            }
            lines.flush().expect("flush");
        }
        String::from_utf8(buf).expect("UTF-8")
    }

    /// The event lines' own serialization, with the workload's JSON kept per shared
    /// workload, is byte for byte the generated one of the whole wire event: for every
    /// kind of event, with and without a workload, for a workload seen before and for one
    /// that changed under the same key.
    #[test]
    fn event_json_is_byte_for_byte_the_generated_serialization() {
        use pb::event::Kind;
        let workload = |pod: &str, label: &str| Workload {
            namespace: Some("agents".into()),
            pod: Some(pod.into()),
            pod_uid: Some("0b0e-uid".into()),
            container: Some("worker".into()),
            container_id: Some("c0ffee".into()),
            service_account: Some("agent-worker-1".into()),
            agent: Some("researcher \"quoted\" \u{e9}".into()),
            tier: Some("worker".into()),
            labels: [
                ("app".to_owned(), label.to_owned()),
                ("z/y".into(), "\n".into()),
            ]
            .into_iter()
            .collect(),
            cgroup: Some("kubepods.slice/pod.slice/cri-containerd-c0ffee.scope".into()),
            truncated: pod.len() > 8,
            labels_truncated: 2,
            host: false,
        };
        let kinds = [
            Some(Kind::Open(pb::CredentialAccess {
                path: "/var/lib/kubelet/pods/x/token".into(),
                raw_path: "token".into(),
                ..Default::default()
            })),
            Some(Kind::Connect(pb::Connect {
                dst_addr: "10.0.0.1".into(),
                dst_port: 443,
                ..Default::default()
            })),
            Some(Kind::Exec(pb::Exec {
                filename: "/bin/sh".into(),
                ..Default::default()
            })),
            Some(Kind::Fork(pb::Fork { child_pid: 7 })),
            Some(Kind::Exit(pb::Exit {})),
            Some(Kind::Lost(pb::Lost {
                count: 3,
                total: 9,
                ..Default::default()
            })),
            None,
        ];
        // One shared workload per distinct pod metadata, as identity builds them.
        let shared: Vec<Arc<Workload>> = [
            workload("agent-a", "one"),
            // Changed pod metadata: a new shared workload, whose JSON is its own.
            workload("agent-a", "two"),
            workload("agent-a-renamed", "two"),
        ]
        .into_iter()
        .map(Arc::new)
        .collect();
        let choices = [None, Some(0), Some(0), Some(1), Some(2), Some(0)];
        let mut items = Vec::new();
        let mut seq = 0;
        for kind in &kinds {
            for choice in choices {
                seq += 1;
                let e = pb::Event {
                    seq: if seq % 5 == 0 { 0 } else { seq },
                    process: (seq % 3 != 0).then(|| pb::Process {
                        pid: 42,
                        comm: "cat".into(),
                        ..Default::default()
                    }),
                    // In the shared workload, not in the wire event.
                    workload: None,
                    run_id: if seq % 4 == 0 {
                        String::new()
                    } else {
                        "run-1".into()
                    },
                    node: "node-a".into(),
                    time: (seq % 2 == 0).then_some(agent_monitor_api::wkt::Timestamp {
                        seconds: 1_790_000_000,
                        nanos: 5,
                    }),
                    kind: kind.clone(),
                };
                items.push(EventItem {
                    api: Arc::new(e),
                    workload: choice.map(|i: usize| shared[i].clone()),
                });
            }
        }
        // A loss report that names a workload has no shared one.
        items.push(EventItem {
            api: Arc::new(pb::Event {
                seq: 9_999,
                workload: Some(pb::Workload::from(&*shared[1])),
                kind: kinds[5].clone(),
                ..Default::default()
            }),
            workload: None,
        });
        let ours = event_lines(&items);
        for (line, item) in ours.lines().zip(&items) {
            let generated = serde_json::to_string(&item.wire()).expect("generated");
            assert_eq!(line, generated, "event {}", item.api.seq);
        }
        assert_eq!(ours.lines().count(), items.len());
    }

    /// The event output prints each item's wire event, one line each: the bytes of its
    /// proto3 JSON form (which `api::json`'s tests compare with what prost-reflect printed),
    /// the same object `api::json::event` gives `tail --json`.
    #[test]
    fn event_lines_print_the_wire_event_of_each_item() {
        let origin = crate::api::Origin {
            run_id: "run-1".into(),
            node: "node-a".into(),
            boot_id: "boot-1".into(),
        };
        let items: Vec<_> = ["credential", "network"]
            .into_iter()
            .zip(1..)
            .map(|(lane, seq)| {
                origin.event_item(Record::Lost(LostRecord {
                    seq,
                    time: "2026-11-23T07:00:00.000000001Z".into(),
                    lane: lane.into(),
                    count: 3,
                    total: 12,
                    reason: crate::events::LostReason::RingFull,
                    workload: None,
                }))
            })
            .collect();
        let text = event_lines(&items);
        let want: String = items
            .iter()
            .map(|i| serde_json::to_string(&*i.api).expect("json") + "\n")
            .collect();
        assert_eq!(text, want);
        for (line, item) in text.lines().zip(&items) {
            let v: serde_json::Value = serde_json::from_str(line).expect("one JSON line");
            assert_eq!(v, crate::api::json::event(&item.api).expect("json"));
            assert_eq!(v["run_id"], "run-1");
            assert_eq!(v["lost"]["total"], "12");
        }
    }

    /// A map with a key JSON cannot have: serde_json fails after writing part of it.
    struct Unserializable;

    impl serde::Serialize for Unserializable {
        fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            use serde::ser::SerializeMap as _;
            let mut m = s.serialize_map(None)?;
            m.serialize_entry("fine", &1)?;
            m.serialize_entry(&[1, 2], &2)?;
            m.end()
        }
    }

    #[test]
    fn a_line_that_fails_to_serialize_leaves_nothing_behind() {
        let mut buf = Vec::new();
        {
            let mut sink = JsonLines::new(&mut buf);
            sink.write(&serde_json::json!({"n": 1})).expect("write");
            assert!(sink.write(&Unserializable).is_err());
            sink.write(&serde_json::json!({"n": 2})).expect("write");
            Sink::<serde_json::Value>::flush(&mut sink).expect("flush");
        }
        assert_eq!(
            String::from_utf8(buf).expect("utf-8"),
            "{\"n\":1}\n{\"n\":2}\n"
        );
    }

    #[test]
    fn torn_tails_are_cut_back_to_the_last_whole_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cases: &[(&[u8], &[u8])] = &[
            (b"", b""),
            (b"{\"a\":1}\n", b"{\"a\":1}\n"),
            (b"{\"a\":1}\n{\"b\":", b"{\"a\":1}\n"),
            (b"{\"a\":1}\n{\"b\":2}\n{\"c", b"{\"a\":1}\n{\"b\":2}\n"),
            (b"{\"only\":", b""),
        ];
        for (i, (before, after)) in cases.iter().enumerate() {
            let path = dir.path().join(format!("out-{i}.jsonl"));
            std::fs::write(&path, before).expect("write");
            let mut f = open_file(&path).expect("open");
            assert_eq!(std::fs::read(&path).expect("read"), *after, "case {i}");
            f.write_all(b"{\"new\":true}\n").expect("append");
            let text = std::fs::read_to_string(&path).expect("read");
            for line in text.lines() {
                serde_json::from_str::<serde_json::Value>(line)
                    .unwrap_or_else(|e| panic!("case {i}: {line:?}: {e}"));
            }
        }
        // A torn line longer than one read chunk.
        let path = dir.path().join("long.jsonl");
        let mut long = b"{\"a\":1}\n".to_vec();
        long.extend(std::iter::repeat_n(b'x', 200_000));
        std::fs::write(&path, &long).expect("write");
        drop(open_file(&path).expect("open"));
        assert_eq!(std::fs::read(&path).expect("read"), b"{\"a\":1}\n");
    }

    #[test]
    fn a_file_without_line_breaks_far_back_is_refused_untouched() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("binary");
        let size = MAX_TORN_TAIL + 100;
        let f = File::create(&path).expect("create");
        f.set_len(size).expect("size");
        drop(f);
        let err = open_file(&path).expect_err("not a JSON-lines file");
        assert!(err.to_string().contains("binary"), "{err}");
        assert!(err.to_string().contains("line break"), "{err}");
        assert_eq!(std::fs::metadata(&path).expect("stat").len(), size);
    }

    #[test]
    fn files_are_created_owner_only_and_reopened_at_their_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("events.jsonl");
        let mut out = open_writer(path.to_str().expect("utf-8")).expect("open");
        let mode = std::fs::metadata(&path).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, OUTPUT_MODE);
        out.write_all(b"{\"n\":1}\n").expect("write");
        let rotated = dir.path().join("events.jsonl.1");
        std::fs::rename(&path, &rotated).expect("rotate");
        out.write_all(b"{\"n\":2}\n").expect("write");
        out.reopen().expect("reopen");
        out.write_all(b"{\"n\":3}\n").expect("write");
        assert_eq!(
            std::fs::read_to_string(&rotated).expect("old"),
            "{\"n\":1}\n{\"n\":2}\n"
        );
        assert_eq!(std::fs::read_to_string(&path).expect("new"), "{\"n\":3}\n");
        // A reopen that fails keeps the old file.
        std::fs::remove_file(&path).expect("rm");
        std::fs::remove_dir_all(dir.path()).expect("rm dir");
        assert!(out.reopen().is_err());
        out.write_all(b"{\"n\":4}\n").expect("still writable");
    }
}
