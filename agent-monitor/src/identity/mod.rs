//! Who did it: the process table now; pods, containers, ServiceAccounts and agents next.

pub mod cgroup;
pub mod credentials;
pub mod pods;
pub mod process;
