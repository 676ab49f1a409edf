//! Prometheus remote-write 1.0 messages (`prometheus/prompb/{remote,types}.proto`),
//! declared by hand: only the fields a receiver reads. The receiver reads bodies with
//! [`for_each_lazy_series`], which lends each series' labels straight from the body
//! (decoded only when asked for) instead of allocating two strings per label; the
//! prost structs encode requests (tests, benches) and are the reference the decoder
//! is tested against. Unknown fields (metadata, exemplars, histograms) are skipped.

/// `prometheus.WriteRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct WriteRequest {
    /// The series with their samples.
    #[prost(message, repeated, tag = "1")]
    pub timeseries: Vec<TimeSeries>,
}

/// `prometheus.TimeSeries`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct TimeSeries {
    /// Labels, `__name__` among them.
    #[prost(message, repeated, tag = "1")]
    pub labels: Vec<Label>,
    /// Samples in time order.
    #[prost(message, repeated, tag = "2")]
    pub samples: Vec<Sample>,
}

/// `prometheus.Label`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Label {
    /// Label name.
    #[prost(string, tag = "1")]
    pub name: String,
    /// Label value.
    #[prost(string, tag = "2")]
    pub value: String,
}

/// `prometheus.Sample`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Sample {
    /// Sample value.
    #[prost(double, tag = "1")]
    pub value: f64,
    /// Milliseconds since the Unix epoch.
    #[prost(int64, tag = "2")]
    pub timestamp: i64,
}

/// Why a body is not a `WriteRequest`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct DecodeError(&'static str);

/// A series whose samples are decoded and whose labels are decoded only when asked
/// for ([`LazySeries::labels_into`]): a receiver that recognises the raw label bytes
/// ([`LazySeries::labels_raw`]) of a series it has stored before needs no more.
#[derive(Debug, Default)]
pub struct LazySeries<'a> {
    body: &'a [u8],
    /// The series' label fields exactly as sent, when they come in one run (as
    /// Prometheus sends them: all labels, then the samples); `None` otherwise.
    pub labels_raw: Option<&'a [u8]>,
    /// Samples as (value, timestamp in ms).
    pub samples: Vec<(f64, i64)>,
}

impl<'a> LazySeries<'a> {
    /// Decodes the labels (in the order sent) into `out`: `false` when a label name or
    /// value is not UTF-8 (that label is left out; the caller drops the series, not
    /// the request, as one bad series must not cost the sender the others).
    pub fn labels_into(&self, out: &mut Vec<(&'a str, &'a str)>) -> Result<bool, DecodeError> {
        let mut utf8 = true;
        let mut reader = Reader(self.body);
        while let Some((field, wire)) = reader.key()? {
            match (field, wire) {
                (1, WIRE_LEN) => {
                    let mut label = Reader(reader.bytes()?);
                    let (mut name, mut value) = (Some(""), Some(""));
                    while let Some((field, wire)) = label.key()? {
                        match (field, wire) {
                            (1, WIRE_LEN) => name = std::str::from_utf8(label.bytes()?).ok(),
                            (2, WIRE_LEN) => value = std::str::from_utf8(label.bytes()?).ok(),
                            _ => label.skip(wire)?,
                        }
                    }
                    match name.zip(value) {
                        Some(pair) => out.push(pair),
                        None => utf8 = false,
                    }
                }
                _ => reader.skip(wire)?,
            }
        }
        Ok(utf8)
    }
}

/// Walks a `WriteRequest`, calling `f` for each series with its samples decoded and
/// its labels not yet: the structure of the whole request (every length prefix, every
/// sample) is checked here, the labels' inner fields and UTF-8 by
/// [`LazySeries::labels_into`]. An error of `f` stops the walk and is returned.
pub fn for_each_lazy_series<'a>(
    buf: &'a [u8],
    mut f: impl FnMut(&LazySeries<'a>) -> Result<(), DecodeError>,
) -> Result<(), DecodeError> {
    let mut series = LazySeries::default();
    let mut reader = Reader(buf);
    while let Some((field, wire)) = reader.key()? {
        match (field, wire) {
            (1, WIRE_LEN) => {
                read_series(reader.bytes()?, &mut series)?;
                f(&series)?;
            }
            _ => reader.skip(wire)?,
        }
    }
    Ok(())
}

const WIRE_VARINT: u8 = 0;
const WIRE_FIXED64: u8 = 1;
const WIRE_LEN: u8 = 2;
const WIRE_FIXED32: u8 = 5;

fn read_series<'a>(buf: &'a [u8], series: &mut LazySeries<'a>) -> Result<(), DecodeError> {
    series.body = buf;
    series.samples.clear();
    // The run of label fields: (start, end) offsets, and whether another field came
    // between two label fields.
    let (mut run, mut broken, mut after_other) = (None::<(usize, usize)>, false, false);
    let mut reader = Reader(buf);
    loop {
        let start = buf.len() - reader.0.len();
        let Some((field, wire)) = reader.key()? else {
            break;
        };
        match (field, wire) {
            (1, WIRE_LEN) => {
                reader.bytes()?;
                let end = buf.len() - reader.0.len();
                run = match run {
                    None => Some((start, end)),
                    Some((first, _)) => {
                        broken |= after_other;
                        Some((first, end))
                    }
                };
            }
            (2, WIRE_LEN) => {
                let mut sample = Reader(reader.bytes()?);
                let (mut value, mut timestamp) = (0.0, 0);
                while let Some((field, wire)) = sample.key()? {
                    match (field, wire) {
                        (1, WIRE_FIXED64) => value = f64::from_bits(sample.fixed64()?),
                        // int64: two's complement in a 64-bit varint
                        (2, WIRE_VARINT) => timestamp = sample.varint()? as i64,
                        _ => sample.skip(wire)?,
                    }
                }
                series.samples.push((value, timestamp));
                after_other |= run.is_some();
            }
            _ => {
                reader.skip(wire)?;
                after_other |= run.is_some();
            }
        }
    }
    series.labels_raw = match (run, broken) {
        (Some((start, end)), false) => Some(&buf[start..end]),
        _ => None,
    };
    Ok(())
}

/// The unread rest of a message.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn varint(&mut self) -> Result<u64, DecodeError> {
        let mut value = 0u64;
        for (i, &byte) in self.0.iter().enumerate().take(10) {
            value |= u64::from(byte & 0x7f) << (7 * i);
            if byte & 0x80 == 0 {
                self.0 = &self.0[i + 1..];
                return Ok(value);
            }
        }
        Err(DecodeError("invalid varint"))
    }

    /// The next field number and wire type; `None` at the end.
    fn key(&mut self) -> Result<Option<(u64, u8)>, DecodeError> {
        if self.0.is_empty() {
            return Ok(None);
        }
        let key = self.varint()?;
        let field = key >> 3;
        if field == 0 {
            return Err(DecodeError("invalid field number 0"));
        }
        Ok(Some((field, (key & 7) as u8)))
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if n > self.0.len() {
            return Err(DecodeError("a field runs past the end of its message"));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn bytes(&mut self) -> Result<&'a [u8], DecodeError> {
        let len = self.varint()?;
        let len = usize::try_from(len).map_err(|_| DecodeError("a length beyond memory"))?;
        self.take(len)
    }

    fn fixed64(&mut self) -> Result<u64, DecodeError> {
        let bytes = self.take(8)?;
        let mut le = [0u8; 8];
        le.copy_from_slice(bytes);
        Ok(u64::from_le_bytes(le))
    }

    fn skip(&mut self, wire: u8) -> Result<(), DecodeError> {
        match wire {
            WIRE_VARINT => self.varint().map(drop),
            WIRE_FIXED64 => self.take(8).map(drop),
            WIRE_LEN => self.bytes().map(drop),
            WIRE_FIXED32 => self.take(4).map(drop),
            _ => Err(DecodeError(
                "unsupported wire type (groups are not used by remote write)",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    /// A series as compared: labels, and samples as (value bits, timestamp).
    type Read = (Vec<(String, String)>, Vec<(u64, i64)>);

    /// What the receiver's decoder reads, labels decoded for every series.
    fn decoded(buf: &[u8]) -> Result<Vec<Read>, DecodeError> {
        let mut out = Vec::new();
        for_each_lazy_series(buf, |s| {
            let mut labels = Vec::new();
            if !s.labels_into(&mut labels)? {
                return Err(DecodeError("a label is not UTF-8"));
            }
            out.push((
                labels
                    .iter()
                    .map(|(n, v)| (n.to_string(), v.to_string()))
                    .collect(),
                s.samples.iter().map(|(v, t)| (v.to_bits(), *t)).collect(),
            ));
            Ok(())
        })?;
        Ok(out)
    }

    /// What prost decodes from `buf` (the reference; proto3 sends no default values,
    /// so e.g. `-0.0` arrives as `0.0` for both).
    fn as_prost_reads(buf: &[u8]) -> Vec<Read> {
        WriteRequest::decode(buf)
            .expect("prost decodes")
            .timeseries
            .iter()
            .map(|s| {
                (
                    s.labels
                        .iter()
                        .map(|l| (l.name.clone(), l.value.clone()))
                        .collect(),
                    s.samples
                        .iter()
                        .map(|x| (x.value.to_bits(), x.timestamp))
                        .collect(),
                )
            })
            .collect()
    }

    /// A deterministic variety of requests: empty strings, non-ASCII, negative and
    /// huge timestamps, NaN and infinite values, series without samples.
    fn requests() -> Vec<WriteRequest> {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let words = [
            "",
            "project_name",
            "Ünïcødé ✓",
            "__name__",
            "a\"b\\c\n",
            "x",
        ];
        let values = [0.0, -0.0, 1.5, f64::NAN, f64::INFINITY, -1e300, 5e-324];
        (0..200)
            .map(|_| WriteRequest {
                timeseries: (0..next() % 5)
                    .map(|_| TimeSeries {
                        labels: (0..next() % 6)
                            .map(|_| Label {
                                name: words[(next() % 6) as usize].into(),
                                value: words[(next() % 6) as usize].repeat((next() % 40) as usize),
                            })
                            .collect(),
                        samples: (0..next() % 4)
                            .map(|_| Sample {
                                value: values[(next() % 7) as usize],
                                timestamp: next() as i64 >> (next() % 64),
                            })
                            .collect(),
                    })
                    .collect(),
            })
            .collect()
    }

    #[test]
    fn decodes_what_prost_encodes_exactly() {
        for request in requests() {
            let buf = request.encode_to_vec();
            assert_eq!(
                decoded(&buf).expect("decodes"),
                as_prost_reads(&buf),
                "{request:?}"
            );
        }
    }

    #[test]
    fn the_raw_labels_are_the_run_of_label_fields_or_none() {
        let labels = vec![
            Label {
                name: "__name__".into(),
                value: "m".into(),
            },
            Label {
                name: "project_name".into(),
                value: "Ünïcødé".into(),
            },
        ];
        let only_labels = TimeSeries {
            labels: labels.clone(),
            samples: vec![],
        }
        .encode_to_vec();
        let raws = |request: &[u8]| {
            let mut out = Vec::new();
            for_each_lazy_series(request, |s| {
                out.push((s.labels_raw.map(<[u8]>::to_vec), s.samples.clone()));
                Ok(())
            })
            .expect("decodes");
            out
        };
        let samples = |n: i64| {
            (0..n)
                .map(|t| Sample {
                    value: t as f64,
                    timestamp: t,
                })
                .collect::<Vec<_>>()
        };
        let request = WriteRequest {
            timeseries: vec![
                TimeSeries {
                    labels: labels.clone(),
                    samples: samples(1),
                },
                TimeSeries {
                    labels: labels.clone(),
                    samples: samples(3),
                },
                TimeSeries {
                    labels: vec![],
                    samples: samples(1),
                },
            ],
        }
        .encode_to_vec();
        let found = raws(&request);
        assert_eq!(found.len(), 3);
        assert_eq!(found[0].0.as_deref(), Some(&only_labels[..]));
        assert_eq!(found[1].0, found[0].0, "the same labels, other samples");
        assert_eq!(found[1].1, vec![(0.0, 0), (1.0, 1), (2.0, 2)]);
        assert_eq!(found[2].0, None, "no labels");
        // A label, a sample, a label: not one run (prost still decodes it).
        // The first label field: key, length 13, then name (2 + 8) and value (2 + 1).
        let split = 2 + 13;
        assert_eq!(only_labels[..2], [0x0a, 13]);
        let mut series = only_labels[..split].to_vec();
        series.extend_from_slice(&[0x12, 0x02, 0x10, 0x05]);
        series.extend_from_slice(&only_labels[split..]);
        let mut interleaved = vec![0x0a, series.len() as u8];
        interleaved.extend_from_slice(&series);
        assert_eq!(as_prost_reads(&interleaved)[0].0.len(), 2);
        assert_eq!(raws(&interleaved)[0].0, None);
        assert_eq!(
            decoded(&interleaved).expect("decodes"),
            as_prost_reads(&interleaved)
        );
    }

    #[test]
    fn unknown_fields_are_skipped_and_broken_bodies_refused_like_prost() {
        let request = &requests()[7];
        let mut buf = request.encode_to_vec();
        // metadata (field 3, a message) and a varint field 9: skipped
        buf.extend_from_slice(&[0x1a, 0x02, 0x08, 0x01, 0x48, 0x05]);
        assert_eq!(decoded(&buf).expect("decodes"), as_prost_reads(&buf));
        assert!(!as_prost_reads(&buf).is_empty(), "a request with series");
        let full = requests()
            .into_iter()
            .find(|r| r.encoded_len() > 20)
            .expect("a longer request")
            .encode_to_vec();
        // Every truncation prost refuses is refused here too, and vice versa.
        for cut in 0..full.len() {
            let ours = decoded(&full[..cut]).is_ok();
            let theirs = WriteRequest::decode(&full[..cut]).is_ok();
            assert_eq!(ours, theirs, "cut at {cut}");
        }
        // A label that is not UTF-8: prost refuses the request; here the structure
        // is sound and only that series says so, leaving the label out.
        let bad = [0x0a, 0x06, 0x0a, 0x04, 0x0a, 0x02, 0xff, 0xfe];
        assert!(WriteRequest::decode(&bad[..]).is_err());
        let mut series = 0;
        for_each_lazy_series(&bad, |s| {
            let mut labels = Vec::new();
            assert!(!s.labels_into(&mut labels)?, "not UTF-8");
            assert!(labels.is_empty(), "{labels:?}");
            series += 1;
            Ok(())
        })
        .expect("the structure is sound");
        assert_eq!(series, 1);
    }
}
