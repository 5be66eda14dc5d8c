//! AgentPolicy: types shared with the CRD, loading and validation, selection; policy
//! files and the cluster's AgentPolicy objects combined (files first).

pub mod cluster;
pub mod load;
pub mod sources;
pub mod types;

pub use cluster::{ClusterPolicies, ObjectKey};
pub use load::*;
pub use sources::PolicySources;
pub use types::*;
