//! Where records leave the process.

pub mod falco;
pub mod falcosidekick;
pub mod fanout;
pub mod grpc;
pub mod journal;
pub mod jsonl;
pub mod listen;
pub mod metrics;
pub mod protojson;

/// A destination for records or alerts. Implementations may buffer; `flush` pushes
/// buffered items out.
pub trait Sink<T> {
    /// Writes one item.
    fn write(&mut self, item: &T) -> std::io::Result<()>;
    /// Pushes out whatever is buffered.
    fn flush(&mut self) -> std::io::Result<()>;
    /// Opens the destination again (SIGHUP, after a log rotation moved the file away):
    /// what was written so far is flushed to the old file, what follows goes to a new one
    /// at the configured path. Sinks that write no file have nothing to do.
    fn reopen(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
