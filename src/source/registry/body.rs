//! Response bodies: small whole bodies read under a size cap, and range bodies trimmed to
//! exactly the bytes asked for.
//!
//! A range body is handed out piece by piece as it arrives (a reader's first byte must not wait
//! for the whole range); one that ends early is an error, never a short read; one from a server
//! that ignored `Range` is skipped forward to the range.
//!
//! The answer to a request for several ranges at once (`multipart/byteranges`, RFC 9110 14.6) is
//! turned into the concatenation of exactly the ranges asked for, again piece by piece as it
//! arrives ([`Multipart`]). Each part's length comes from its own `Content-Range`, never from a
//! search for the boundary, so part bodies are never scanned; a part that does not hold the next
//! range asked for, one that ends early, or a missing part is an error, never a short or shifted
//! read. A server may merge neighbouring ranges into one part (RFC 9110 allows it): the bytes
//! between them are dropped.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use futures_util::{Stream, StreamExt};
use url::Url;

use super::error::{RegistryError, describe_reqwest, shown};

/// Parses `Content-Range: bytes START-END/TOTAL` into (START, END, TOTAL); TOTAL may be `*`.
pub(super) fn parse_content_range(v: &str) -> Option<(u64, u64, Option<u64>)> {
    let rest = v.trim().strip_prefix("bytes ")?;
    let (range, total) = rest.split_once('/')?;
    let (a, b) = range.split_once('-')?;
    let (a, b) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
    let total = match total.trim() {
        "*" => None,
        t => Some(t.parse().ok()?),
    };
    (a <= b).then_some((a, b, total))
}

/// Reads a whole body of at most `limit` bytes.
pub(super) async fn read_capped(
    resp: reqwest::Response,
    url: &Url,
    what: &'static str,
    name: &str,
    limit: u64,
) -> Result<Bytes, RegistryError> {
    let too_large = |size| RegistryError::TooLarge {
        what,
        digest: name.to_string(),
        url: shown(url),
        size,
        limit,
    };
    if let Some(len) = resp.content_length()
        && len > limit
    {
        return Err(too_large(len));
    }
    let mut out = BytesMut::new();
    let mut stream = resp.bytes_stream();
    while let Some(piece) = stream.next().await {
        let piece = piece.map_err(|e| RegistryError::Transport {
            url: shown(url),
            reason: describe_reqwest(&e),
        })?;
        if (out.len() + piece.len()) as u64 > limit {
            return Err(too_large((out.len() + piece.len()) as u64));
        }
        out.extend_from_slice(&piece);
    }
    Ok(out.freeze())
}

/// The body of a range response, trimmed to exactly the requested bytes.
pub(super) struct RangeBody {
    pub(super) inner: Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>,
    pub(super) url: String,
    /// Bytes still to drop before the range starts (only when the server ignored `Range`).
    pub(super) skip: u64,
    pub(super) remaining: u64,
    pub(super) expected: u64,
}

impl Stream for RangeBody {
    type Item = Result<Bytes, RegistryError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            if self.remaining == 0 {
                return Poll::Ready(None);
            }
            match self.inner.as_mut().poll_next(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => {
                    let (expected, got) = (self.expected, self.expected - self.remaining);
                    self.remaining = 0;
                    return Poll::Ready(Some(Err(RegistryError::Truncated {
                        url: self.url.clone(),
                        expected,
                        got,
                    })));
                }
                Poll::Ready(Some(Err(e))) => {
                    self.remaining = 0;
                    return Poll::Ready(Some(Err(RegistryError::Transport {
                        url: self.url.clone(),
                        reason: describe_reqwest(&e),
                    })));
                }
                Poll::Ready(Some(Ok(mut piece))) => {
                    if self.skip > 0 {
                        let drop = self.skip.min(piece.len() as u64);
                        self.skip -= drop;
                        piece = piece.slice(drop as usize..);
                    }
                    if piece.is_empty() {
                        continue;
                    }
                    let take = self.remaining.min(piece.len() as u64);
                    self.remaining -= take;
                    return Poll::Ready(Some(Ok(piece.slice(..take as usize))));
                }
            }
        }
    }
}

/// The largest part header accepted (a boundary line and `Content-Type` / `Content-Range`
/// take about 150 bytes): a server that sends more is not sending byte ranges.
const MAX_PART_HEADER: usize = 8 << 10;

/// Turns a `multipart/byteranges` body, fed as it arrives, into the bytes of the ranges asked
/// for, in order. Pure, so that every way a body can be cut or damaged is tested without a
/// server.
pub(super) struct Multipart {
    /// `--` and the boundary, which opens each part (and, followed by `--`, closes the body).
    delimiter: Vec<u8>,
    /// The ranges asked for whose bytes are still to come, in blob order.
    wanted: std::collections::VecDeque<std::ops::Range<u64>>,
    /// Bytes between parts not yet parsed (the boundary line and a part's headers).
    pending: BytesMut,
    /// Inside a part: the blob offset of its next byte and the end of the part.
    part: Option<(u64, u64)>,
    /// The closing delimiter was seen.
    closed: bool,
}

impl Multipart {
    /// For the body of a response whose `Content-Type` is `content_type`; `None` when that is
    /// not `multipart/byteranges` with a boundary.
    pub(super) fn new(content_type: &str, wanted: &[std::ops::Range<u64>]) -> Option<Multipart> {
        let (kind, params) = content_type.split_once(';')?;
        if !kind.trim().eq_ignore_ascii_case("multipart/byteranges") {
            return None;
        }
        let boundary = params.split(';').find_map(|p| {
            let (k, v) = p.split_once('=')?;
            k.trim()
                .eq_ignore_ascii_case("boundary")
                .then(|| v.trim().trim_matches('"').to_string())
        })?;
        if boundary.is_empty() {
            return None;
        }
        Some(Multipart {
            delimiter: [b"--", boundary.as_bytes()].concat(),
            wanted: wanted.iter().cloned().collect(),
            pending: BytesMut::new(),
            part: None,
            closed: false,
        })
    }

    /// For a single-part answer (`206` with one `Content-Range`, `first..=last`) to a request
    /// for several ranges: a server may merge them all into one. `None` unless it covers them.
    pub(super) fn covering(first: u64, last: u64, wanted: &[std::ops::Range<u64>]) -> Option<Self> {
        let (start, end) = (wanted.first()?.start, wanted.last()?.end);
        (first <= start && end <= last + 1).then(|| Multipart {
            delimiter: Vec::new(),
            wanted: wanted.iter().cloned().collect(),
            pending: BytesMut::new(),
            part: Some((first, last + 1)),
            closed: true,
        })
    }

    /// Whether every range asked for has been handed out.
    pub(super) fn complete(&self) -> bool {
        self.wanted.is_empty()
    }

    /// Takes the next piece of the body; returns the bytes of ranges asked for that it carried.
    pub(super) fn feed(&mut self, mut piece: Bytes, out: &mut Vec<Bytes>) -> Result<(), String> {
        while !piece.is_empty() && !self.wanted.is_empty() {
            if let Some((at, end)) = self.part {
                let take = (end - at).min(piece.len() as u64);
                let body = piece.split_to(take as usize);
                self.hand_out(at, body, out);
                let at = at + take;
                self.part = (at < end).then_some((at, end));
                if self.part.is_none() && self.wanted.front().is_some_and(|w| w.start < end) {
                    let w = self.wanted.front().expect("checked");
                    return Err(format!(
                        "its part ending at byte {} left out bytes {}-{} that were asked for",
                        end - 1,
                        w.start.max(end),
                        w.end - 1
                    ));
                }
                continue;
            }
            if self.closed {
                return Err("it goes on after its closing boundary".into());
            }
            self.pending.extend_from_slice(&piece);
            piece = Bytes::new();
            self.parse_header()?;
            // A header parsed: what followed it is body, handed back to the loop.
            if self.part.is_some() && !self.pending.is_empty() {
                piece = self.pending.split().freeze();
            }
        }
        Ok(())
    }

    /// Hands out what `body` (blob bytes from `at` on) holds of the ranges asked for.
    fn hand_out(&mut self, at: u64, body: Bytes, out: &mut Vec<Bytes>) {
        let end = at + body.len() as u64;
        while let Some(w) = self.wanted.front_mut() {
            if w.start >= end {
                break;
            }
            let from = w.start.max(at);
            let to = w.end.min(end);
            if from < to {
                out.push(body.slice((from - at) as usize..(to - at) as usize));
            }
            w.start = to;
            if w.is_empty() {
                self.wanted.pop_front();
            } else {
                break;
            }
        }
    }

    /// Parses the boundary line and headers of the next part from `pending`, if all there.
    fn parse_header(&mut self) -> Result<(), String> {
        let Some(at) = find(&self.pending, &self.delimiter) else {
            return self.check_pending_size();
        };
        let after = at + self.delimiter.len();
        if self.pending.len() < after + 2 {
            return self.check_pending_size();
        }
        if &self.pending[after..after + 2] == b"--" {
            self.closed = true;
            self.pending.clear();
            return match self.wanted.front() {
                Some(w) => Err(format!("it closed before bytes {}-{}", w.start, w.end - 1)),
                None => Ok(()),
            };
        }
        let Some(head_end) = find(&self.pending[after..], b"\r\n\r\n") else {
            return self.check_pending_size();
        };
        let headers = std::str::from_utf8(&self.pending[after..after + head_end])
            .map_err(|_| "a part's headers are not text".to_string())?;
        let range = headers
            .lines()
            .filter_map(|l| l.split_once(':'))
            .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-range"))
            .map(|(_, v)| v.to_string())
            .ok_or_else(|| "a part has no Content-Range".to_string())?;
        let (first, last, _) = parse_content_range(&range)
            .ok_or_else(|| format!("a part has Content-Range `{}`", range.trim()))?;
        let next = self
            .wanted
            .front()
            .expect("only parsed while ranges are wanted");
        // Parts come in the order asked for; one may start early or hold several ranges.
        if first > next.start || last < next.start {
            return Err(format!(
                "a part holds bytes {first}-{last} where bytes {}-{} were next",
                next.start,
                next.end - 1
            ));
        }
        let _ = self.pending.split_to(after + head_end + 4);
        self.part = Some((first, last + 1));
        Ok(())
    }

    fn check_pending_size(&self) -> Result<(), String> {
        if self.pending.len() > MAX_PART_HEADER {
            return Err(format!(
                "no part header within {MAX_PART_HEADER} bytes (is it multipart/byteranges?)"
            ));
        }
        Ok(())
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The most bytes read past the last range asked for (the closing boundary, about 70 bytes),
/// so that the connection can carry the next request instead of being dropped mid-body.
const MAX_TAIL: usize = 4 << 10;

/// A `multipart/byteranges` response body as the bytes of the ranges asked for ([`Multipart`]).
pub(super) struct MultipartBody {
    inner: Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>,
    url: String,
    parts: Multipart,
    /// Bytes asked for in all, and handed out so far.
    expected: u64,
    handed: u64,
    ready: std::collections::VecDeque<Bytes>,
    failed: bool,
    /// Bytes read after the last range, and whether the body's end was seen.
    tail: usize,
    ended: bool,
}

impl MultipartBody {
    pub(super) fn new(
        inner: Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>,
        url: String,
        parts: Multipart,
    ) -> Self {
        let expected = parts.wanted.iter().map(|r| r.end - r.start).sum();
        MultipartBody {
            inner,
            url,
            parts,
            expected,
            handed: 0,
            ready: Default::default(),
            failed: false,
            tail: 0,
            ended: false,
        }
    }
}

impl Stream for MultipartBody {
    type Item = Result<Bytes, RegistryError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            // All ranges are in: read the closing boundary if it is already here, never wait.
            if self.parts.complete() && !self.ended && !self.failed {
                match self.inner.as_mut().poll_next(cx) {
                    Poll::Ready(Some(Ok(p))) if self.tail + p.len() <= MAX_TAIL => {
                        self.tail += p.len();
                        continue;
                    }
                    Poll::Pending => {}
                    _ => self.ended = true,
                }
            }
            if let Some(piece) = self.ready.pop_front() {
                self.handed += piece.len() as u64;
                return Poll::Ready(Some(Ok(piece)));
            }
            if self.failed || self.parts.complete() {
                return Poll::Ready(None);
            }
            match self.inner.as_mut().poll_next(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => {
                    self.failed = true;
                    return Poll::Ready(Some(Err(RegistryError::Truncated {
                        url: self.url.clone(),
                        expected: self.expected,
                        got: self.handed,
                    })));
                }
                Poll::Ready(Some(Err(e))) => {
                    self.failed = true;
                    return Poll::Ready(Some(Err(RegistryError::Transport {
                        url: self.url.clone(),
                        reason: describe_reqwest(&e),
                    })));
                }
                Poll::Ready(Some(Ok(piece))) => {
                    let mut out = Vec::new();
                    let fed = self.parts.feed(piece, &mut out);
                    self.ready.extend(out);
                    if let Err(reason) = fed {
                        self.failed = true;
                        let url = self.url.clone();
                        self.ready.clear();
                        return Poll::Ready(Some(Err(RegistryError::BadRange {
                            url,
                            reason: format!(
                                "the multipart/byteranges answer is malformed: {reason}"
                            ),
                        })));
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_range_parsing() {
        assert_eq!(
            parse_content_range("bytes 0-9/100"),
            Some((0, 9, Some(100)))
        );
        assert_eq!(parse_content_range("bytes 5-5/*"), Some((5, 5, None)));
        assert_eq!(parse_content_range("bytes 0-9/x"), None);
        assert_eq!(parse_content_range("bytes 9-0/100"), None);
        assert_eq!(parse_content_range("bytes */100"), None);
        assert_eq!(parse_content_range("items 0-9/100"), None);
        assert_eq!(parse_content_range(""), None);
    }

    fn blob() -> Vec<u8> {
        (0..200u32).map(|i| (i * 7 % 251) as u8).collect()
    }

    /// A multipart/byteranges body as distribution (Go's `http.ServeContent`) writes it, with
    /// one part per range of `parts` (inclusive ends, as in `Content-Range`).
    fn multipart(parts: &[(u64, u64)]) -> Vec<u8> {
        multipart_of(&blob(), parts)
    }

    fn multipart_of(blob: &[u8], parts: &[(u64, u64)]) -> Vec<u8> {
        let mut out = Vec::new();
        for (first, last) in parts {
            out.extend_from_slice(b"--XyZ\r\nContent-Type: application/octet-stream\r\n");
            out.extend_from_slice(
                format!("Content-Range: bytes {first}-{last}/200\r\n\r\n").as_bytes(),
            );
            out.extend_from_slice(&blob[*first as usize..=*last as usize]);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"--XyZ--\r\n");
        out
    }

    /// Feeds `body` to a parser for `wanted` in pieces of `step` bytes.
    fn parse(body: &[u8], wanted: &[std::ops::Range<u64>], step: usize) -> Result<Vec<u8>, String> {
        let mut parts = Multipart::new("multipart/byteranges; boundary=XyZ", wanted).unwrap();
        let mut out = Vec::new();
        for piece in body.chunks(step) {
            parts.feed(Bytes::copy_from_slice(piece), &mut out)?;
        }
        if !parts.complete() {
            return Err("incomplete".into());
        }
        Ok(out.concat())
    }

    fn expected(wanted: &[std::ops::Range<u64>]) -> Vec<u8> {
        let blob = blob();
        wanted
            .iter()
            .flat_map(|r| blob[r.start as usize..r.end as usize].to_vec())
            .collect()
    }

    #[test]
    fn a_multipart_answer_gives_exactly_the_ranges_however_it_is_cut() {
        let wanted = [3..10, 40..41, 100..150];
        let body = multipart(&[(3, 9), (40, 40), (100, 149)]);
        for step in [1, 2, 7, 64, body.len()] {
            assert_eq!(
                parse(&body, &wanted, step).unwrap(),
                expected(&wanted),
                "step {step}"
            );
        }
        // A part's body may hold the boundary: lengths come from Content-Range, not a search.
        let mut tricky = blob();
        tricky[3..10].copy_from_slice(b"--XyZ--");
        let body = multipart_of(&tricky, &[(3, 9), (40, 40), (100, 149)]);
        let mut parts = Multipart::new("multipart/byteranges; boundary=XyZ", &wanted).unwrap();
        let mut out = Vec::new();
        parts.feed(Bytes::from(body), &mut out).unwrap();
        assert!(parts.complete());
        assert_eq!(&out.concat()[..7], b"--XyZ--");
        // A server may merge neighbouring ranges into one part; the bytes between are dropped.
        let body = multipart(&[(3, 41), (100, 149)]);
        assert_eq!(parse(&body, &wanted, 5).unwrap(), expected(&wanted));
        // ... or all of them into one range (a single-part 206).
        let mut one = Multipart::covering(0, 199, &wanted).unwrap();
        let mut out = Vec::new();
        one.feed(Bytes::from(blob()), &mut out).unwrap();
        assert!(one.complete());
        assert_eq!(out.concat(), expected(&wanted));
        assert!(Multipart::covering(5, 199, &wanted).is_none());
        assert!(Multipart::covering(0, 148, &wanted).is_none());
    }

    #[test]
    fn a_multipart_answer_without_the_ranges_asked_for_is_an_error() {
        let wanted = [3..10, 40..41, 100..150];
        // A part missing (the second), one shifted, a short part, an early close.
        for (parts, says) in [
            (vec![(3, 9), (100, 149)], "where bytes 40-40 were next"),
            (
                vec![(3, 9), (41, 41), (100, 149)],
                "where bytes 40-40 were next",
            ),
            (
                vec![(3, 9), (40, 40), (100, 148)],
                "closed before bytes 149-149",
            ),
            (vec![(3, 9)], "closed before bytes 40-40"),
        ] {
            let err = parse(&multipart(&parts), &wanted, 3).unwrap_err();
            assert!(err.contains(says), "{parts:?}: {err}");
        }
        let no_range = b"--XyZ\r\nContent-Type: text/plain\r\n\r\nhello\r\n--XyZ--\r\n";
        assert!(
            parse(no_range, &wanted, 4)
                .unwrap_err()
                .contains("no Content-Range")
        );
        // A body that is not multipart at all (a whole blob) is refused within a bound.
        let junk = vec![b'x'; MAX_PART_HEADER + 10];
        assert!(
            parse(&junk, &wanted, 1000)
                .unwrap_err()
                .contains("no part header")
        );
        // What follows the closing boundary is not taken for data.
        let mut body = multipart(&[(3, 9), (40, 40), (100, 149)]);
        body.extend_from_slice(b"--XyZ\r\nContent-Range: bytes 0-1/200\r\n\r\nab");
        assert_eq!(parse(&body, &wanted, 9).unwrap(), expected(&wanted));
        // Only multipart/byteranges with a boundary is parsed as such.
        for kind in [
            "application/octet-stream",
            "multipart/byteranges",
            "multipart/mixed; boundary=a",
        ] {
            assert!(Multipart::new(kind, &wanted).is_none(), "{kind}");
        }
        assert!(
            Multipart::new("Multipart/ByteRanges; charset=x; boundary=\"a b\"", &wanted).is_some()
        );
    }

    #[tokio::test]
    async fn a_multipart_body_cut_short_is_truncated_not_short() {
        let wanted = [3..10, 100..150];
        let mut body = multipart(&[(3, 9), (100, 149)]);
        body.truncate(body.len() - 30);
        let pieces: Vec<reqwest::Result<Bytes>> = vec![Ok(Bytes::from(body))];
        let parts = Multipart::new("multipart/byteranges; boundary=XyZ", &wanted).unwrap();
        let stream = MultipartBody::new(
            Box::pin(futures_util::stream::iter(pieces)),
            "u".into(),
            parts,
        );
        let got: Vec<_> = stream.collect().await;
        let last = got.last().unwrap();
        assert!(
            matches!(last, Err(RegistryError::Truncated { expected: 57, .. })),
            "{got:?}"
        );
        let handed: usize = got
            .iter()
            .filter_map(|r| r.as_ref().ok())
            .map(Bytes::len)
            .sum();
        assert!(handed < 57);
    }

    #[tokio::test]
    async fn range_body_skips_trims_and_reports_truncation() {
        let pieces: Vec<reqwest::Result<Bytes>> = vec![
            Ok(Bytes::from_static(b"0123")),
            Ok(Bytes::from_static(b"456789")),
        ];
        let body = RangeBody {
            inner: Box::pin(futures_util::stream::iter(pieces)),
            url: "u".into(),
            skip: 3,
            remaining: 5,
            expected: 5,
        };
        let got: Vec<_> = body.collect().await;
        let bytes: Vec<u8> = got.into_iter().flat_map(|r| r.unwrap().to_vec()).collect();
        assert_eq!(bytes, b"34567");

        let short: Vec<reqwest::Result<Bytes>> = vec![Ok(Bytes::from_static(b"01"))];
        let body = RangeBody {
            inner: Box::pin(futures_util::stream::iter(short)),
            url: "u".into(),
            skip: 0,
            remaining: 4,
            expected: 4,
        };
        let got: Vec<_> = body.collect().await;
        assert_eq!(got.len(), 2);
        assert!(matches!(
            got[1],
            Err(RegistryError::Truncated {
                expected: 4,
                got: 2,
                ..
            })
        ));
    }
}
