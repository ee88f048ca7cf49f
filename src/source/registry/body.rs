//! Response bodies: small whole bodies read under a size cap, and range bodies trimmed to
//! exactly the bytes asked for.
//!
//! A range body is handed out piece by piece as it arrives (a reader's first byte must not wait
//! for the whole range); one that ends early is an error, never a short read; one from a server
//! that ignored `Range` is skipped forward to the range.

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
