//! Where records leave the process.

pub mod jsonl;

use crate::events::Record;

/// A destination for records. Implementations may buffer; `flush` pushes buffered
/// records out.
pub trait Sink {
    /// Writes one record.
    fn write(&mut self, record: &Record) -> std::io::Result<()>;
    /// Pushes out whatever is buffered.
    fn flush(&mut self) -> std::io::Result<()>;
}
