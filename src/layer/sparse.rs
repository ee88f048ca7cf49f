//! GNU sparse files in PAX archives: the entry `GNUSparseFile.NNN/name` is the file `name`, with
//! holes where it stores no data.
//!
//! GNU tar (`--sparse`, the default with `--format=posix`) and Go's `archive/tar` write a sparse
//! file as an ordinary regular-file entry under an internal name, with PAX records that give its
//! real name (`GNU.sparse.name`) and size, and a map of the regions that hold data. Format 1.0
//! puts the map in front of the data, as decimal numbers one per line (count, then offset and
//! length per region) padded to a 512-byte block; format 0.1 puts it in the `GNU.sparse.map`
//! record. The stored data is the regions' bytes back to back; everything else reads as zeros.
//! containerd's applier (Go's `archive/tar`) expands them, so the reference tree has `name` with
//! its holes; a reader that ignores the records shows the internal name and the map as content.
//!
//! Here the map is checked (regions in order, not overlapping, inside the file, covering exactly
//! the stored bytes) and turned into chunks: the regions' bytes at their offsets in the tar stream,
//! and the holes as runs of zeros, which cost no storage and no fetch. Bounds, against a hostile
//! header: at most [`MAX_REGIONS`] regions and a real size of at most [`MAX_REAL_SIZE`], so a
//! file costs at most a few hundred thousand chunk records (holes are cut into
//! [`HOLE_CHUNK_BYTES`] runs). Format 0.0 (repeated offset/numbytes records) is older than
//! anything in registries and is refused, as is the pre-POSIX GNU `S` header.

use std::io::{self, Read};

/// Regions one sparse file may have.
pub const MAX_REGIONS: usize = 1 << 20;
/// Largest real size of a sparse file: 4 TiB (sparse `lastlog` files of a few hundred GB are
/// the large ones images really carry).
pub const MAX_REAL_SIZE: u64 = 4 << 40;
/// Holes are served as runs of zeros of at most this size (a chunk's bound, and few records
/// even for a file of terabytes).
pub const HOLE_CHUNK_BYTES: u64 = 16 << 20;

/// A stretch of the file that holds data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Region {
    pub offset: u64,
    pub len: u64,
}

/// The sparse records of one entry's PAX header, as they are collected.
#[derive(Default)]
pub struct SparseRecords {
    major: Option<Vec<u8>>,
    minor: Option<Vec<u8>>,
    name: Option<Vec<u8>>,
    real_size: Option<Vec<u8>>,
    map: Option<Vec<u8>>,
    old_style: bool,
}

/// What an entry's sparse records say.
#[derive(Debug, PartialEq, Eq)]
pub struct Sparse {
    pub name: Vec<u8>,
    pub real_size: u64,
    /// Format 0.1: the map from the record. Format 1.0 (`None`): the map precedes the data.
    pub map: Option<Vec<Region>>,
}

impl SparseRecords {
    /// Takes the record if it is a sparse one; returns whether it was.
    pub fn take(&mut self, key: &[u8], value: &[u8]) -> bool {
        let slot = match key {
            b"GNU.sparse.major" => &mut self.major,
            b"GNU.sparse.minor" => &mut self.minor,
            b"GNU.sparse.name" => &mut self.name,
            // 1.0 says realsize, 0.x size.
            b"GNU.sparse.realsize" | b"GNU.sparse.size" => &mut self.real_size,
            b"GNU.sparse.map" => &mut self.map,
            b"GNU.sparse.offset" | b"GNU.sparse.numbytes" | b"GNU.sparse.numblocks" => {
                self.old_style |= key != b"GNU.sparse.numblocks";
                return true;
            }
            _ => return false,
        };
        *slot = Some(value.to_vec());
        true
    }

    /// The sparse file these records describe, `None` if they describe none.
    pub fn finish(self) -> Result<Option<Sparse>, String> {
        if self.real_size.is_none() && self.map.is_none() && self.major.is_none() {
            return match self.old_style {
                true => Err("GNU sparse format 0.0 is not supported".into()),
                false => Ok(None),
            };
        }
        let text = |v: &Option<Vec<u8>>| {
            v.as_deref()
                .map(|v| String::from_utf8_lossy(v).trim().to_string())
        };
        let version = (text(&self.major), text(&self.minor));
        let name = self.name.ok_or("sparse file without GNU.sparse.name")?;
        let real_size = number(
            self.real_size
                .as_deref()
                .ok_or("sparse file without its real size")?,
        )?;
        if real_size > MAX_REAL_SIZE {
            return Err(format!(
                "sparse file of {real_size} bytes (at most {MAX_REAL_SIZE} are accepted)"
            ));
        }
        let map = match (version.0.as_deref(), version.1.as_deref()) {
            (Some("1"), Some("0")) => None,
            (None | Some("0"), _) => {
                let map = self.map.ok_or("sparse format 0.1 without GNU.sparse.map")?;
                Some(parse_numbers(&map, b',')?)
            }
            (major, minor) => {
                return Err(format!(
                    "GNU sparse format {}.{} is not supported",
                    major.unwrap_or("?"),
                    minor.unwrap_or("?")
                ));
            }
        };
        Ok(Some(Sparse {
            name,
            real_size,
            map,
        }))
    }
}

fn number(text: &[u8]) -> Result<u64, String> {
    std::str::from_utf8(text)
        .ok()
        .and_then(|t| t.trim().parse().ok())
        .ok_or_else(|| {
            format!(
                "sparse map: `{}` is not a number",
                String::from_utf8_lossy(&text[..text.len().min(40)])
            )
        })
}

/// Offset/length pairs from `text` separated by `sep`.
fn parse_numbers(text: &[u8], sep: u8) -> Result<Vec<Region>, String> {
    let numbers = text
        .split(|&b| b == sep)
        .filter(|n| !n.is_empty())
        .map(number)
        .collect::<Result<Vec<u64>, String>>()?;
    if numbers.len() % 2 != 0 {
        return Err("sparse map has an offset without a length".into());
    }
    if numbers.len() / 2 > MAX_REGIONS {
        return Err(format!("sparse map of more than {MAX_REGIONS} regions"));
    }
    Ok(numbers
        .chunks(2)
        .map(|p| Region {
            offset: p[0],
            len: p[1],
        })
        .collect())
}

/// Reads a format 1.0 map from the front of the entry's data (`stored` bytes in all). Returns the
/// regions and the bytes the map took, padding included. A malformed map is an
/// [`io::ErrorKind::InvalidData`] error; other errors are the reader's.
pub fn read_map(reader: &mut impl Read, stored: u64) -> io::Result<(Vec<Region>, u64)> {
    let bad = |reason: String| io::Error::new(io::ErrorKind::InvalidData, reason);
    let mut text = Vec::new();
    let mut block = [0u8; 512];
    // Lines read so far, counted per block (recounting all the text for each block would be
    // quadratic in the map's size); lines wanted: the count, then two per region, known once
    // the count is read.
    let mut lines = 0;
    let mut wanted: Option<usize> = None;
    loop {
        if let Some(wanted) = wanted
            && lines >= wanted
        {
            break;
        }
        if lines >= 1 && wanted.is_none() {
            let first = text.split(|&b| b == b'\n').next().unwrap_or_default();
            let count = number(first).map_err(bad)?;
            if count > MAX_REGIONS as u64 {
                return Err(bad(format!(
                    "sparse map of {count} regions (at most {MAX_REGIONS})"
                )));
            }
            wanted = Some(1 + 2 * count as usize);
            continue;
        }
        // A u64 is at most 20 digits: longer lines are not a map (and must not grow memory).
        if text.len() > 21 * wanted.unwrap_or(1) + 512 {
            return Err(bad("sparse map is longer than its numbers allow".into()));
        }
        if text.len() as u64 + 512 > stored {
            return Err(bad("sparse map runs past the entry's data".into()));
        }
        reader.read_exact(&mut block)?;
        text.extend_from_slice(&block);
        lines += block.iter().filter(|&&b| b == b'\n').count();
    }
    let used = text.len() as u64;
    let mut lines = text.split(|&b| b == b'\n');
    lines.next();
    let pairs: Vec<u8> = lines
        .take(wanted.unwrap_or(1) - 1)
        .flat_map(|l| l.iter().copied().chain([b'\n']))
        .collect();
    let regions = parse_numbers(&pairs, b'\n').map_err(bad)?;
    Ok((regions, used))
}

/// Checks that `regions` lie in order inside a file of `real_size` bytes without overlapping, and
/// hold exactly the `data` bytes stored.
pub fn check(regions: &[Region], real_size: u64, data: u64) -> Result<(), String> {
    let mut end = 0u64;
    let mut total = 0u64;
    for r in regions {
        let r_end = r.offset.checked_add(r.len).ok_or("sparse map overflows")?;
        if r.offset < end {
            return Err(format!(
                "sparse map regions overlap or are out of order at offset {}",
                r.offset
            ));
        }
        if r_end > real_size {
            return Err(format!(
                "sparse map region {}..{r_end} lies beyond the file's {real_size} bytes",
                r.offset
            ));
        }
        end = r_end;
        total += r.len;
    }
    if total != data {
        return Err(format!(
            "sparse map covers {total} bytes but the entry stores {data}"
        ));
    }
    Ok(())
}

/// Zero runs of at most [`HOLE_CHUNK_BYTES`] covering `start..end` of the file.
pub fn holes(start: u64, end: u64) -> impl Iterator<Item = Region> {
    (start..end)
        .step_by(HOLE_CHUNK_BYTES as usize)
        .map(move |offset| Region {
            offset,
            len: (end - offset).min(HOLE_CHUNK_BYTES),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_format_1_0_map_is_read_with_its_padding() {
        let mut data = b"2\n0\n5\n4096\n3\n".to_vec();
        data.resize(512, 0);
        data.extend_from_slice(b"helloabc");
        let mut reader = &data[..];
        let (regions, used) = read_map(&mut reader, data.len() as u64).unwrap();
        assert_eq!(
            regions,
            [
                Region { offset: 0, len: 5 },
                Region {
                    offset: 4096,
                    len: 3
                }
            ]
        );
        assert_eq!(used, 512);
        assert_eq!(reader, b"helloabc");
        check(&regions, 8192, 8).unwrap();
        assert!(check(&regions, 4098, 8).unwrap_err().contains("beyond"));
        assert!(check(&regions, 8192, 9).unwrap_err().contains("covers"));
    }

    #[test]
    fn hostile_maps_are_refused() {
        let refuse = |text: &[u8], stored: u64| {
            let mut data = text.to_vec();
            data.resize(data.len().div_ceil(512).max(1) * 512, 0);
            read_map(&mut &data[..], stored).unwrap_err().to_string()
        };
        assert!(refuse(b"99999999999\n", 512).contains("regions"));
        assert!(refuse(b"x\n", 512).contains("not a number"));
        // A count that promises more lines than the entry holds.
        assert!(refuse(b"3\n0\n1\n", 512).contains("past the entry"));
        let overlapping = [Region { offset: 0, len: 10 }, Region { offset: 5, len: 1 }];
        assert!(
            check(&overlapping, 100, 11)
                .unwrap_err()
                .contains("overlap")
        );
        let mut records = SparseRecords::default();
        for (k, v) in [
            ("GNU.sparse.major", "1"),
            ("GNU.sparse.minor", "0"),
            ("GNU.sparse.name", "f"),
            ("GNU.sparse.realsize", "999999999999999999"),
        ] {
            assert!(records.take(k.as_bytes(), v.as_bytes()));
        }
        assert!(records.finish().unwrap_err().contains("at most"));
        let mut old = SparseRecords::default();
        old.take(b"GNU.sparse.offset", b"0");
        assert!(old.finish().unwrap_err().contains("0.0"));
    }

    #[test]
    fn holes_are_cut_into_bounded_runs() {
        let runs: Vec<Region> = holes(10, 10 + 2 * HOLE_CHUNK_BYTES + 1).collect();
        assert_eq!(runs.len(), 3);
        assert_eq!(runs[2].len, 1);
        assert_eq!(holes(5, 5).count(), 0);
    }
}
