//! zstd on the wire: bounded streaming decompression of uploads and
//! compression of downloads.

use bytes::Bytes;
use zstd::stream::raw::{Decoder, Encoder, InBuffer, Operation, OutBuffer};

/// Output is produced in pieces of this size, and the declared size is
/// checked after each, so a small bomb cannot inflate far.
const OUT_CHUNK: usize = 256 << 10;
/// Fast level: downloads are compressed on the fly.
const LEVEL: i32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("zstd data decompresses to more than the declared {declared} bytes")]
    TooLong { declared: u64 },
    #[error("zstd data is corrupt: {0}")]
    Corrupt(std::io::Error),
    #[error("zstd data ends in the middle of a frame")]
    Truncated,
}

/// Decompresses a zstd stream fed in arbitrary pieces.
pub struct Decompressor {
    decoder: Decoder<'static>,
    declared: u64,
    produced: u64,
    /// True when the input so far ends exactly at a frame boundary.
    at_frame_end: bool,
}

impl Decompressor {
    pub fn new(declared: u64) -> Result<Decompressor, Error> {
        let mut decoder = Decoder::new().map_err(Error::Corrupt)?;
        // The window a stream may ask for: no larger than the blob needs,
        // between 1 MiB and 128 MiB, so a hostile header cannot make every
        // upload allocate the maximum.
        let window_log = (64 - declared.max(1).leading_zeros()).clamp(20, 27);
        decoder
            .set_parameter(zstd::stream::raw::DParameter::WindowLogMax(window_log))
            .map_err(Error::Corrupt)?;
        Ok(Decompressor {
            decoder,
            declared,
            produced: 0,
            at_frame_end: true,
        })
    }

    /// Decompresses one piece of input.
    pub fn feed(&mut self, input: &[u8]) -> Result<Vec<Bytes>, Error> {
        let mut out = Vec::new();
        let mut src = InBuffer::around(input);
        loop {
            let mut buf = vec![0u8; OUT_CHUNK];
            let mut dst = OutBuffer::around(&mut buf[..]);
            let before = src.pos();
            let hint = self
                .decoder
                .run(&mut src, &mut dst)
                .map_err(Error::Corrupt)?;
            let written = dst.pos();
            self.produced += written as u64;
            if self.produced > self.declared {
                return Err(Error::TooLong {
                    declared: self.declared,
                });
            }
            // A call that neither consumed nor produced says nothing new
            // (after a frame ends it already expects the next header).
            if src.pos() > before || written > 0 {
                self.at_frame_end = hint == 0;
            }
            if written > 0 {
                buf.truncate(written);
                out.push(Bytes::from(buf));
            }
            // Done when the input is used up and the output did not fill.
            if src.pos() == input.len() && written < OUT_CHUNK {
                return Ok(out);
            }
        }
    }

    /// Checks the stream ended on a frame boundary.
    pub fn finish(&self) -> Result<(), Error> {
        if self.at_frame_end {
            Ok(())
        } else {
            Err(Error::Truncated)
        }
    }
}

/// Compresses a stream of chunks.
pub struct Compressor {
    encoder: Encoder<'static>,
}

impl Compressor {
    pub fn new() -> std::io::Result<Compressor> {
        Ok(Compressor {
            encoder: Encoder::new(LEVEL)?,
        })
    }

    pub fn feed(&mut self, input: &[u8]) -> std::io::Result<Bytes> {
        let mut out = Vec::with_capacity(input.len() / 2 + 1024);
        let mut src = InBuffer::around(input);
        while src.pos() < input.len() {
            let mut buf = vec![0u8; OUT_CHUNK];
            let mut dst = OutBuffer::around(&mut buf[..]);
            self.encoder.run(&mut src, &mut dst)?;
            let n = dst.pos();
            out.extend_from_slice(&buf[..n]);
        }
        Ok(Bytes::from(out))
    }

    pub fn finish(&mut self) -> std::io::Result<Bytes> {
        let mut out = Vec::new();
        loop {
            let mut buf = vec![0u8; OUT_CHUNK];
            let mut dst = OutBuffer::around(&mut buf[..]);
            let left = self.encoder.finish(&mut dst, true)?;
            let n = dst.pos();
            out.extend_from_slice(&buf[..n]);
            if left == 0 {
                return Ok(Bytes::from(out));
            }
        }
    }
}

/// Decompresses a whole in-memory zstd blob, refusing output beyond `declared`.
pub fn decompress_all(data: &[u8], declared: u64) -> Result<Bytes, Error> {
    let mut d = Decompressor::new(declared)?;
    let parts = d.feed(data)?;
    d.finish()?;
    let mut out = Vec::with_capacity(usize::try_from(declared).unwrap_or(0));
    for p in parts {
        out.extend_from_slice(&p);
    }
    Ok(Bytes::from(out))
}

pub fn compress_all(data: &[u8]) -> std::io::Result<Bytes> {
    zstd::bulk::compress(data, LEVEL).map(Bytes::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_in_pieces() {
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let mut c = Compressor::new().expect("encoder");
        let mut wire = Vec::new();
        for piece in data.chunks(100_000) {
            wire.extend_from_slice(&c.feed(piece).expect("compress"));
        }
        wire.extend_from_slice(&c.finish().expect("finish"));
        let mut d = Decompressor::new(data.len() as u64).expect("decoder");
        let mut out = Vec::new();
        for piece in wire.chunks(7_777) {
            for part in d.feed(piece).expect("decompress") {
                out.extend_from_slice(&part);
            }
        }
        d.finish().expect("complete frame");
        assert_eq!(out, data);
    }

    #[test]
    fn refuses_more_than_declared_and_truncation() {
        let data = vec![0u8; 10 << 20];
        let wire = compress_all(&data).expect("compress");
        assert!(matches!(
            decompress_all(&wire, 1000),
            Err(Error::TooLong { declared: 1000 })
        ));
        assert!(matches!(
            decompress_all(&wire[..wire.len() - 3], data.len() as u64),
            Err(Error::Truncated | Error::Corrupt(_))
        ));
        assert!(matches!(
            decompress_all(b"not zstd at all", 100),
            Err(Error::Corrupt(_))
        ));
        assert_eq!(
            decompress_all(&wire, data.len() as u64).expect("ok").len(),
            data.len()
        );
    }
}
