//! TensorBoard event files of a training run (`RUN/tensorboard/events.out.tfevents.*`), so
//! that a run can be watched in the tool users already have: `tensorboard --logdir runs/`.
//!
//! The file is TensorFlow's record format (each record: its length as u64, the masked
//! CRC-32C of the length, the bytes, their masked CRC-32C) holding `Event` protocol
//! buffers (tensorflow/core/util/event.proto, summary.proto): first the file version, then
//! one event per step with its scalars. Only the fields rankstab writes are declared.
use rankstab_records::{MetricRow, Site, Stat};
use rankstab_train::trainer::StepProgress;
use std::io::Write;
use std::path::{Path, PathBuf};

/// tensorflow.Event.
#[derive(Clone, PartialEq, prost::Message)]
struct Event {
    #[prost(double, tag = "1")]
    wall_time: f64,
    #[prost(int64, tag = "2")]
    step: i64,
    #[prost(string, optional, tag = "3")]
    file_version: Option<String>,
    #[prost(message, optional, tag = "5")]
    summary: Option<Summary>,
}

/// tensorflow.Summary.
#[derive(Clone, PartialEq, prost::Message)]
struct Summary {
    #[prost(message, repeated, tag = "1")]
    value: Vec<Value>,
}

/// tensorflow.Summary.Value with a scalar.
#[derive(Clone, PartialEq, prost::Message)]
struct Value {
    #[prost(string, tag = "1")]
    tag: String,
    #[prost(float, optional, tag = "2")]
    simple_value: Option<f32>,
}

/// TFRecord's masked CRC-32C.
fn masked_crc(bytes: &[u8]) -> u32 {
    let c = crc32c::crc32c(bytes);
    c.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// One record: length, its checksum, the data, its checksum.
fn record(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc(data).to_le_bytes());
    out
}

fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The scalars of a step: every metric row (`metrics/NAME`), the throughput, and per
/// adapter the second absolute moments of its output and input gradient and the norm of
/// its update when measured (`fwd_abs2/LAYER.MODULE`, `bwd_abs2/...`, `delta_norm/...`).
pub(crate) fn scalars(p: &StepProgress<'_>) -> Vec<(String, f64)> {
    let mut out: Vec<(String, f64)> = p
        .metrics
        .iter()
        .map(|r: &MetricRow| (format!("metrics/{}", r.metric), r.value))
        .collect();
    out.push((
        "speed/tokens_per_second".into(),
        p.tokens as f64 / p.seconds.max(1e-9),
    ));
    for r in p.moments {
        let name = match (r.site, r.stat, r.m) {
            (Site::Fwd, Stat::Abs, Some(2)) => "fwd_abs2",
            (Site::Bwd, Stat::Abs, Some(2)) => "bwd_abs2",
            (Site::Param, Stat::DeltaNorm, _) => "delta_norm",
            _ => continue,
        };
        out.push((format!("{name}/{}.{}", r.layer, r.module), r.value));
    }
    out
}

/// An event file being written; write errors end the file with one warning, never the run.
pub(crate) struct EventWriter {
    path: PathBuf,
    file: Option<std::io::BufWriter<std::fs::File>>,
}

impl EventWriter {
    /// A new event file in `dir/tensorboard/` (TensorBoard's name pattern, with the pid so
    /// that a resumed run adds a file beside the killed one's).
    pub(crate) fn create(dir: &Path) -> Self {
        let tb = dir.join("tensorboard");
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "localhost".into());
        let path = tb.join(format!(
            "events.out.tfevents.{}.{host}.{}.rankstab",
            now() as u64,
            std::process::id()
        ));
        let mut w = Self { path, file: None };
        let opened = std::fs::create_dir_all(&tb).and_then(|()| std::fs::File::create(&w.path));
        match opened {
            Ok(f) => {
                w.file = Some(std::io::BufWriter::new(f));
                w.write(&Event {
                    wall_time: now(),
                    step: 0,
                    file_version: Some("brain.Event:2".into()),
                    summary: None,
                });
            }
            Err(e) => w.fail(&e),
        }
        w
    }

    fn fail(&mut self, e: &std::io::Error) {
        eprintln!(
            "rankstab: warning: {}: {e}; no more TensorBoard events are written",
            self.path.display()
        );
        self.file = None;
    }

    fn write(&mut self, ev: &Event) {
        use prost::Message;
        let Some(f) = self.file.as_mut() else {
            return;
        };
        let r = f
            .write_all(&record(&ev.encode_to_vec()))
            .and_then(|()| f.flush());
        if let Err(e) = r {
            self.fail(&e);
        }
    }

    /// The scalars of a step, at its step number.
    pub(crate) fn step(&mut self, p: &StepProgress<'_>) {
        let value = scalars(p)
            .into_iter()
            .map(|(tag, v)| Value {
                tag,
                simple_value: Some(v as f32),
            })
            .collect();
        self.write(&Event {
            wall_time: now(),
            step: p.step as i64,
            file_version: None,
            summary: Some(Summary { value }),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The checksum of TFRecord: CRC-32C (Castagnoli; its check value for "123456789" is
    /// 0xE3069283), masked as TensorFlow's crc32c::Mask.
    #[test]
    fn the_checksum_is_masked_crc32c() {
        assert_eq!(crc32c::crc32c(b"123456789"), 0xE306_9283);
        let c: u32 = 0xE306_9283;
        assert_eq!(
            masked_crc(b"123456789"),
            ((c >> 15) | (c << 17)).wrapping_add(0xa282_ead8)
        );
        let r = record(b"abc");
        assert_eq!(r.len(), 3 + 16);
        assert_eq!(&r[..8], &3u64.to_le_bytes());
        assert_eq!(&r[12..15], b"abc");
    }
}
