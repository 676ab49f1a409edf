//! Exact money: turning floats into decimals without inventing digits, and the one
//! rounding rule.
//!
//! Samples arrive as `f64` (the Prometheus exposition format has no other number),
//! but credits are `Decimal`. A float is converted through its *shortest round-trip
//! text*, the digits a person would have written: `0.1_f64` becomes exactly `0.1`,
//! not `0.1000000000000000055511151231257827`. No arithmetic is ever done in `f64`.
//!
//! Amounts stay exact while they are computed and summed; [`round_credits`] is
//! applied only where a total is shown or stored as a rounded figure, so billing a
//! usage in one step or in a thousand gives the same result. Rounding is half-to-even
//! (banker's rounding), as Python's `Decimal.quantize` does under the default context
//! the old service used.

use rust_decimal::prelude::*;

/// The exact decimal a float stands for, from its shortest round-trip text.
///
/// `None` for NaN, infinities, and values a `Decimal` cannot hold exactly: beyond
/// about 7.9e28, or needing more than 28 decimal places (e.g. `1e-29`, `5e-324`).
/// `-0.0` becomes zero.
pub fn decimal_from_f64(v: f64) -> Option<Decimal> {
    if !v.is_finite() {
        return None;
    }
    // `{:e}` is Rust's shortest round-trip form with an explicit exponent
    // (`1e21`, `1e-7`, `1.5e0`), which `from_scientific` parses exactly and rejects
    // when the scale exceeds 28 or the value overflows.
    let value = Decimal::from_scientific(&format!("{v:e}")).ok()?;
    Some(if value.is_zero() {
        Decimal::ZERO
    } else {
        value.normalize()
    })
}

/// Rounds credits to the quantum's number of decimal places (`0.01` → 2), half to
/// even, keeping trailing zeros so `1` shows as `1.00`.
pub fn round_credits(value: Decimal, quantum: Decimal) -> Decimal {
    let scale = quantum.scale();
    let mut rounded = value.round_dp_with_strategy(scale, RoundingStrategy::MidpointNearestEven);
    // Pads with zeros only: after rounding to `scale` places nothing is lost.
    rounded.rescale(scale);
    rounded
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    fn dec(s: &str) -> Decimal {
        Decimal::from_str(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn floats_convert_through_their_shortest_text() {
        let cases: &[(&str, f64, Option<&str>)] = &[
            ("one tenth is exactly 0.1", 0.1, Some("0.1")),
            (
                "0.1 + 0.2 keeps the float's own digits",
                0.1 + 0.2,
                Some("0.30000000000000004"),
            ),
            ("a large power of ten", 1e21, Some("1000000000000000000000")),
            ("a small power of ten", 1e-7, Some("0.0000001")),
            ("negative zero is zero", -0.0, Some("0")),
            ("an integer", 42.0, Some("42")),
            ("a negative value", -2.5, Some("-2.5")),
            (
                "a large counter",
                1_234_567_890.123_456_7,
                Some("1234567890.1234567"),
            ),
            (
                "28 places still fit",
                1e-28,
                Some("0.0000000000000000000000000001"),
            ),
            ("29 places do not", 1e-29, None),
            ("the smallest subnormal does not fit", 5e-324, None),
            ("beyond the decimal range", 1e29, None),
            ("f64::MAX", f64::MAX, None),
            ("NaN", f64::NAN, None),
            ("+Inf", f64::INFINITY, None),
            ("-Inf", f64::NEG_INFINITY, None),
        ];
        for (case, input, expected) in cases {
            let got = decimal_from_f64(*input);
            assert_eq!(got, expected.map(dec), "{case}: {input:e}");
        }
        let zero = decimal_from_f64(-0.0).unwrap_or_else(|| panic!("-0.0 converts"));
        assert!(!zero.is_sign_negative(), "-0.0 becomes an unsigned zero");
    }

    #[test]
    fn rounding_is_half_to_even_at_the_quantum_scale() {
        let cases = [
            ("half goes down to even", "0.125", "0.01", "0.12"),
            ("half goes up to even", "0.135", "0.01", "0.14"),
            ("above half goes up", "0.1250001", "0.01", "0.13"),
            ("below half goes down", "0.1249999", "0.01", "0.12"),
            ("negative half goes to even", "-0.125", "0.01", "-0.12"),
            ("whole credits, half to even", "2.5", "1", "2"),
            ("whole credits, odd half up", "3.5", "1", "4"),
            ("pads to the quantum's places", "1", "0.01", "1.00"),
            ("finer quantum", "1.23456", "0.001", "1.235"),
            ("already exact", "7.10", "0.01", "7.10"),
            (
                "28-digit value",
                "1.3333333333333333333333333333",
                "0.01",
                "1.33",
            ),
        ];
        for (case, value, quantum, expected) in cases {
            let got = round_credits(dec(value), dec(quantum));
            assert_eq!(got.to_string(), expected, "{case}: {value} to {quantum}");
        }
    }
}
