//! One JSON object per line, to stdout or a file.

use std::{
    fs::OpenOptions,
    io::{BufWriter, Write},
    path::Path,
};

use super::Sink;

/// Writes each item (record or anomaly) as one line of JSON.
pub struct JsonLines<W: Write> {
    out: BufWriter<W>,
}

impl<W: Write> JsonLines<W> {
    pub fn new(out: W) -> Self {
        Self {
            out: BufWriter::new(out),
        }
    }
}

/// Opens a configured output: `-` is stdout, anything else a file opened for append.
pub fn open_writer(output: &str) -> std::io::Result<Box<dyn Write + Send>> {
    Ok(if output == "-" {
        Box::new(std::io::stdout())
    } else {
        Box::new(
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(Path::new(output))?,
        )
    })
}

impl<W: Write> JsonLines<W> {
    /// Writes one line whose JSON `serialize` produces into the buffered writer.
    pub fn line(
        &mut self,
        serialize: impl FnOnce(&mut serde_json::Serializer<&mut BufWriter<W>>) -> std::io::Result<()>,
    ) -> std::io::Result<()> {
        serialize(&mut serde_json::Serializer::new(&mut self.out))?;
        self.out.write_all(b"\n")
    }
}

impl<W: Write, T: serde::Serialize> Sink<T> for JsonLines<W> {
    fn write(&mut self, item: &T) -> std::io::Result<()> {
        self.line(|s| item.serialize(s).map_err(std::io::Error::other))
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{LostRecord, Record};

    #[test]
    fn one_line_per_record() {
        let mut buf = Vec::new();
        {
            let mut sink = JsonLines::new(&mut buf);
            for seq in 1..=2 {
                let rec = Record::Lost(LostRecord {
                    seq,
                    time: "t".into(),
                    lane: "network".into(),
                    count: 1,
                    total: seq,
                });
                sink.write(&rec).expect("write");
            }
            Sink::<Record>::flush(&mut sink).expect("flush");
        }
        let text = String::from_utf8(buf).expect("utf-8");
        let lines: Vec<_> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        let v: serde_json::Value = serde_json::from_str(lines[1]).expect("json");
        assert_eq!(v["type"], "lost");
        assert_eq!(v["total"], 2);
    }
}
