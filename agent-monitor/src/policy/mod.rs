//! AgentPolicy: types shared with the CRD, loading and validation, selection.

pub mod types;

pub use types::*;
