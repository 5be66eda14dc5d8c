//! Where records leave the process.

pub mod falco;
pub mod falcosidekick;
pub mod fanout;
pub mod grpc;
pub mod jsonl;
pub mod metrics;
pub mod protojson;

/// A destination for records or alerts. Implementations may buffer; `flush` pushes
/// buffered items out.
pub trait Sink<T> {
    /// Writes one item.
    fn write(&mut self, item: &T) -> std::io::Result<()>;
    /// Pushes out whatever is buffered.
    fn flush(&mut self) -> std::io::Result<()>;
}
