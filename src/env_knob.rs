//! Diagnostic knobs read from the environment (`MULTIQ_*`, for comparing variants on a
//! device): a variable that is set but not understood is an error naming it, never quietly
//! taken for the default.

use crate::error::{Error, Result};

/// The value of `name`, if set, parsed by `parse` (which sees it trimmed); `expected` says
/// what it takes, for the error.
pub(crate) fn read<T>(
    name: &str,
    expected: &str,
    parse: impl Fn(&str) -> Option<T>,
) -> Result<Option<T>> {
    match std::env::var(name) {
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(v)) => Err(bad(name, &v.to_string_lossy(), expected)),
        Ok(v) => parse_value(name, &v, expected, parse).map(Some),
    }
}

/// `value` of variable `name` parsed by `parse`, or the error for it.
fn parse_value<T>(
    name: &str,
    value: &str,
    expected: &str,
    parse: impl Fn(&str) -> Option<T>,
) -> Result<T> {
    parse(value.trim()).ok_or_else(|| bad(name, value, expected))
}

fn bad(name: &str, value: &str, expected: &str) -> Error {
    Error::invalid(format!("{name}={value}: expected {expected}"))
}

/// An on/off switch: 1, on, true or 0, off, false.
pub(crate) const SWITCH: &str = "1, on or true; 0, off or false";

/// Parses a switch ([`SWITCH`]).
pub(crate) fn switch(v: &str) -> Option<bool> {
    match v.to_ascii_lowercase().as_str() {
        "1" | "on" | "true" => Some(true),
        "0" | "off" | "false" => Some(false),
        _ => None,
    }
}

/// Whether a pool sends its small ops to its device queue whenever the queue's kernel is on
/// the device and another stream of the pool has an op in flight, whatever the load
/// (`MULTIQ_QUEUE_WHILE_RUNNING`, default off; `runtime::device_queue`). Read here so the
/// backend can record it with the queue's other settings.
pub(crate) fn queue_while_running() -> Result<bool> {
    Ok(read("MULTIQ_QUEUE_WHILE_RUNNING", SWITCH, switch)?.unwrap_or(false))
}

/// Parses a whole number in `range`.
pub(crate) fn number_in(range: std::ops::RangeInclusive<u64>) -> impl Fn(&str) -> Option<u64> {
    move |v| v.parse::<u64>().ok().filter(|n| range.contains(n))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_value_not_understood_is_an_error_naming_the_variable() {
        let tiles = |v| parse_value("MULTIQ_X", v, "1..=1024", number_in(1..=1024));
        assert_eq!(tiles(" 4 ").unwrap(), 4);
        for v in ["abc", "0", "1025", "", "-1", "2.5"] {
            let e = tiles(v).unwrap_err().to_string();
            assert!(
                e.contains(&format!("MULTIQ_X={v}: expected 1..=1024")),
                "{e}"
            );
            assert!(crate::Error::invalid("").is_usage());
        }
        let on = |v| parse_value("MULTIQ_Y", v, SWITCH, switch);
        for (v, want) in [
            ("1", true),
            ("ON", true),
            ("true", true),
            ("0", false),
            ("off", false),
        ] {
            assert_eq!(on(v).unwrap(), want, "{v}");
        }
        assert!(on("yes").unwrap_err().to_string().contains("MULTIQ_Y=yes"));
    }
}
