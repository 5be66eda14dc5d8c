//! An event's proto3 JSON line, written straight into a byte buffer.
//!
//! The bytes are exactly those of the generated `Serialize` impls (pbjson through
//! serde_json): the same fields in the same order, defaults left out, 64-bit integers and
//! enums as strings. What it saves is their per-event cost: the generated code formats
//! every 64-bit integer into a fresh `String` (`ToString`), and serde_json looks up every
//! byte of every string in its escape table; here integers go through `itoa` on the stack
//! and a string that needs no escape (nearly all: paths, names, ids) is copied whole.
//! The test `random_events_are_byte_for_byte_the_generated_serialization` holds the two
//! together.

use std::io;

use serde_json::value::RawValue;

use crate::api::pb;

/// Appends the JSON of `e` to `out`, with `workload` (the JSON of `e.workload`, kept per
/// workload by the caller) written as it is. On error (an enum field holding a number the
/// schema does not name, a time out of range) `out` may hold part of the object.
pub(super) fn write_event(
    out: &mut Vec<u8>,
    e: &pb::Event,
    workload: Option<&RawValue>,
) -> io::Result<()> {
    use pb::event::Kind;
    let mut o = Object::open(out);
    if e.seq != 0 {
        o.int_str("seq", e.seq);
    }
    if let Some(p) = &e.process {
        write_process(o.key("process"), p);
    }
    if let Some(w) = workload {
        o.key("workload").extend_from_slice(w.get().as_bytes());
    }
    o.str("run_id", &e.run_id);
    o.str("node", &e.node);
    if let Some(t) = &e.time {
        serde_json::to_writer(o.key("time"), t).map_err(io::Error::other)?;
    }
    match &e.kind {
        Some(Kind::Open(v)) => write_open(o.key("open"), v)?,
        Some(Kind::Connect(v)) => write_connect(o.key("connect"), v)?,
        Some(Kind::Exec(v)) => {
            let mut x = Object::open(o.key("exec"));
            x.str("filename", &v.filename);
            x.int("old_pid", v.old_pid);
            x.close();
        }
        Some(Kind::Fork(v)) => {
            let mut x = Object::open(o.key("fork"));
            x.int("child_pid", v.child_pid);
            x.close();
        }
        Some(Kind::Exit(pb::Exit {})) => o.key("exit").extend_from_slice(b"{}"),
        // Rare (one per loss report): the generated impl.
        Some(Kind::Lost(v)) => serde_json::to_writer(o.key("lost"), v).map_err(io::Error::other)?,
        None => {}
    }
    o.close();
    Ok(())
}

fn write_process(out: &mut Vec<u8>, p: &pb::Process) {
    let mut o = Object::open(out);
    o.int("pid", p.pid);
    o.int("tgid", p.tgid);
    if let Some(v) = p.ppid {
        o.key("ppid");
        o.number(v);
    }
    o.int("uid", p.uid);
    o.int("gid", p.gid);
    o.str("comm", &p.comm);
    o.opt_str("exe", p.exe.as_deref());
    o.int_str("cgroup_id", p.cgroup_id);
    o.int_str("ts_boot_ns", p.ts_boot_ns);
    if let Some(k) = &p.key {
        let mut x = Object::open(o.key("key"));
        x.str("boot_id", &k.boot_id);
        x.int("pid", k.pid);
        x.int_str("start_time_ns", k.start_time_ns);
        x.close();
    }
    o.close();
}

fn write_open(out: &mut Vec<u8>, v: &pb::CredentialAccess) -> io::Result<()> {
    let mut o = Object::open(out);
    o.str("path", &v.path);
    o.str("raw_path", &v.raw_path);
    o.enumeration("syscall", v.syscall, pb::Syscall::as_str_name)?;
    o.int("flags", v.flags);
    o.int("mode", v.mode);
    o.int("dirfd", v.dirfd);
    o.int_str("result", v.result);
    o.opt_str("error", v.error.as_deref());
    o.enumeration("class", v.class, pb::CredentialClass::as_str_name)?;
    if let Some(w) = &v.owner {
        let mut x = Object::open(o.key("owner"));
        x.opt_str("pod_uid", w.pod_uid.as_deref());
        x.opt_str("namespace", w.namespace.as_deref());
        x.opt_str("name", w.name.as_deref());
        if let Some(pid) = w.pid {
            x.key("pid");
            x.number(pid);
        }
        x.close();
    }
    o.enumeration("matched_by", v.matched_by, pb::MatchKind::as_str_name)?;
    o.bool("path_resolved", v.path_resolved);
    o.bool("path_truncated", v.path_truncated);
    o.opt_str("host_path", v.host_path.as_deref());
    o.opt_str("device", v.device.as_deref());
    if let Some(inode) = v.inode {
        o.key("inode");
        o.quoted(inode);
    }
    o.close();
    Ok(())
}

fn write_connect(out: &mut Vec<u8>, v: &pb::Connect) -> io::Result<()> {
    let mut o = Object::open(out);
    o.enumeration("syscall", v.syscall, pb::Syscall::as_str_name)?;
    o.enumeration("family", v.family, pb::AddressFamily::as_str_name)?;
    o.str("dst_addr", &v.dst_addr);
    o.int("dst_port", v.dst_port);
    o.int("fd", v.fd);
    o.int_str("result", v.result);
    o.opt_str("error", v.error.as_deref());
    o.bool("attempted", v.attempted);
    o.close();
    Ok(())
}

/// A JSON object being written: `{`, then `"key":value` pairs separated by commas, then
/// `}`. The field helpers leave a proto3 default (0, "", false) out, as pbjson does.
struct Object<'a> {
    out: &'a mut Vec<u8>,
    empty: bool,
}

impl<'a> Object<'a> {
    fn open(out: &'a mut Vec<u8>) -> Self {
        out.push(b'{');
        Self { out, empty: true }
    }

    fn close(self) {
        self.out.push(b'}');
    }

    /// Writes the key (a field name: no character to escape) and returns the buffer for
    /// its value.
    fn key(&mut self, key: &str) -> &mut Vec<u8> {
        if !self.empty {
            self.out.push(b',');
        }
        self.empty = false;
        self.out.push(b'"');
        self.out.extend_from_slice(key.as_bytes());
        self.out.extend_from_slice(b"\":");
        self.out
    }

    fn number(&mut self, n: impl itoa::Integer) {
        self.out
            .extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
    }

    /// A 64-bit integer, which proto3 JSON writes as a string.
    fn quoted(&mut self, n: impl itoa::Integer) {
        self.out.push(b'"');
        self.number(n);
        self.out.push(b'"');
    }

    /// A 32-bit integer field: a JSON number.
    fn int<N: itoa::Integer + Default + PartialEq>(&mut self, key: &str, n: N) {
        if n != N::default() {
            self.key(key);
            self.number(n);
        }
    }

    /// A 64-bit integer field: a string in proto3 JSON.
    fn int_str<N: itoa::Integer + Default + PartialEq>(&mut self, key: &str, n: N) {
        if n != N::default() {
            self.key(key);
            self.quoted(n);
        }
    }

    fn bool(&mut self, key: &str, b: bool) {
        if b {
            self.key(key).extend_from_slice(b"true");
        }
    }

    fn str(&mut self, key: &str, s: &str) {
        if !s.is_empty() {
            string(self.key(key), s);
        }
    }

    /// An `optional string`: written when present, even empty.
    fn opt_str(&mut self, key: &str, s: Option<&str>) {
        if let Some(s) = s {
            string(self.key(key), s);
        }
    }

    /// An enum field by its name; a number the schema does not name is an error, as in
    /// the generated impl.
    fn enumeration<E: TryFrom<i32>>(
        &mut self,
        key: &str,
        n: i32,
        name: fn(&E) -> &'static str,
    ) -> io::Result<()> {
        if n == 0 {
            return Ok(());
        }
        let Ok(value) = E::try_from(n) else {
            return Err(io::Error::other(format!("{key}: invalid variant {n}")));
        };
        string(self.key(key), name(&value));
        Ok(())
    }
}

/// Appends `s` as a JSON string. A string with nothing to escape is copied whole; one
/// with a quote, a backslash or a control character goes through serde_json, so its
/// escapes are serde_json's own.
fn string(out: &mut Vec<u8>, s: &str) {
    if !needs_escape(s.as_bytes()) {
        out.reserve(s.len() + 2);
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    } else {
        // Writing a string into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *out, s);
    }
}

/// Whether `bytes` hold a byte JSON escapes: a control character, `"` or `\\`. Eight
/// bytes at a time: a word has a byte below `n` when subtracting `n` from every byte
/// borrows into the top bit of a byte whose top bit was clear, and a byte equal to `c`
/// when the word XOR `c` repeated has a byte below 1. (A borrow can also flag the byte
/// above a true match, never a word without one.)
fn needs_escape(bytes: &[u8]) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let below = |w: u64, n: u8| w.wrapping_sub(ONES * u64::from(n)) & !w & HIGH;
    let mut words = bytes.chunks_exact(8);
    for chunk in words.by_ref() {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        let w = u64::from_le_bytes(word);
        let quote = w ^ (ONES * u64::from(b'"'));
        let backslash = w ^ (ONES * u64::from(b'\\'));
        if below(w, 0x20) | below(quote, 1) | below(backslash, 1) != 0 {
            return true;
        }
    }
    words
        .remainder()
        .iter()
        .any(|&b| b < 0x20 || b == b'"' || b == b'\\')
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn ours(e: &pb::Event) -> io::Result<String> {
        let workload = e
            .workload
            .as_ref()
            .map(|w| serde_json::value::to_raw_value(w).expect("workload JSON"));
        let mut out = Vec::new();
        write_event(&mut out, e, workload.as_deref())?;
        Ok(String::from_utf8(out).expect("UTF-8"))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2048))]

        /// Every field of every kind, set or left at its default, with strings that need
        /// escapes and enum numbers the schema does not name: the same bytes as the
        /// generated serialization, or an error where it errs.
        #[test]
        fn random_events_are_byte_for_byte_the_generated_serialization(
            e in crate::api::json::tests::arb_event(),
        ) {
            match (serde_json::to_string(&e), ours(&e)) {
                (Ok(generated), Ok(ours)) => prop_assert_eq!(ours, generated),
                (Err(_), Err(_)) => {}
                (generated, ours) => prop_assert!(
                    false,
                    "generated {:?}, ours {:?}",
                    generated.map(|_| ()),
                    ours.map(|_| ())
                ),
            }
        }
    }

    /// An enum number the schema does not name fails the line, as the generated impl
    /// fails it, in every enum field written here.
    #[test]
    fn an_unnamed_enum_number_is_an_error() {
        use pb::event::Kind;
        let open = |f: fn(&mut pb::CredentialAccess)| {
            let mut v = pb::CredentialAccess::default();
            f(&mut v);
            Kind::Open(v)
        };
        let connect = |f: fn(&mut pb::Connect)| {
            let mut v = pb::Connect::default();
            f(&mut v);
            Kind::Connect(v)
        };
        for kind in [
            open(|v| v.syscall = 99),
            open(|v| v.class = 99),
            open(|v| v.matched_by = 99),
            connect(|v| v.syscall = -1),
            connect(|v| v.family = 3),
        ] {
            let e = pb::Event {
                kind: Some(kind),
                ..Default::default()
            };
            assert!(serde_json::to_string(&e).is_err(), "{e:?}");
            assert!(ours(&e).is_err(), "{e:?}");
        }
    }

    proptest! {
        /// The word-at-a-time check agrees with a look at each byte, for bytes anywhere
        /// in a string of any length.
        #[test]
        fn the_escape_check_agrees_with_each_byte(
            bytes in prop::collection::vec(
                prop_oneof![
                    any::<u8>(),
                    Just(b'"'),
                    Just(b'\\'),
                    Just(0x1f_u8),
                    Just(0x20_u8),
                    Just(0x7f_u8),
                    Just(0x80_u8),
                    Just(b'a'),
                ],
                0..40,
            ),
        ) {
            let each = bytes.iter().any(|&b| b < 0x20 || b == b'"' || b == b'\\');
            prop_assert_eq!(needs_escape(&bytes), each, "{:?}", bytes);
        }
    }

    #[test]
    fn strings_are_escaped_as_serde_json_escapes_them() {
        for s in [
            "",
            "plain /var/run/secrets/token",
            "quote \" backslash \\ done",
            "tab\tnewline\ncontrol \u{1} del \u{7f}",
            "\u{e9}t\u{e9} \u{1f600}",
        ] {
            let mut out = Vec::new();
            string(&mut out, s);
            assert_eq!(
                String::from_utf8(out).expect("UTF-8"),
                serde_json::to_string(s).expect("json"),
                "{s:?}"
            );
        }
    }
}
