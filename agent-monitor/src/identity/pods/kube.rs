//! Pod source: a `kube` watcher on the pods of this node. (Being written.)
