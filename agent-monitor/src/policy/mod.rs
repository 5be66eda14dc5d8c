//! AgentPolicy: types shared with the CRD, loading and validation, selection.

pub mod load;
pub mod types;

pub use load::*;
pub use types::*;
