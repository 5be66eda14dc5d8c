//! Feeds arbitrary bytes to the journal reader as one segment file: it must never panic,
//! must end, and must not report more bytes than it was given.
#![no_main]

use agent_monitor_api::journal::{Item, Reader};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let len = data.len() as u64;
    let mut items = 0usize;
    for item in Reader::from_bytes(data.to_vec()) {
        items += 1;
        // Each item consumes at least one frame header, so the count is bounded by the
        // input; more would mean the reader is looping.
        assert!(items <= data.len() + 1, "reader did not advance");
        match item {
            Item::Record { offset, .. } => assert!(offset < len),
            Item::Damage(d) => assert!(d.offset.saturating_add(d.bytes_skipped) <= len),
        }
    }
});
