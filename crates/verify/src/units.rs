//! Quantities with units: `3 \text{ hours}` and `180 minutes` are the same time.
//!
//! [`quantity`] reads an answer that is exactly a number and one known unit of time, length,
//! mass or volume; [`crate::equiv::equivalent`] compares two such answers in a common unit when
//! [`crate::VerifyOptions::convert_units`] is set. An answer with a unit against a bare number
//! is not converted: a bare gold's unit is the question's, which the verifier does not see, so
//! the numbers compare as written (`180 minutes` is not gold `3`).

/// A physical dimension.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dimension {
    /// Seconds.
    Time,
    /// Metres.
    Length,
    /// Kilograms.
    Mass,
    /// Litres.
    Volume,
}

/// A number with a unit: its value in the dimension's base unit and the unit as written.
#[derive(Clone, Debug, PartialEq)]
pub struct Quantity {
    /// Value in the base unit (seconds, metres, kilograms, litres).
    pub base_value: f64,
    /// The dimension.
    pub dimension: Dimension,
    /// The unit's canonical name (`h`, `min`, `km`, …).
    pub unit: &'static str,
}

/// The dimension, canonical name and size in the base unit of a unit word (lower case).
fn unit(word: &str) -> Option<(Dimension, &'static str, f64)> {
    use Dimension::*;
    Some(match word {
        "s" | "sec" | "secs" | "second" | "seconds" => (Time, "s", 1.0),
        "min" | "mins" | "minute" | "minutes" => (Time, "min", 60.0),
        "h" | "hr" | "hrs" | "hour" | "hours" => (Time, "h", 3600.0),
        "day" | "days" => (Time, "day", 86_400.0),
        "week" | "weeks" => (Time, "week", 604_800.0),
        "mm" | "millimeter" | "millimeters" | "millimetre" | "millimetres" => (Length, "mm", 1e-3),
        "cm" | "centimeter" | "centimeters" | "centimetre" | "centimetres" => (Length, "cm", 1e-2),
        "m" | "meter" | "meters" | "metre" | "metres" => (Length, "m", 1.0),
        "km" | "kilometer" | "kilometers" | "kilometre" | "kilometres" => (Length, "km", 1e3),
        "in" | "inch" | "inches" => (Length, "in", 0.0254),
        "ft" | "foot" | "feet" => (Length, "ft", 0.3048),
        "yd" | "yard" | "yards" => (Length, "yd", 0.9144),
        "mi" | "mile" | "miles" => (Length, "mi", 1609.344),
        "mg" | "milligram" | "milligrams" => (Mass, "mg", 1e-6),
        "g" | "gram" | "grams" => (Mass, "g", 1e-3),
        "kg" | "kilogram" | "kilograms" => (Mass, "kg", 1.0),
        // `pound` is left out: it is also a currency.
        "lb" | "lbs" => (Mass, "lb", 0.453_592_37),
        "oz" | "ounce" | "ounces" => (Mass, "oz", 0.028_349_523_125),
        "ml" | "milliliter" | "milliliters" | "millilitre" | "millilitres" => (Volume, "ml", 1e-3),
        "l" | "liter" | "liters" | "litre" | "litres" => (Volume, "l", 1.0),
        _ => return None,
    })
}

/// Reads `3 hours`, `$180 \text{ minutes}$`, `2.5\,\mathrm{km}`, `1,500 m`; `None` for anything
/// that is not exactly a plain number and one known unit. Allocates only for a match, since
/// every compared answer passes through here.
pub fn quantity(answer: &str) -> Option<Quantity> {
    let s = answer.trim().trim_matches('$').trim();
    if s.len() > 64 || !s.starts_with(|c: char| c.is_ascii_digit() || c == '-' || c == '.') {
        return None;
    }
    let end = s
        .find(|c: char| !(c.is_ascii_digit() || matches!(c, '.' | ',' | '-')))
        .unwrap_or(s.len());
    let mut rest = &s[end..];
    loop {
        let trimmed = rest.trim_start();
        rest = [
            "\\text{",
            "\\mathrm{",
            "\\mbox{",
            "\\textrm{",
            "{",
            "\\ ",
            "\\,",
            "\\;",
            "~",
        ]
        .iter()
        .find_map(|p| trimmed.strip_prefix(p))
        .unwrap_or(trimmed);
        if rest.len() == trimmed.len() {
            break;
        }
    }
    let word_len = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
    let (word, tail) = rest.split_at(word_len);
    if word.is_empty()
        || word.len() > 12
        || !tail
            .chars()
            .all(|c| c == '}' || c == '.' || c.is_whitespace())
    {
        return None;
    }
    let mut lower = [0u8; 12];
    lower[..word.len()].copy_from_slice(word.as_bytes());
    lower[..word.len()].make_ascii_lowercase();
    let (dimension, unit, size) = unit(std::str::from_utf8(&lower[..word.len()]).ok()?)?;
    let number: String = s[..end].chars().filter(|c| *c != ',').collect();
    let value: f64 = number.parse().ok()?;
    Some(Quantity {
        base_value: value * size,
        dimension,
        unit,
    })
}

/// Whether two quantities are equal after conversion: `Some(false)` for different dimensions,
/// `None` when both use the same unit (the ordinary comparison applies).
pub fn same_quantity(a: &Quantity, b: &Quantity) -> Option<bool> {
    if a.dimension != b.dimension {
        return Some(false);
    }
    if a.unit == b.unit {
        return None;
    }
    let scale = a
        .base_value
        .abs()
        .max(b.base_value.abs())
        .max(f64::MIN_POSITIVE);
    Some((a.base_value - b.base_value).abs() <= 1e-9 * scale)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_quantities() {
        let q = quantity("180 \\text{ minutes}").expect("a quantity");
        assert_eq!(
            (q.base_value, q.dimension, q.unit),
            (10_800.0, Dimension::Time, "min")
        );
        assert_eq!(
            quantity("$1,500\\,\\mathrm{m}$").map(|q| q.base_value),
            Some(1500.0)
        );
        assert_eq!(quantity("3"), None);
        assert_eq!(quantity("3 apples"), None);
        assert_eq!(quantity("x + 3 hours"), None);
    }

    #[test]
    fn converts_within_a_dimension() {
        let q = |s: &str| quantity(s).expect("a quantity");
        assert_eq!(same_quantity(&q("3 hours"), &q("180 minutes")), Some(true));
        assert_eq!(same_quantity(&q("3 hours"), &q("3 minutes")), Some(false));
        assert_eq!(same_quantity(&q("2 km"), &q("2000 m")), Some(true));
        assert_eq!(same_quantity(&q("3 hours"), &q("3 km")), Some(false));
        assert_eq!(same_quantity(&q("3 h"), &q("3 hours")), None);
    }
}
