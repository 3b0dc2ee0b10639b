//! Human units on the command line and in tables: sizes with K/M/G suffixes (powers of two).

/// Parses `8`, `4K`, `1M`, `2G` (binary multiples; an optional trailing `B` or `iB` is accepted).
pub fn parse_size(text: &str) -> Result<usize, String> {
    let t = text.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (digits, shift) = match t.chars().last() {
        Some('k' | 'K') => (&t[..t.len() - 1], 10),
        Some('m' | 'M') => (&t[..t.len() - 1], 20),
        Some('g' | 'G') => (&t[..t.len() - 1], 30),
        _ => (t, 0),
    };
    let n: usize = digits.parse().map_err(|_| {
        format!("invalid size {text:?}: expected a number with an optional K, M or G suffix")
    })?;
    n.checked_mul(1usize << shift)
        .ok_or_else(|| format!("size {text:?} is too large"))
}

/// Parses a comma-separated list of sizes.
pub fn parse_size_list(text: &str) -> Result<Vec<usize>, String> {
    let sizes = text
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(parse_size)
        .collect::<Result<Vec<_>, _>>()?;
    if sizes.is_empty() {
        return Err("empty size list".into());
    }
    Ok(sizes)
}

/// Formats a byte count compactly: `8 B`, `4 KiB`, `1.5 MiB`.
pub fn format_size(n: usize) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if v.fract() == 0.0 {
        format!("{v} {}", UNITS[u])
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_suffixes() {
        assert_eq!(parse_size("8").unwrap(), 8);
        assert_eq!(parse_size("4K").unwrap(), 4096);
        assert_eq!(parse_size("1MiB").unwrap(), 1 << 20);
        assert_eq!(parse_size("2g").unwrap(), 2 << 30);
        assert!(parse_size("x").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("99999999999999999999G").is_err());
        assert_eq!(parse_size_list("8,1K, 1M").unwrap(), vec![8, 1024, 1 << 20]);
        assert!(parse_size_list(",").is_err());
    }

    #[test]
    fn sizes_format_compactly() {
        assert_eq!(format_size(8), "8 B");
        assert_eq!(format_size(4096), "4 KiB");
        assert_eq!(format_size(3 << 19), "1.5 MiB");
    }
}
