//! Plain-text tables and verdict lines for the study's output.

use std::fmt::Write as _;

use super::results::RunRow;
use super::verdict;

/// Formats a number with thousands separators (`1234567.8` → `1,234,568`).
pub fn thousands(x: f64) -> String {
    if !x.is_finite() {
        return format!("{x}");
    }
    let s = format!("{:.0}", x.abs());
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if x < 0.0 && s != "0" {
        out.insert(0, '-');
    }
    out
}

/// A scaling table of rows of one configuration (sorted by threads), then its verdict.
pub fn scaling_table(title: &str, rows: &[&RunRow]) -> String {
    let mut rows: Vec<&RunRow> = rows.to_vec();
    rows.sort_by_key(|r| r.threads);
    let mut s = String::new();
    let _ = writeln!(s, "{title}");
    let _ = writeln!(
        s,
        "  {:>7} {:>8} {:>9} {:>12} {:>8} {:>10} {:>9} {:>9}  verified",
        "threads", "ops", "seconds", "ops/s", "speedup", "efficiency", "p50 us", "p99 us"
    );
    let base_threads = rows.first().map_or(1, |r| r.threads) as f64;
    for r in &rows {
        let eff = r.speedup / (r.threads as f64 / base_threads);
        let check = if r.verified {
            format!("ok ({} elements)", r.verified_elements)
        } else {
            "MISMATCH".to_string()
        };
        let _ = writeln!(
            s,
            "  {:>7} {:>8} {:>9.3} {:>12} {:>7.2}x {:>9.0}% {:>9.1} {:>9.1}  {check}",
            r.threads,
            r.ops,
            r.seconds,
            thousands(r.ops_per_sec),
            r.speedup,
            100.0 * eff,
            r.latency_us.p50,
            r.latency_us.p99
        );
    }
    let points: Vec<(usize, f64)> = rows.iter().map(|r| (r.threads, r.ops_per_sec)).collect();
    if let (Some(v), Some(last)) = (verdict::judge(&points), rows.last()) {
        let _ = writeln!(s, "  verdict: {}", v.sentence(last.threads, last.speedup));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::thousands;

    #[test]
    fn thousands_groups_digits() {
        assert_eq!(thousands(0.4), "0");
        assert_eq!(thousands(999.0), "999");
        assert_eq!(thousands(1000.0), "1,000");
        assert_eq!(thousands(1234567.8), "1,234,568");
        assert_eq!(thousands(-1234.0), "-1,234");
    }
}
