//! Binary `COPY … FROM STDIN` rows written into large messages.
//!
//! tokio-postgres' `BinaryCopyInWriter` hands its sink every 4 KiB: a series row is
//! about 450 bytes, so 100,000 new series made some 11,000 messages, each a trip
//! through the connection's channel and task, and writing them cost more than the
//! database took to store them. This writer encodes the same format (the same bytes
//! for each type as tokio-postgres' `ToSql`) and sends a message per
//! [`MESSAGE_BYTES`].

use anyhow::Context;
use bytes::{BufMut, Bytes, BytesMut};
use chrono::{DateTime, NaiveDate, Utc};
use futures::SinkExt;
use std::pin::Pin;
use tokio_postgres::CopyInSink;

/// Bytes encoded before they are sent as one `CopyData` message.
const MESSAGE_BYTES: usize = 256 * 1024;

/// Writes rows into a binary `COPY` sink: [`CopyWriter::row`], then one call per
/// column in the statement's order, then [`CopyWriter::end_row`].
pub struct CopyWriter {
    sink: Pin<Box<CopyInSink<Bytes>>>,
    buf: BytesMut,
}

impl CopyWriter {
    /// Starts the binary stream (its header) on `sink`.
    pub fn new(sink: CopyInSink<Bytes>) -> Self {
        let mut buf = BytesMut::with_capacity(MESSAGE_BYTES + 4096);
        buf.put_slice(b"PGCOPY\n\xff\r\n\0");
        buf.put_i32(0); // flags
        buf.put_i32(0); // header extension
        Self {
            sink: Box::pin(sink),
            buf,
        }
    }

    /// Starts a row of `columns` columns.
    pub fn row(&mut self, columns: i16) -> &mut Self {
        self.buf.put_i16(columns);
        self
    }

    /// A `bigint`.
    pub fn int8(&mut self, value: i64) -> &mut Self {
        put_int8(&mut self.buf, value);
        self
    }

    /// A `double precision`.
    pub fn float8(&mut self, value: f64) -> &mut Self {
        put_float8(&mut self.buf, value);
        self
    }

    /// A `text`.
    pub fn text(&mut self, value: &str) -> anyhow::Result<&mut Self> {
        put_text(&mut self.buf, value)?;
        Ok(self)
    }

    /// A `timestamptz`.
    pub fn timestamptz(&mut self, value: DateTime<Utc>) -> anyhow::Result<&mut Self> {
        put_timestamptz(&mut self.buf, value)?;
        Ok(self)
    }

    /// Ends a row: sends what is encoded once it fills a message.
    pub async fn end_row(&mut self) -> anyhow::Result<()> {
        if self.buf.len() >= MESSAGE_BYTES {
            let message = self.buf.split().freeze();
            self.sink.send(message).await?;
        }
        Ok(())
    }

    /// Ends the stream and the `COPY`; returns the rows the server took.
    pub async fn finish(mut self) -> anyhow::Result<u64> {
        self.buf.put_i16(-1);
        let message = self.buf.split().freeze();
        self.sink.send(message).await?;
        Ok(self.sink.as_mut().finish().await?)
    }
}

// Each field: its length (i32), then its value in the type's binary format.

fn put_int8(buf: &mut BytesMut, value: i64) {
    buf.put_i32(8);
    buf.put_i64(value);
}

fn put_float8(buf: &mut BytesMut, value: f64) {
    buf.put_i32(8);
    buf.put_f64(value);
}

fn put_text(buf: &mut BytesMut, value: &str) -> anyhow::Result<()> {
    let len = i32::try_from(value.len()).context("text too long for COPY")?;
    buf.put_i32(len);
    buf.put_slice(value.as_bytes());
    Ok(())
}

/// Microseconds since 2000-01-01 UTC, computed as tokio-postgres does (and refused
/// when out of range, as it refuses them).
fn put_timestamptz(buf: &mut BytesMut, value: DateTime<Utc>) -> anyhow::Result<()> {
    let micros = value
        .naive_utc()
        .signed_duration_since(PG_EPOCH)
        .num_microseconds()
        .with_context(|| format!("time {value} out of range for PostgreSQL"))?;
    buf.put_i32(8);
    buf.put_i64(micros);
    Ok(())
}

/// PostgreSQL's epoch for timestamps (evaluated at compile time: a bad date would
/// fail the build, never a run).
const PG_EPOCH: chrono::NaiveDateTime = match NaiveDate::from_ymd_opt(2000, 1, 1) {
    Some(date) => match date.and_hms_opt(0, 0, 0) {
        Some(epoch) => epoch,
        None => panic!("midnight exists"),
    },
    None => panic!("2000-01-01 exists"),
};

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_postgres::types::{IsNull, ToSql, Type};

    /// A field as tokio-postgres' `BinaryCopyInWriter` writes it.
    fn reference(value: &(dyn ToSql + Sync), ty: &Type) -> Vec<u8> {
        let mut out = BytesMut::new();
        out.put_i32(0);
        match value.to_sql_checked(ty, &mut out).expect("encodes") {
            IsNull::No => {
                let len = i32::try_from(out.len() - 4).expect("fits");
                out[..4].copy_from_slice(&len.to_be_bytes());
            }
            IsNull::Yes => panic!("no NULLs here"),
        }
        out.to_vec()
    }

    fn ours(put: impl FnOnce(&mut BytesMut)) -> Vec<u8> {
        let mut out = BytesMut::new();
        put(&mut out);
        out.to_vec()
    }

    #[test]
    fn every_field_is_encoded_byte_for_byte_as_tokio_postgres_encodes_it() {
        for value in [0_i64, 1, -1, i64::MAX, i64::MIN, 1_780_000_000_000] {
            assert_eq!(ours(|b| put_int8(b, value)), reference(&value, &Type::INT8));
        }
        for value in [0.0_f64, -0.0, 1.5, -3.25e300, f64::MIN_POSITIVE, 1e-310] {
            assert_eq!(
                ours(|b| put_float8(b, value)),
                reference(&value, &Type::FLOAT8)
            );
        }
        for value in ["", "project_vcpu_usage", "ünïcødé \"quoted\" \\ \n"] {
            assert_eq!(
                ours(|b| put_text(b, value).expect("encodes")),
                reference(&value, &Type::TEXT)
            );
        }
        for text in [
            "2026-06-01T00:00:00Z",
            "2000-01-01T00:00:00Z",
            "1999-12-31T23:59:59.999999Z",
            "1970-01-01T00:00:00.000000500Z",
            "1969-07-20T20:17:40.123456789Z",
            "2262-04-11T23:47:16.854775807Z",
        ] {
            let time: DateTime<Utc> = text.parse().expect("a time");
            assert_eq!(
                ours(|b| put_timestamptz(b, time).expect("encodes")),
                reference(&time, &Type::TIMESTAMPTZ),
                "{text}"
            );
        }
    }
}
