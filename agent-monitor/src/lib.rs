//! agent-monitor: watches, from the kernel, what AI agents running in Kubernetes do with
//! their credentials.
//!
//! Data flows one way: [`probes`] (eBPF programs and their ring buffers) → [`events`]
//! (decoding, the record model) → [`identity`] (who did it) → [`detect`] → [`api`] (the
//! wire schema and its conversions, shared by every output) → [`outputs`]. [`monitor`]
//! runs that flow, with [`watching`] keeping the kernel's file-identity maps current;
//! [`app`] wires it to a config and owns shutdown. [`config`] is the file's schema, above
//! the pipeline: the modules it configures define their own settings types, and the
//! runners convert the config into them. `cargo xtask layers` (run by `cargo xtask test`)
//! fails when a module imports one downstream of it; the layers are listed in
//! `xtask/src/layers.rs`.

pub mod api;
pub mod app;
pub mod boundedfile;
pub mod cli;
pub mod config;
pub mod detect;
pub mod errors;
pub mod events;
pub mod identity;
pub use agent_monitor_api::journal;
pub mod monitor;
pub mod outputs;
pub mod policy;
pub mod preflight;
pub mod probes;
pub mod ratelog;
pub mod replay;
pub mod watching;
pub mod yaml;
