//! Pod source: a pods file. (Being written.)
