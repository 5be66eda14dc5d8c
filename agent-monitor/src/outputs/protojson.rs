//! The proto3 JSON form of the API's messages: one schema everywhere. The JSON-lines
//! event output and `tail --json` print exactly what a gRPC client decodes, field for field
//! (proto field names, 64-bit integers as strings, timestamps in RFC 3339, enums by name),
//! as the proto3 JSON mapping prescribes.

use std::{io::Write, sync::OnceLock};

use prost_reflect::{DescriptorPool, DynamicMessage, MessageDescriptor, SerializeOptions};

use super::{
    grpc::{pb, Origin},
    jsonl::{JsonLines, Reopen},
    Sink,
};
use crate::events::Record;

fn pool() -> Option<&'static DescriptorPool> {
    static POOL: OnceLock<Option<DescriptorPool>> = OnceLock::new();
    POOL.get_or_init(|| DescriptorPool::decode(pb::FILE_DESCRIPTOR_SET).ok())
        .as_ref()
}

fn descriptor(name: &str) -> std::io::Result<MessageDescriptor> {
    pool()
        .and_then(|p| p.get_message_by_name(name))
        .ok_or_else(|| {
            std::io::Error::other(format!("message {name} missing from the descriptor set"))
        })
}

/// A message as proto3 JSON.
pub fn to_value<M: prost::Message>(msg: &M, name: &str) -> std::io::Result<serde_json::Value> {
    let dynamic = DynamicMessage::decode(descriptor(name)?, msg.encode_to_vec().as_slice())
        .map_err(std::io::Error::other)?;
    let options = SerializeOptions::new().use_proto_field_name(true);
    dynamic
        .serialize_with_options(serde_json::value::Serializer, &options)
        .map_err(std::io::Error::other)
}

/// An event as proto3 JSON.
pub fn event(e: &pb::Event) -> std::io::Result<serde_json::Value> {
    to_value(e, "agent_monitor.v1.Event")
}

/// An anomaly as proto3 JSON.
pub fn anomaly(a: &pb::Anomaly) -> std::io::Result<serde_json::Value> {
    to_value(a, "agent_monitor.v1.Anomaly")
}

/// Writes each record as one line of the proto3 JSON form of `agent_monitor.v1.Event`,
/// serialized straight into the buffered writer (no intermediate JSON value).
pub struct EventLines<W: Write> {
    lines: JsonLines<W>,
    origin: Origin,
    descriptor: MessageDescriptor,
    options: SerializeOptions,
}

impl<W: Write> EventLines<W> {
    pub fn new(out: W, origin: Origin) -> std::io::Result<Self> {
        Ok(Self {
            lines: JsonLines::new(out),
            origin,
            descriptor: descriptor("agent_monitor.v1.Event")?,
            options: SerializeOptions::new().use_proto_field_name(true),
        })
    }
}

impl<W: Write + Reopen> Sink<Record> for EventLines<W> {
    fn write(&mut self, r: &Record) -> std::io::Result<()> {
        let bytes = prost::Message::encode_to_vec(&self.origin.event(r));
        let dynamic = DynamicMessage::decode(self.descriptor.clone(), bytes.as_slice())
            .map_err(std::io::Error::other)?;
        let options = &self.options;
        self.lines.line(|s| {
            dynamic
                .serialize_with_options(s, options)
                .map_err(std::io::Error::other)
        })
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Sink::<serde_json::Value>::flush(&mut self.lines)
    }

    fn reopen(&mut self) -> std::io::Result<()> {
        self.lines.reopen()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::LostRecord;

    #[test]
    fn events_print_in_the_proto3_json_mapping() {
        let r = Record::Lost(LostRecord {
            seq: 9,
            time: "2026-11-23T07:00:00.000000001Z".into(),
            lane: "credential".into(),
            count: 3,
            total: 12,
        });
        let v = event(&pb::Event::from(&r)).expect("json");
        // uint64 is a string in proto3 JSON.
        assert_eq!(v["seq"], "9");
        assert_eq!(v["lost"]["lane"], "LANE_CREDENTIAL");
        assert_eq!(v["lost"]["total"], "12");
        // The line writer prints the same object.
        let mut buf = Vec::new();
        {
            let mut lines = EventLines::new(&mut buf, Origin::default()).expect("descriptor");
            lines.write(&r).expect("write");
            lines.flush().expect("flush");
        }
        let line: serde_json::Value = serde_json::from_slice(&buf).expect("one JSON line");
        assert_eq!(line, v);
    }
}
