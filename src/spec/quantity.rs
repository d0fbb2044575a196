//! Kubernetes resource quantities (`1Gi`, `512Mi`, `2G`, `1e9`) as byte counts.

/// Why a quantity is not a usable byte count.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuantityError {
    #[error("invalid quantity `{0}` (expected e.g. `1Gi`, `512Mi`, `2G`)")]
    Invalid(String),
    #[error("quantity `{0}` is not a whole number of bytes")]
    Fraction(String),
    #[error("quantity `{0}` must be more than 0 bytes")]
    Zero(String),
    #[error("quantity `{0}` is too large")]
    TooLarge(String),
}

/// Parses a quantity that must come out as a whole, positive number of bytes.
pub fn parse_bytes(s: &str) -> Result<u64, QuantityError> {
    let bad = || QuantityError::Invalid(s.to_string());
    let num_end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, suffix) = s.split_at(num_end);
    if num.is_empty() || num.starts_with('.') || num.ends_with('.') || num.matches('.').count() > 1
    {
        return Err(bad());
    }
    let (int_part, frac_part) = num.split_once('.').unwrap_or((num, ""));
    // Exact arithmetic: mantissa as an integer scaled by 10^-frac_digits.
    let mantissa: u128 = format!("{int_part}{frac_part}")
        .parse()
        .map_err(|_| bad())?;
    let frac_digits = frac_part.len() as u32;
    let (mul, exp10): (u128, i32) = match suffix {
        "" => (1, 0),
        "Ki" => (1 << 10, 0),
        "Mi" => (1 << 20, 0),
        "Gi" => (1 << 30, 0),
        "Ti" => (1 << 40, 0),
        "Pi" => (1 << 50, 0),
        "Ei" => (1 << 60, 0),
        "k" => (1, 3),
        "M" => (1, 6),
        "G" => (1, 9),
        "T" => (1, 12),
        "P" => (1, 15),
        "E" => (1, 18),
        _ => match suffix.strip_prefix(['e', 'E']) {
            Some(e) => (1, e.parse::<i32>().map_err(|_| bad())?),
            None => return Err(bad()),
        },
    };
    let exp = exp10 - frac_digits as i32;
    let mut value = mantissa.checked_mul(mul).ok_or_else(bad)?;
    if exp >= 0 {
        let p = 10u128.checked_pow(exp as u32).ok_or_else(bad)?;
        value = value.checked_mul(p).ok_or_else(bad)?;
    } else {
        let p = 10u128.checked_pow((-exp) as u32).ok_or_else(bad)?;
        if value % p != 0 {
            return Err(QuantityError::Fraction(s.to_string()));
        }
        value /= p;
    }
    if value == 0 {
        return Err(QuantityError::Zero(s.to_string()));
    }
    u64::try_from(value).map_err(|_| QuantityError::TooLarge(s.to_string()))
}

#[cfg(test)]
mod tests {
    use super::parse_bytes;

    #[test]
    fn binary_decimal_and_exponent_suffixes() {
        assert_eq!(parse_bytes("1Gi"), Ok(1 << 30));
        assert_eq!(parse_bytes("512Mi"), Ok(512 << 20));
        assert_eq!(parse_bytes("1.5Gi"), Ok(3 << 29));
        assert_eq!(parse_bytes("2G"), Ok(2_000_000_000));
        assert_eq!(parse_bytes("1e9"), Ok(1_000_000_000));
        assert_eq!(parse_bytes("1E"), Ok(1_000_000_000_000_000_000));
        assert_eq!(parse_bytes("4096"), Ok(4096));
    }

    #[test]
    fn rejects_garbage_fractions_zero_and_overflow() {
        for s in [
            "", "Gi", "1GB", "1 Gi", "-1Gi", "1.Gi", "0.1", "0", "1.2.3", "100Ei", "m",
        ] {
            assert!(parse_bytes(s).is_err(), "{s}");
        }
    }
}
