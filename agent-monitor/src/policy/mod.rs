//! AgentPolicy: types shared with the CRD, loading and validation, selection; policy
//! files and the cluster's AgentPolicy objects combined (files first).
//!
//! - [`types`]: the `AgentPolicy` CRD, one Rust definition for it and for policy files.
//! - [`load`]: policy files read, parsed and validated ([`validate`]); problems are
//!   [`error`]s naming the file, the field and what was expected.
//! - [`matching`]: what detection matches against (globs, CIDRs, egress rules), compiled
//!   once per policy into a [`CompiledPolicy`](matching::CompiledPolicy).
//! - [`rules`]: the built-in rules' ids and the detection defaults, below both this
//!   module (which validates rule ids) and `detect` (which fires them).
//! - [`set`]: the loaded [`PolicySet`] and its choice of the policy for a workload.
//! - [`reload`], [`cluster`] and [`sources`]: policy files polled, the cluster's objects
//!   watched, both combined into the set the detection engine reads.

pub mod cluster;
pub mod error;
pub mod load;
pub mod matching;
pub mod reload;
pub mod rules;
pub mod set;
pub mod sources;
pub mod types;
pub mod validate;

pub use cluster::{ClusterPolicies, ObjectKey};
pub use error::{FieldError, Origin, PolicyError};
pub use load::{load_file, parse_policies, API_VERSION, KIND, MAX_POLICY_FILE_BYTES};
pub use reload::{spawn_reloader, DEFAULT_POLL};
pub use set::PolicySet;
pub use sources::PolicySources;
pub use types::*;
pub use validate::{validate_policy, validate_spec};
