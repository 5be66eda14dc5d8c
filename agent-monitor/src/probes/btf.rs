//! Kernel structure offsets from the running kernel's BTF (`/sys/kernel/btf/vmlinux`).
//!
//! The eBPF programs follow kernel pointers (task → files → fdtable → file → inode →
//! super_block, dentry chains, sockets). aya has no CO-RE relocations for Rust programs, so
//! the offsets are looked up here at load time and handed to the programs as a global.
//! A field this kernel lacks is [`NO_FIELD`]; the programs then skip what needs it, and
//! [`Offsets::missing`] says what, so the daemon can log it.

use std::{collections::HashMap, path::Path};

use agent_monitor_common::{KernelOffsets, NO_FIELD};
use btfparse::{Offset, Readable, TypeInformation, TypeVariant};

/// Where the kernel exposes its own BTF.
pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

/// Reading or parsing the kernel's BTF failed.
#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    /// The BTF file could not be read (kernel built without `CONFIG_DEBUG_INFO_BTF`).
    #[error("cannot read kernel BTF {path}: {source} (the kernel needs CONFIG_DEBUG_INFO_BTF=y)")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The BTF data did not parse.
    #[error("cannot parse kernel BTF {path}: {reason}")]
    Parse { path: String, reason: String },
    /// A field without which no open can be resolved is missing.
    #[error("kernel BTF has no {0}: file identity cannot be resolved on this kernel")]
    Required(&'static str),
}

struct Bytes(Vec<u8>);

impl Readable for Bytes {
    fn read(&self, offset: u64, buffer: &mut [u8]) -> btfparse::Result<()> {
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        let end = start.saturating_add(buffer.len());
        match self.0.get(start..end) {
            Some(src) => {
                buffer.copy_from_slice(src);
                Ok(())
            }
            None => Err(btfparse::Error::new(
                btfparse::ErrorKind::IOError,
                "read past the end of the BTF data",
            )),
        }
    }
}

/// The offsets, and the fields that were not found.
pub struct Offsets {
    pub kernel: KernelOffsets,
    pub missing: Vec<&'static str>,
}

struct Lookup {
    info: TypeInformation,
    /// Struct and union names to type ids (a name can also be a typedef, function or
    /// forward declaration; only complete structs count).
    structs: HashMap<String, u32>,
}

impl Lookup {
    fn offset(&self, ty: &str, path: &str) -> Option<u32> {
        let tid = *self.structs.get(ty)?;
        match self.info.offset_of(tid, path).ok()?.1 {
            Offset::ByteOffset(n) => Some(n),
            // Bitfields are never what we read.
            Offset::BitOffsetAndSize(..) => None,
        }
    }
}

/// Reads the offsets from the running kernel's BTF.
pub fn kernel_offsets() -> Result<Offsets, BtfError> {
    from_file(Path::new(VMLINUX_BTF))
}

/// Reads the offsets from a BTF file.
pub fn from_file(path: &Path) -> Result<Offsets, BtfError> {
    let shown = path.display().to_string();
    let data = std::fs::read(path).map_err(|source| BtfError::Read {
        path: shown.clone(),
        source,
    })?;
    let info = TypeInformation::new(&Bytes(data)).map_err(|e| BtfError::Parse {
        path: shown,
        reason: format!("{e:?}"),
    })?;
    let structs = info
        .get()
        .iter()
        .filter(|(_, t)| matches!(t, TypeVariant::Struct(_) | TypeVariant::Union(_)))
        .filter_map(|(id, _)| Some((info.name_of(*id)?, *id)))
        .collect();
    resolve(&Lookup { info, structs })
}

fn resolve(l: &Lookup) -> Result<Offsets, BtfError> {
    // An io_uring open's state lives in the request's command area (io_uring/openclose.c:
    // `struct io_open *open = io_kiocb_to_cmd(req, struct io_open)`).
    let io_open_filename = l
        .offset("io_kiocb", "cmd")
        .zip(l.offset("io_open", "filename"))
        .map(|(cmd, filename)| cmd + filename);
    let mut missing = Vec::new();
    let mut get = |what: &'static str, ty: &str, path: &str| -> u32 {
        l.offset(ty, path).unwrap_or_else(|| {
            missing.push(what);
            NO_FIELD
        })
    };
    let kernel = KernelOffsets {
        task_files: get("task_struct.files", "task_struct", "files"),
        files_fdt: get("files_struct.fdt", "files_struct", "fdt"),
        fdt_max_fds: get("fdtable.max_fds", "fdtable", "max_fds"),
        fdt_fd: get("fdtable.fd", "fdtable", "fd"),
        file_inode: get("file.f_inode", "file", "f_inode"),
        file_dentry: get("file.f_path.dentry", "file", "f_path.dentry"),
        file_private_data: get("file.private_data", "file", "private_data"),
        inode_ino: get("inode.i_ino", "inode", "i_ino"),
        inode_sb: get("inode.i_sb", "inode", "i_sb"),
        sb_dev: get("super_block.s_dev", "super_block", "s_dev"),
        sb_magic: get("super_block.s_magic", "super_block", "s_magic"),
        dentry_parent: get("dentry.d_parent", "dentry", "d_parent"),
        dentry_name: get("dentry.d_name.name", "dentry", "d_name.name"),
        dentry_inode: get("dentry.d_inode", "dentry", "d_inode"),
        socket_type: get("socket.type", "socket", "type"),
        sk_daddr: get(
            "sock.__sk_common.skc_daddr",
            "sock",
            "__sk_common.skc_daddr",
        ),
        sk_dport: get(
            "sock.__sk_common.skc_dport",
            "sock",
            "__sk_common.skc_dport",
        ),
        sk_v6_daddr: get(
            "sock.__sk_common.skc_v6_daddr",
            "sock",
            "__sk_common.skc_v6_daddr",
        ),
        sk_family: get(
            "sock.__sk_common.skc_family",
            "sock",
            "__sk_common.skc_family",
        ),
        // x86_64: the first three syscall arguments are in rdi, rsi, rdx
        // (arch/x86/entry/entry_64.S); pt_regs names them di, si, dx.
        regs_arg: [
            get("pt_regs.di", "pt_regs", "di"),
            get("pt_regs.si", "pt_regs", "si"),
            get("pt_regs.dx", "pt_regs", "dx"),
        ],
        req_open_filename: io_open_filename.unwrap_or(NO_FIELD),
        filename_name: get("filename.name", "filename", "name"),
        task_group_leader: get("task_struct.group_leader", "task_struct", "group_leader"),
        task_start_boottime: get(
            "task_struct.start_boottime",
            "task_struct",
            "start_boottime",
        ),
    };
    if io_open_filename.is_none() {
        missing.push("io_kiocb.cmd / io_open.filename");
    }
    for (name, off) in [
        ("task_struct.files", kernel.task_files),
        ("files_struct.fdt", kernel.files_fdt),
        ("fdtable.max_fds", kernel.fdt_max_fds),
        ("fdtable.fd", kernel.fdt_fd),
        ("file.f_inode", kernel.file_inode),
        ("inode.i_sb", kernel.inode_sb),
        ("super_block.s_dev", kernel.sb_dev),
    ] {
        if off == NO_FIELD {
            return Err(BtfError::Required(name));
        }
    }
    Ok(Offsets { kernel, missing })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The running kernel's BTF gives every offset the programs use. Skips where the
    /// kernel has no BTF (it is a hard requirement of the daemon).
    #[test]
    fn running_kernel_has_every_offset() {
        if !Path::new(VMLINUX_BTF).exists() {
            eprintln!("SKIPPED: {VMLINUX_BTF} is missing");
            return;
        }
        let o = kernel_offsets().expect("offsets");
        assert!(o.missing.is_empty(), "missing: {:?}", o.missing);
        // `struct qstr { union { struct { u32 hash; u32 len; }; u64 hash_len; }; const
        // unsigned char *name; }`: name is 8 bytes into d_name.
        assert_eq!(o.kernel.dentry_name % 8, 0);
        assert_ne!(o.kernel.regs_arg[0], o.kernel.regs_arg[1]);
    }

    #[test]
    fn unreadable_file_is_a_clear_error() {
        let err = from_file(Path::new("/nonexistent/btf"))
            .err()
            .expect("error");
        assert!(err.to_string().contains("CONFIG_DEBUG_INFO_BTF"), "{err}");
    }

    #[test]
    fn garbage_is_a_parse_error_not_a_panic() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("btf");
        std::fs::write(&p, b"\x9f\xeb\x01\x00garbage").expect("write");
        assert!(from_file(&p).is_err());
    }
}
