//! Read planning: which chunks one request carries. Pure functions over a layer's chunk list,
//! so that the policy can be tested without a source, a cache or a runtime.
//!
//! Six decisions live here:
//! - [`amplification`]: a read that must fetch also takes the missing chunks that follow it back
//!   to back in the blob, within a byte budget (start-up reads many small neighbouring files).
//! - [`fill_gaps`]: a prefetch of chunks that sit close together but not back to back also takes
//!   what lies in small gaps between them, so the stretch is one request.
//! - [`merged_runs`]: the chunks one read or prefetch needs, grouped into runs that one request
//!   can fetch, each at most [`MAX_MERGED_SPAN`] compressed bytes: back to back, or across holes
//!   when the source asks for several ranges in one request ([`run_ranges`]).
//! - [`spans_of`]: background filling's work cut into pieces of a few compressed bytes each, so
//!   that each piece is one small request a reader soon overtakes.
//! - [`prioritised_spans`]: a prefetch of files in the order they are needed (a landmark's, a
//!   profile's) planned as a whole: per layer in blob order with small gaps filled, cut into
//!   spans, the spans sent in the order of the first file each carries. Planning the whole list
//!   at once is what makes the requests few: a profile's files are scattered through a layer in
//!   tar order, and planned a few files at a time they cost one small request each.
//! - [`need_ordered_spans`]: the same prefetch for a source that carries several ranges in one
//!   request: each request gathers what is needed close together in time rather than in the
//!   blob, so what is needed first also arrives first.
//!
//! Only compressed chunks are planned: a streamed layer's chunks come from re-reading the stream
//! and zero runs are never fetched.

use crate::layer::{ChunkRef, ChunkSource};

/// Compressed bytes one merged request may span: large enough to cover a few chunks of a big
/// read, small enough that a failed request wastes little.
pub const MAX_MERGED_SPAN: u64 = 8 << 20;

/// Ranges one request carries at most when the source joins them: distribution answers any
/// number, but other servers cap the ranges of a request (nginx's `max_ranges`) or the length
/// of a header (8 KiB is common; 64 ranges of a large blob take about 1.5 KiB).
pub const MAX_JOINED_RANGES: usize = 64;

/// Blob bytes between two chunks across which read amplification goes on (the chunks after the
/// gap then go in a request of their own). Files of a layer that the merged tree does not show
/// (replaced by an upper layer) leave such gaps, and so do the tar headers after the last file
/// of a gzip seek index span. Requests themselves carry no gap bytes: merging across gaps of up
/// to 32 KiB saved one profile prefetch 30 requests of 104 but fetched 0.6 MB more (python-app,
/// published profile), for no faster start; a source that joins ranges leaves the gaps out of
/// one request instead.
pub const AMPLIFY_GAP: u64 = 32 << 10;

/// Where a chunk sits in its blob, for sorting neighbours together: a gzip seek index span's
/// chunks share its start and follow one another in its output.
pub fn blob_order(c: &ChunkRef) -> (u64, u64) {
    match c.source {
        ChunkSource::Compressed {
            start,
            inner_offset,
            ..
        } => (start, inner_offset),
        ChunkSource::TarStream { offset } => (offset, 0),
        ChunkSource::Zeros => (0, 0),
    }
}

/// Where a compressed chunk starts in its blob (0 for others, which are never amplified).
pub fn compressed_start(c: &ChunkRef) -> u64 {
    match c.source {
        ChunkSource::Compressed { start, .. } => start,
        _ => 0,
    }
}

/// `chunks` (sorted in blob order) plus every chunk of `list` (the layer's compressed chunks,
/// in blob order) lying between two of them that are at most `max_gap` compressed bytes apart.
/// A small gap costs less to carry along than the round trip it saves.
pub fn fill_gaps(list: &[ChunkRef], chunks: &[ChunkRef], max_gap: u64) -> Vec<ChunkRef> {
    let mut out: Vec<ChunkRef> = Vec::with_capacity(chunks.len());
    for c in chunks {
        if let (Some(prev), ChunkSource::Compressed { start, .. }) = (out.last(), &c.source)
            && let ChunkSource::Compressed { end: prev_end, .. } = prev.source
            && prev_end < *start
            && start - prev_end <= max_gap
        {
            let from = list.partition_point(|n| compressed_start(n) < prev_end);
            let to = list.partition_point(|n| compressed_start(n) < *start);
            out.extend(list[from..to].iter().cloned());
        }
        out.push(c.clone());
    }
    out
}

/// The chunks of `list` (a layer's compressed chunks, in blob order) to fetch along with a read
/// whose last chunk is `last` and whose first missing chunk starts at `first_start`: those whose
/// bytes the request carries anyway (files earlier in `last`'s gzip seek index span from output
/// `resumes_at` on, where the request starts inflating: had for free), and those that follow
/// while the request stays within `budget` compressed bytes (0: none), back to back or further
/// into the same span. Stops at the first chunk `held` says is already held.
pub fn amplification(
    list: &[ChunkRef],
    first_start: u64,
    last: &ChunkRef,
    budget: u64,
    resumes_at: u64,
    held: impl Fn(&ChunkRef) -> bool,
) -> Vec<ChunkRef> {
    let ChunkSource::Compressed { start, end, .. } = &last.source else {
        return Vec::new();
    };
    let from = list.partition_point(|c| compressed_start(c) < *start);
    let mut out = Vec::new();
    let mut reach = *end;
    for c in &list[from..] {
        let ChunkSource::Compressed {
            start: c_start,
            end: c_end,
            inner_offset,
            ..
        } = c.source
        else {
            break;
        };
        let same_span = c_start == *start;
        if same_span && inner_offset < resumes_at && c != last {
            continue;
        }
        let free = same_span && c_end <= *end;
        if !free && (budget == 0 || c_start > reach + AMPLIFY_GAP || c_end - first_start > budget) {
            break;
        }
        if held(c) || c == last {
            if same_span {
                continue;
            }
            break;
        }
        reach = reach.max(c_end);
        out.push(c.clone());
    }
    out
}

/// `chunks` (compressed, in blob order) cut into consecutive pieces that each span at most
/// `max_span` compressed bytes; a chunk larger than that is a piece of its own. Chunks sharing
/// a compressed span (a gzip seek index span) stay in one piece unless the span alone is larger.
pub fn spans_of(chunks: &[ChunkRef], max_span: u64) -> Vec<Vec<ChunkRef>> {
    let mut pieces: Vec<Vec<ChunkRef>> = Vec::new();
    let mut piece_start = 0;
    for c in chunks {
        let (start, end) = match c.source {
            ChunkSource::Compressed { start, end, .. } => (start, end),
            _ => continue,
        };
        let fits = pieces.last().is_some_and(|p| {
            !p.is_empty() && start >= piece_start && end - piece_start <= max_span
        });
        if !fits {
            pieces.push(Vec::new());
            piece_start = start;
        }
        pieces.last_mut().expect("pushed above").push(c.clone());
    }
    pieces
}

/// `wanted` (chunks of files, per layer, in the order they are needed) planned as requests:
/// each layer's chunks in blob order, deduplicated, with every chunk of `lists[layer]` (the
/// layer's compressed chunks in blob order) lying in a gap of at most `max_gap` bytes filled in,
/// cut into spans of at most `max_span` bytes ([`spans_of`]). The spans of all layers come in
/// the order of the earliest entry of `wanted` each carries, so what is needed first is asked
/// for first.
pub fn prioritised_spans(
    lists: &[Vec<ChunkRef>],
    wanted: &[(usize, Vec<ChunkRef>)],
    max_gap: u64,
    max_span: u64,
) -> Vec<(usize, Vec<ChunkRef>)> {
    let key = |c: &ChunkRef| match c.source {
        ChunkSource::Compressed {
            start,
            inner_offset,
            ..
        } => Some((start, inner_offset)),
        _ => None,
    };
    // Per layer: each wanted chunk's blob position and the rank of the first file needing it.
    let mut per_layer: std::collections::BTreeMap<usize, std::collections::BTreeMap<_, _>> =
        Default::default();
    for (rank, (layer, chunks)) in wanted.iter().enumerate() {
        let ranks = per_layer.entry(*layer).or_default();
        for c in chunks {
            if let Some(k) = key(c) {
                ranks.entry(k).or_insert((rank, c.clone()));
            }
        }
    }
    let mut spans: Vec<(usize, usize, Vec<ChunkRef>)> = Vec::new();
    for (layer, ranks) in per_layer {
        let sorted: Vec<ChunkRef> = ranks.values().map(|(_, c)| c.clone()).collect();
        let list = lists.get(layer).map_or(&[][..], Vec::as_slice);
        for span in spans_of(&fill_gaps(list, &sorted, max_gap), max_span) {
            let rank = span
                .iter()
                .filter_map(|c| ranks.get(&key(c)?).map(|(rank, _)| *rank))
                .min()
                .unwrap_or(usize::MAX);
            spans.push((rank, layer, span));
        }
    }
    // Stable: spans of one rank stay in blob order.
    spans.sort_by_key(|(rank, _, _)| *rank);
    spans
        .into_iter()
        .map(|(_, layer, span)| (layer, span))
        .collect()
}

/// `wanted` (chunks of files, per layer, in the order they are needed) planned as requests for
/// a source that carries several ranges in one request: the chunks are taken in the order they
/// are needed, and one request gathers a layer's chunks needed within `window` compressed bytes
/// of its first one in that order, at most `max_span` bytes; its ranges go in blob order, with
/// gaps of up to `max_gap` filled. Requests come in the order of the first chunk each carries.
///
/// [`prioritised_spans`] cuts each layer in blob order instead, and a profile's files lie
/// scattered through their layers in tar order: nearly every blob-order span holds one of the
/// first files needed, so the spans' order says little, and the first files arrive only when
/// most of the prefetch has.
pub fn need_ordered_spans(
    lists: &[Vec<ChunkRef>],
    wanted: &[(usize, Vec<ChunkRef>)],
    max_gap: u64,
    window: u64,
    max_span: u64,
) -> Vec<(usize, Vec<ChunkRef>)> {
    /// A layer's span still taking chunks: its index, where in the need order it began, bytes.
    struct Open {
        span: usize,
        opened_at: u64,
        bytes: u64,
    }
    let mut seen = std::collections::HashSet::new();
    // The span each compressed frame went to: chunks of one gzip seek index span share its
    // bytes, and a later chunk of it goes where the frame is fetched anyway.
    let mut frames: std::collections::HashMap<(usize, u64), usize> = Default::default();
    let mut open: std::collections::BTreeMap<usize, Open> = Default::default();
    let mut spans: Vec<(usize, Vec<ChunkRef>)> = Vec::new();
    // Compressed bytes wanted so far, in the order they are needed.
    let mut at = 0u64;
    for (layer, chunks) in wanted {
        for c in chunks {
            let ChunkSource::Compressed {
                start,
                end,
                inner_offset,
                ..
            } = c.source
            else {
                continue;
            };
            if !seen.insert((*layer, start, inner_offset)) {
                continue;
            }
            if let Some(&span) = frames.get(&(*layer, start)) {
                spans[span].1.push(c.clone());
                continue;
            }
            let size = end - start;
            open.retain(|l, o| {
                at - o.opened_at < window && (l != layer || o.bytes + size <= max_span)
            });
            let o = open.entry(*layer).or_insert_with(|| {
                spans.push((*layer, Vec::new()));
                Open {
                    span: spans.len() - 1,
                    opened_at: at,
                    bytes: 0,
                }
            });
            o.bytes += size;
            spans[o.span].1.push(c.clone());
            frames.insert((*layer, start), o.span);
            at += size;
        }
    }
    spans
        .into_iter()
        .map(|(layer, mut chunks)| {
            chunks.sort_by_key(blob_order);
            let list = lists.get(layer).map_or(&[][..], Vec::as_slice);
            (layer, fill_gaps(list, &chunks, max_gap))
        })
        .collect()
}

/// `wanted` (in blob order) cut into runs of compressed chunks that `needs_fetch` and that lie
/// back to back or overlap in the blob (chunks of one gzip-index span share it), each carrying
/// at most [`MAX_MERGED_SPAN`] bytes. With `joined` (the source carries several ranges in one request,
/// [`crate::source::ImageSource::joins_ranges`]) a run also goes on across holes (chunks held,
/// in flight, or not wanted), in at most [`MAX_JOINED_RANGES`] ranges: the holes cost a part
/// header each instead of a request. Only runs of two or more chunks are returned: a lone chunk
/// is fetched on its own.
pub fn merged_runs(
    wanted: &[&ChunkRef],
    needs_fetch: impl Fn(&ChunkRef) -> bool,
    joined: bool,
) -> Vec<Vec<ChunkRef>> {
    let mut runs: Vec<Vec<ChunkRef>> = Vec::new();
    let mut run: Vec<ChunkRef> = Vec::new();
    // The furthest blob byte the current run needs, how many ranges it has and the bytes they
    // carry.
    let mut run_reach = 0u64;
    let mut ranges = 0usize;
    let mut run_bytes = 0u64;
    for &c in wanted {
        let span = match c.source {
            ChunkSource::Compressed { start, end, .. } if needs_fetch(c) => Some((start, end)),
            _ => None,
        };
        let Some((start, end)) = span else {
            if !joined {
                runs.push(std::mem::take(&mut run));
            }
            continue;
        };
        let hole = start > run_reach;
        let adds = end.saturating_sub(start.max(run_reach));
        let extends = run.first().is_some_and(|first| {
            compressed_start(first) <= start
                && (!hole || (joined && ranges < MAX_JOINED_RANGES))
                && run_bytes + adds <= MAX_MERGED_SPAN
        });
        if !extends {
            runs.push(std::mem::take(&mut run));
            run_reach = 0;
            ranges = 1;
            run_bytes = end - start;
        } else {
            ranges += usize::from(hole);
            run_bytes += adds;
        }
        run_reach = run_reach.max(end);
        run.push(c.clone());
    }
    runs.push(run);
    runs.retain(|r| r.len() > 1);
    runs
}

/// The blob ranges a run of chunks ([`merged_runs`], in blob order) needs, from `from` (where
/// its first chunk's bytes start, or where inflating resumes): back-to-back and overlapping
/// chunks in one range.
pub fn run_ranges(run: &[ChunkRef], from: u64) -> Vec<std::ops::Range<u64>> {
    let mut ranges: Vec<std::ops::Range<u64>> = Vec::new();
    for c in run {
        let ChunkSource::Compressed { start, end, .. } = c.source else {
            continue;
        };
        match ranges.last_mut() {
            Some(last) if start <= last.end => last.end = last.end.max(end),
            Some(_) => ranges.push(start..end),
            None => ranges.push(from.max(start).min(end)..end),
        }
    }
    ranges
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layer::Codec;

    fn chunk(start: u64, end: u64, inner: u64) -> ChunkRef {
        ChunkRef {
            file_offset: start + inner,
            size: 1,
            source: ChunkSource::Compressed {
                start,
                end,
                inner_offset: inner,
                codec: Codec::Gzip,
            },
            digest: None,
        }
    }

    /// A layer of ten back-to-back chunks of 10 compressed bytes each.
    fn layer() -> Vec<ChunkRef> {
        (0..10).map(|i| chunk(i * 10, i * 10 + 10, 0)).collect()
    }

    fn starts(chunks: &[ChunkRef]) -> Vec<u64> {
        chunks.iter().map(compressed_start).collect()
    }

    /// Planned requests as their layers and their chunks' blob starts.
    fn shown(planned: &[(usize, Vec<ChunkRef>)]) -> Vec<(usize, Vec<u64>)> {
        planned
            .iter()
            .map(|(layer, span)| (*layer, starts(span)))
            .collect()
    }

    #[test]
    fn prioritised_files_become_few_spans_in_the_order_they_are_needed() {
        let lists = vec![layer(), layer()];
        // Needed first: layer 1's chunk at 80; then, scattered through layer 0 in tar order,
        // chunks at 50, 0, 20 (10-byte gaps); then layer 0's chunk at 90, far from the rest.
        let wanted = vec![
            (1, vec![chunk(80, 90, 0)]),
            (0, vec![chunk(50, 60, 0)]),
            (0, vec![chunk(0, 10, 0), chunk(20, 30, 0)]),
            (0, vec![chunk(90, 100, 0), chunk(20, 30, 0)]),
        ];
        // Layer 0's 0..60 is filled in (gaps of 10 and 20 bytes) and cut at 40 bytes; the span
        // carrying the file needed second (at 50) goes before the one carrying later files.
        assert_eq!(
            shown(&prioritised_spans(&lists, &wanted, 20, 40)),
            [
                (1, vec![80]),
                (0, vec![40, 50]),
                (0, vec![0, 10, 20, 30]),
                (0, vec![90]),
            ]
        );
        // Without gap filling the spans carry the wanted chunks only, still in need order.
        let unfilled = prioritised_spans(&lists, &wanted, 0, 40);
        let shown: Vec<Vec<u64>> = unfilled.iter().map(|(_, span)| starts(span)).collect();
        assert_eq!(shown, [vec![80], vec![50], vec![0, 20], vec![90]]);
    }

    #[test]
    fn joined_requests_gather_chunks_needed_close_together_in_time() {
        let lists = vec![layer(), layer()];
        // In the order needed: layer 0's 90 and 0 (the binary and its library), layer 1's 30,
        // then layer 0's 50 and 10 and layer 1's 0, and last layer 0's 20 with 90 again.
        let wanted = vec![
            (0, vec![chunk(90, 100, 0)]),
            (0, vec![chunk(0, 10, 0)]),
            (1, vec![chunk(30, 40, 0)]),
            (0, vec![chunk(50, 60, 0), chunk(10, 20, 0)]),
            (1, vec![chunk(0, 10, 0)]),
            (0, vec![chunk(20, 30, 0), chunk(90, 100, 0)]),
        ];
        // A window of 20 bytes: a request holds what is needed within 20 bytes of its first
        // chunk, its ranges in blob order; requests go in the order of their first need.
        assert_eq!(
            shown(&need_ordered_spans(&lists, &wanted, 0, 20, 100)),
            [
                (0, vec![0, 90]),
                (1, vec![30]),
                (0, vec![10, 50]),
                (1, vec![0]),
                (0, vec![20]),
            ]
        );
        // A span is also cut at `max_span` bytes, and small gaps are filled.
        assert_eq!(
            shown(&need_ordered_spans(&lists, &wanted, 0, 1000, 20)),
            [
                (0, vec![0, 90]),
                (1, vec![0, 30]),
                (0, vec![10, 50]),
                (0, vec![20])
            ]
        );
        assert_eq!(
            shown(&need_ordered_spans(&lists, &wanted, 30, 20, 100))[2],
            (0, vec![10, 20, 30, 40, 50])
        );
        // Chunks of one compressed frame (a gzip seek index span) go in one request, however
        // far apart in time they are needed: the frame is fetched once.
        let frame = |inner| chunk(0, 50, inner);
        let wanted = vec![
            (0, vec![frame(0)]),
            (0, vec![chunk(60, 70, 0)]),
            (0, vec![chunk(80, 90, 0)]),
            (0, vec![frame(5)]),
        ];
        let planned = need_ordered_spans(&[], &wanted, 0, 10, 100);
        let inner: Vec<Vec<u64>> = planned
            .iter()
            .map(|(_, span)| span.iter().map(|c| c.file_offset).collect())
            .collect();
        assert_eq!(inner, [vec![0, 5], vec![60], vec![80]]);
    }

    #[test]
    fn small_gaps_between_prefetched_chunks_are_filled() {
        let list = layer();
        // Two wanted chunks 20 bytes apart, then a far one.
        let wanted = [chunk(0, 10, 0), chunk(30, 40, 0), chunk(90, 100, 0)];
        assert_eq!(starts(&fill_gaps(&list, &wanted, 25)), [0, 10, 20, 30, 90]);
        assert_eq!(fill_gaps(&list, &wanted, 0).len(), 3);
        assert_eq!(fill_gaps(&[], &wanted, 1000).len(), 3);
    }

    #[test]
    fn amplification_follows_the_blob_within_its_budget() {
        let list = layer();
        let none_held = |_: &ChunkRef| false;
        // Request from 0: chunks ending at 20 and 30 fit a 35-byte budget, the next does not.
        let extra = amplification(&list, 0, &list[0], 35, 0, none_held);
        assert_eq!(starts(&extra), [10, 20]);
        // The budget counts from the first missing chunk, not from the last one.
        assert_eq!(
            starts(&amplification(&list, 0, &list[2], 35, 0, none_held)),
            [] as [u64; 0]
        );
        // A held chunk ends the stretch: it would split the request anyway.
        let held_20 = |c: &ChunkRef| compressed_start(c) == 20;
        assert_eq!(
            starts(&amplification(&list, 0, &list[0], 1000, 0, held_20)),
            [10]
        );
        assert!(amplification(&list, 0, &list[0], 0, 0, none_held).is_empty());
    }

    #[test]
    fn amplification_goes_on_across_small_gaps_only() {
        // Chunks at 0 and 10, one AMPLIFY_GAP after that, then one a byte further than that.
        let near = 20 + AMPLIFY_GAP;
        let list = vec![
            chunk(0, 10, 0),
            chunk(10, 20, 0),
            chunk(near, near + 10, 0),
            chunk(near + 11 + AMPLIFY_GAP, near + 21 + AMPLIFY_GAP, 0),
        ];
        let extra = amplification(&list, 0, &list[0], 4 * AMPLIFY_GAP, 0, |_| false);
        assert_eq!(starts(&extra), [10, near]);
    }

    #[test]
    fn chunks_of_the_same_span_come_along_even_without_a_budget() {
        // A gzip seek index span 0..10 holding three files, then the next span.
        let list = vec![
            chunk(0, 10, 0),
            chunk(0, 10, 5),
            chunk(0, 10, 9),
            chunk(10, 20, 0),
        ];
        let extra = amplification(&list, 0, &list[0], 0, 0, |_| false);
        assert_eq!(extra, [list[1].clone(), list[2].clone()]);
        // A held file of the span is skipped, not a stop.
        let extra = amplification(&list, 0, &list[0], 0, 0, |c| *c == list[1]);
        assert_eq!(extra, [list[2].clone()]);
        // With marks, a file's bytes end before its span's: the files before it in the span
        // come free, those after it only within the budget.
        let list = vec![
            chunk(0, 4, 0),
            chunk(0, 7, 5),
            chunk(0, 10, 9),
            chunk(10, 20, 0),
        ];
        let extra = amplification(&list, 0, &list[1], 0, 0, |_| false);
        assert_eq!(extra, [list[0].clone()]);
        let extra = amplification(&list, 0, &list[1], 12, 0, |_| false);
        assert_eq!(extra, [list[0].clone(), list[2].clone()]);
        // Resumed at output 5 (where an earlier request stopped), the request does not carry
        // the span's first file.
        let extra = amplification(&list, 0, &list[1], 12, 5, |_| false);
        assert_eq!(extra, [list[2].clone()]);
    }

    #[test]
    fn background_work_is_cut_into_small_spans() {
        let list = layer();
        let pieces: Vec<Vec<u64>> = spans_of(&list, 35).iter().map(|p| starts(p)).collect();
        assert_eq!(
            pieces,
            [
                vec![0, 10, 20],
                vec![30, 40, 50],
                vec![60, 70, 80],
                vec![90]
            ]
        );
        // A chunk larger than the limit is a piece by itself; chunks of one span stay together.
        let big = [chunk(0, 100, 0), chunk(100, 110, 0), chunk(100, 110, 5)];
        let pieces: Vec<usize> = spans_of(&big, 35).iter().map(Vec::len).collect();
        assert_eq!(pieces, [1, 2]);
        assert!(spans_of(&[], 35).is_empty());
    }

    #[test]
    fn runs_break_at_gaps_held_chunks_and_the_span_limit() {
        let list = layer();
        let wanted: Vec<&ChunkRef> = [0, 1, 3, 4, 5].iter().map(|&i| &list[i]).collect();
        let runs = merged_runs(&wanted, |_| true, false);
        let runs: Vec<Vec<u64>> = runs.iter().map(|r| starts(r)).collect();
        assert_eq!(runs, [vec![0, 10], vec![30, 40, 50]]);
        // Chunk 1 is held: chunk 0 is left alone and fetched by itself.
        let runs = merged_runs(&wanted, |c| compressed_start(c) != 10, false);
        assert_eq!(runs.len(), 1);
        assert_eq!(starts(&runs[0]), [30, 40, 50]);
        // Two chunks that together exceed the span limit are two requests.
        let (a, b) = (
            chunk(0, MAX_MERGED_SPAN / 2 + 1, 0),
            chunk(MAX_MERGED_SPAN / 2 + 1, MAX_MERGED_SPAN + 2, 0),
        );
        assert!(merged_runs(&[&a, &b], |_| true, false).is_empty());
        assert!(merged_runs(&[&a, &b], |_| true, true).is_empty());
        // Chunks sharing one span overlap and make one run.
        let (x, y) = (chunk(0, 10, 0), chunk(0, 10, 5));
        assert_eq!(merged_runs(&[&x, &y], |_| true, false).len(), 1);
    }

    #[test]
    fn joined_runs_go_across_holes_in_a_bounded_number_of_ranges() {
        let list = layer();
        let wanted: Vec<&ChunkRef> = [0, 1, 3, 4, 5, 8].iter().map(|&i| &list[i]).collect();
        // One run over the gap at 20 and the held chunk at 40: three ranges in one request.
        let runs = merged_runs(&wanted, |c| compressed_start(c) != 40, true);
        assert_eq!(runs.len(), 1);
        assert_eq!(starts(&runs[0]), [0, 10, 30, 50, 80]);
        assert_eq!(run_ranges(&runs[0], 0), [0..20, 30..40, 50..60, 80..90]);
        // Inflating resumes inside the first chunk's span: the first range starts there.
        assert_eq!(run_ranges(&runs[0], 4)[0], 4..20);
        // Chunks of one span (a gzip index span) are one range.
        let (x, y) = (chunk(0, 10, 0), chunk(0, 10, 5));
        assert_eq!(run_ranges(&[x, y], 0), vec![0..10u64]);
        // No more ranges than MAX_JOINED_RANGES in one run: then a new run begins.
        let spaced: Vec<ChunkRef> = (0..MAX_JOINED_RANGES as u64 + 5)
            .map(|i| chunk(i * 20, i * 20 + 10, 0))
            .collect();
        let refs: Vec<&ChunkRef> = spaced.iter().collect();
        let runs = merged_runs(&refs, |_| true, true);
        let lens: Vec<usize> = runs.iter().map(Vec::len).collect();
        assert_eq!(lens, [MAX_JOINED_RANGES, 5]);
        // Without joining, every hole ends a run: all of these are lone chunks.
        assert!(merged_runs(&refs, |_| true, false).is_empty());
    }
}
