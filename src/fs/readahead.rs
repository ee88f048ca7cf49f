//! Sequential-read detection for read-ahead, per file.
//!
//! A read that starts where the previous read of the same file ended extends that file's
//! streak; the window fetched ahead of it starts at [`MIN_READ_AHEAD`], doubles with each
//! read of the streak up to [`MAX_READ_AHEAD`], and collapses to nothing on a seek, as
//! mountpoint-s3's prefetcher does. The first read of a file, at offset 0, is no streak yet:
//! read-ahead starts with the second read that continues it. The table is
//! bounded by clearing it when it grows past [`MAX_STREAKS`] files: losing the streaks costs one
//! window of read-ahead each, never a wrong read.

use std::collections::HashMap;
use std::sync::Mutex;

use super::tree::Ino;

/// First read-ahead window of a sequential streak, and the largest one.
pub const MIN_READ_AHEAD: u64 = 1 << 20;
pub const MAX_READ_AHEAD: u64 = 16 << 20;
/// Files tracked for streaks before the table is reset (bounds its memory).
pub const MAX_STREAKS: usize = 4096;

#[derive(Clone, Copy, Debug)]
struct Streak {
    /// Where a sequential reader's next read would start.
    next: u64,
    window: u64,
}

/// The streaks of one image's files.
#[derive(Default)]
pub struct ReadAhead {
    streaks: Mutex<HashMap<Ino, Streak>>,
}

impl ReadAhead {
    /// Records a read of `len` bytes at `offset` of `ino`; returns how far to read ahead of it
    /// (0: not sequential).
    pub fn window(&self, ino: Ino, offset: u64, len: u64) -> u64 {
        let mut streaks = self.streaks.lock().unwrap();
        if streaks.len() > MAX_STREAKS {
            streaks.clear();
        }
        let streak = streaks.entry(ino).or_insert(Streak { next: 0, window: 0 });
        streak.window = if offset > 0 && offset == streak.next {
            (streak.window * 2).clamp(MIN_READ_AHEAD, MAX_READ_AHEAD)
        } else {
            0
        };
        streak.next = offset.saturating_add(len);
        streak.window
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KIB128: u64 = 128 << 10;

    #[test]
    fn the_window_doubles_along_a_streak_up_to_its_cap() {
        let ahead = ReadAhead::default();
        assert_eq!(ahead.window(1, 0, KIB128), 0, "a first read is no streak");
        let windows: Vec<u64> = (1..8)
            .map(|i| ahead.window(1, i * KIB128, KIB128))
            .collect();
        let mib = 1 << 20;
        assert_eq!(
            windows,
            [mib, 2 * mib, 4 * mib, 8 * mib, 16 * mib, 16 * mib, 16 * mib]
        );
        assert_eq!(MAX_READ_AHEAD, 16 * mib);
    }

    #[test]
    fn a_seek_collapses_the_streak_and_files_are_apart() {
        let ahead = ReadAhead::default();
        ahead.window(1, 0, 100);
        assert_eq!(ahead.window(1, 100, 100), MIN_READ_AHEAD);
        // Another file's reads neither extend nor break this one's streak.
        assert_eq!(ahead.window(2, 200, 100), 0);
        assert_eq!(ahead.window(1, 200, 100), 2 * MIN_READ_AHEAD);
        // A seek (backwards or forwards) ends it; reading on from there starts a new one.
        assert_eq!(ahead.window(1, 50, 10), 0);
        assert_eq!(ahead.window(1, 60, 10), MIN_READ_AHEAD);
        assert_eq!(ahead.window(1, 1000, 10), 0);
    }

    #[test]
    fn the_table_is_bounded() {
        let ahead = ReadAhead::default();
        for ino in 0..=MAX_STREAKS as u64 + 1 {
            ahead.window(ino, 0, 10);
        }
        assert!(ahead.streaks.lock().unwrap().len() <= MAX_STREAKS + 1);
        // A streak lost to the reset only starts over.
        assert_eq!(ahead.window(0, 10, 10), 0);
        assert_eq!(ahead.window(0, 20, 10), MIN_READ_AHEAD);
    }
}
