//! Sizes as users type them (`512M`, `2G`, `65536`; binary units), read and written back, so that
//! a library default held in bytes shows in `--help` the way a user would type it.

/// Parses sizes such as `512M`, `2G`, `65536` (binary units).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (digits, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{s:?} is not a size such as 512M or 2G"))?;
    let shift = match unit
        .trim_end_matches(['B', 'b', 'i'])
        .to_ascii_uppercase()
        .as_str()
    {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        _ => return Err(format!("{s:?}: unknown unit (use K, M, G or T)")),
    };
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("{s:?} is too large"))
}

/// `bytes` as [`parse_size`] reads it back, in the largest unit that divides it (`512M`), so that
/// a default written as a number of bytes in the library shows in `--help` as a user types it.
pub fn size_text(bytes: u64) -> String {
    ["T", "G", "M", "K"]
        .iter()
        .zip([40, 30, 20, 10])
        .find(|&(_, shift)| bytes != 0 && bytes.is_multiple_of(1 << shift))
        .map_or(bytes.to_string(), |(unit, shift)| {
            format!("{}{unit}", bytes >> shift)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_and_print_back() {
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size(" 2GiB "), Ok(2 << 30));
        assert_eq!(parse_size("65536"), Ok(65536));
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("M").is_err());
        assert!(parse_size("99999999999T").is_err(), "overflow is refused");
        for bytes in [
            0,
            1,
            1000,
            512 << 10,
            512 << 20,
            10 << 30,
            3 << 40,
            (1 << 20) + 1,
        ] {
            assert_eq!(parse_size(&size_text(bytes)), Ok(bytes), "{bytes}");
        }
        assert_eq!(size_text(512 << 20), "512M");
        assert_eq!(size_text(1000), "1000");
    }
}
