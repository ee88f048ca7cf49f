//! The zlib calls `flate2` does not expose (`inflatePrime`, `inflateSetDictionary`,
//! `inflateGetDictionary`, `Z_BLOCK` stops), through `libz-rs-sys`, the C API of the pure-Rust
//! `zlib-rs` that `flate2` already builds on: no C library is linked. All `unsafe` of the gzip
//! index is in this file.

use std::io::{self};

use super::{Checkpoint, WINDOW};

/// Zlib's inflate through its C API. Owns the stream; all `unsafe` is here.
pub(super) struct RawInflate {
    stream: Box<libz_rs_sys::z_stream>,
}

// SAFETY: the z_stream owns its state exclusively; the raw pointers in it only point into that
// state or into buffers that live for one call.
unsafe impl Send for RawInflate {}

impl RawInflate {
    /// `window_bits` as for `inflateInit2`: -15 raw deflate, 31 gzip.
    pub(super) fn new(window_bits: i32) -> io::Result<RawInflate> {
        let mut stream = Box::new(libz_rs_sys::z_stream::default());
        // SAFETY: `stream` is a valid, default-initialised z_stream (allocator fields set);
        // version and size are this library's own.
        let ret = unsafe {
            libz_rs_sys::inflateInit2_(
                &mut *stream,
                window_bits,
                libz_rs_sys::zlibVersion(),
                std::mem::size_of::<libz_rs_sys::z_stream>() as i32,
            )
        };
        if ret != libz_rs_sys::Z_OK {
            return Err(io::Error::other(format!("inflateInit2 failed ({ret})")));
        }
        Ok(RawInflate { stream })
    }

    /// Inflates from `input` into `output`; returns (consumed, produced, zlib return code).
    pub(super) fn inflate(
        &mut self,
        input: &[u8],
        output: &mut [u8],
        flush: i32,
    ) -> (usize, usize, i32) {
        let s = &mut *self.stream;
        s.next_in = input.as_ptr();
        s.avail_in = input.len().min(u32::MAX as usize) as u32;
        s.next_out = output.as_mut_ptr();
        s.avail_out = output.len().min(u32::MAX as usize) as u32;
        let (in_before, out_before) = (s.avail_in, s.avail_out);
        // SAFETY: next_in/next_out point at live slices of the lengths given.
        let ret = unsafe { libz_rs_sys::inflate(s, flush) };
        let consumed = (in_before - s.avail_in) as usize;
        let produced = (out_before - s.avail_out) as usize;
        s.next_in = std::ptr::null();
        s.next_out = std::ptr::null_mut();
        (consumed, produced, ret)
    }

    pub(super) fn data_type(&self) -> i32 {
        self.stream.data_type
    }

    pub(super) fn reset(&mut self) -> io::Result<()> {
        // SAFETY: the stream was initialised by `new`.
        match unsafe { libz_rs_sys::inflateReset(&mut *self.stream) } {
            libz_rs_sys::Z_OK => Ok(()),
            ret => Err(io::Error::other(format!("inflateReset failed ({ret})"))),
        }
    }

    /// The current window (the last up to 32 KiB of output).
    pub(super) fn window(&mut self) -> io::Result<Vec<u8>> {
        let mut buf = vec![0u8; WINDOW];
        let mut len: u32 = 0;
        // SAFETY: buf holds 32 KiB, the most inflateGetDictionary writes.
        let ret =
            unsafe { libz_rs_sys::inflateGetDictionary(&*self.stream, buf.as_mut_ptr(), &mut len) };
        if ret != libz_rs_sys::Z_OK {
            return Err(io::Error::other(format!(
                "inflateGetDictionary failed ({ret})"
            )));
        }
        buf.truncate(len as usize);
        Ok(buf)
    }

    /// Feeds `bits` (0..=7) low bits of `value` ahead of the input.
    pub(super) fn prime(&mut self, bits: u8, value: u8) -> io::Result<()> {
        // SAFETY: the stream was initialised by `new`.
        let ret =
            unsafe { libz_rs_sys::inflatePrime(&mut *self.stream, bits as i32, value as i32) };
        if ret != libz_rs_sys::Z_OK {
            return Err(io::Error::other(format!("inflatePrime failed ({ret})")));
        }
        Ok(())
    }

    pub(super) fn set_dictionary(&mut self, dictionary: &[u8]) -> io::Result<()> {
        // SAFETY: the pointer and length describe a live slice.
        let ret = unsafe {
            libz_rs_sys::inflateSetDictionary(
                &mut *self.stream,
                dictionary.as_ptr(),
                dictionary.len() as u32,
            )
        };
        if ret != libz_rs_sys::Z_OK {
            return Err(io::Error::other(format!(
                "inflateSetDictionary failed ({ret})"
            )));
        }
        Ok(())
    }
}

impl Drop for RawInflate {
    fn drop(&mut self) {
        // SAFETY: initialised by `new`, ended once.
        unsafe { libz_rs_sys::inflateEnd(&mut *self.stream) };
    }
}

/// Inflates one span from its checkpoint as its compressed bytes arrive, so that a file early
/// in a span is had once its own bytes are in, and later files of the same request continue
/// from there instead of inflating the span again. Where the bytes given so far end, it can be
/// kept ([`SpanInflater::position`]) and fed the span's next bytes by a later request.
pub struct SpanInflater {
    zlib: RawInflate,
    /// Output from `out_from` (span output offset) on.
    out: Vec<u8>,
    out_from: u64,
    /// Span output offset where inflating stops.
    limit: u64,
    /// Leftover bits of the checkpoint's first byte still to be primed (0: none or done).
    bits: u8,
    /// Compressed bytes consumed, from the checkpoint's first byte on.
    consumed: u64,
}

impl SpanInflater {
    /// Starts at `checkpoint`; inflating stops `limit` bytes of output after it.
    pub fn new(checkpoint: &Checkpoint, limit: u64) -> io::Result<SpanInflater> {
        let mut zlib = RawInflate::new(-15)?;
        if !checkpoint.window.is_empty() {
            zlib.set_dictionary(&checkpoint.window)?;
        }
        Ok(SpanInflater {
            zlib,
            out: Vec::new(),
            out_from: 0,
            limit,
            bits: checkpoint.bits,
            consumed: 0,
        })
    }

    /// Inflates `input`, the span's next compressed bytes (from the checkpoint's first byte on,
    /// or from [`SpanInflater::position`] when continued), until it is used up or the limit is
    /// reached.
    pub fn feed(&mut self, mut input: &[u8]) -> io::Result<()> {
        if self.bits > 0
            && let Some((&first, rest)) = input.split_first()
        {
            self.zlib.prime(self.bits, first >> (8 - self.bits))?;
            self.bits = 0;
            self.consumed += 1;
            input = rest;
        }
        while self.produced() < self.limit {
            let filled = self.out.len();
            let room = (self.limit - self.produced()).min(256 << 10) as usize;
            self.out.resize(filled + room, 0);
            let (consumed, produced, ret) =
                self.zlib
                    .inflate(input, &mut self.out[filled..], libz_rs_sys::Z_NO_FLUSH);
            self.out.truncate(filled + produced);
            self.consumed += consumed as u64;
            input = &input[consumed..];
            match ret {
                libz_rs_sys::Z_OK | libz_rs_sys::Z_BUF_ERROR if produced > 0 || consumed > 0 => {}
                libz_rs_sys::Z_OK | libz_rs_sys::Z_BUF_ERROR | libz_rs_sys::Z_STREAM_END => break,
                ret => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("corrupt deflate data (zlib {ret})"),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Span output offset up to which output has been inflated.
    pub fn produced(&self) -> u64 {
        self.out_from + self.out.len() as u64
    }

    /// `(compressed, output)`: how many compressed bytes (from the checkpoint's first byte) it
    /// has consumed and how much output that gave. Continuing needs the bytes from there on.
    pub fn position(&self) -> (u64, u64) {
        (self.consumed, self.produced())
    }

    /// The `size` bytes at span output offset `skip`, if inflated and still held.
    pub fn get(&self, skip: u64, size: u64) -> Option<&[u8]> {
        let from = skip.checked_sub(self.out_from)? as usize;
        self.out.get(from..from + size as usize)
    }

    /// Drops the output held so far (keeping its position) and sets where inflating stops.
    pub fn continue_to(&mut self, limit: u64) {
        self.out_from = self.produced();
        self.out = Vec::new();
        self.limit = limit;
    }
}

/// Inflates `len` bytes of output starting at `checkpoint`, from `compressed` (the blob from the
/// checkpoint's first byte on).
pub fn inflate_from(checkpoint: &Checkpoint, compressed: &[u8], len: usize) -> io::Result<Vec<u8>> {
    let mut span = SpanInflater::new(checkpoint, len as u64)?;
    span.feed(compressed)?;
    let mut out = span.out;
    if out.len() < len {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("span gives {} bytes, {len} wanted", out.len()),
        ));
    }
    out.truncate(len);
    Ok(out)
}
