//! Exact rationals over `i128` and complex floats.
//!
//! [`Rational`] holds integers, decimals and fractions exactly; every operation is checked and
//! returns `None` on overflow, so callers fall back to floating point instead of panicking.
//! [`Complex`] is the value type of numeric evaluation (it carries `i`).
#![expect(
    clippy::should_implement_trait,
    reason = "checked rational ops return Option; plain names keep call sites short"
)]

use std::cmp::Ordering;

/// An exact rational number `num/den` in lowest terms with `den > 0`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Rational {
    num: i128,
    den: i128,
}

fn gcd(mut a: u128, mut b: u128) -> u128 {
    while b != 0 {
        let t = a % b;
        a = b;
        b = t;
    }
    a
}

impl Rational {
    /// Zero.
    pub const ZERO: Self = Self { num: 0, den: 1 };
    /// One.
    pub const ONE: Self = Self { num: 1, den: 1 };

    /// `num/den` reduced; `None` when `den == 0` or on overflow.
    pub fn new(num: i128, den: i128) -> Option<Self> {
        if den == 0 {
            return None;
        }
        let g = gcd(num.unsigned_abs(), den.unsigned_abs());
        let g = i128::try_from(g).ok()?;
        let (mut n, mut d) = (num / g, den / g);
        if d < 0 {
            n = n.checked_neg()?;
            d = d.checked_neg()?;
        }
        Some(Self { num: n, den: d })
    }

    /// The integer `n`.
    pub fn int(n: i128) -> Self {
        Self { num: n, den: 1 }
    }

    /// Numerator (sign carrier).
    pub fn numer(self) -> i128 {
        self.num
    }

    /// Denominator (always positive).
    pub fn denom(self) -> i128 {
        self.den
    }

    /// Whether the value is an integer.
    pub fn is_integer(self) -> bool {
        self.den == 1
    }

    /// Checked sum.
    pub fn add(self, o: Self) -> Option<Self> {
        let g = i128::try_from(gcd(self.den.unsigned_abs(), o.den.unsigned_abs())).ok()?;
        let l = self.den / g;
        let num = self
            .num
            .checked_mul(o.den / g)?
            .checked_add(o.num.checked_mul(l)?)?;
        Self::new(num, l.checked_mul(o.den)?)
    }

    /// Checked difference.
    pub fn sub(self, o: Self) -> Option<Self> {
        self.add(o.neg()?)
    }

    /// Checked negation.
    pub fn neg(self) -> Option<Self> {
        Some(Self {
            num: self.num.checked_neg()?,
            den: self.den,
        })
    }

    /// Checked product.
    pub fn mul(self, o: Self) -> Option<Self> {
        let g1 = i128::try_from(gcd(self.num.unsigned_abs(), o.den.unsigned_abs()))
            .ok()?
            .max(1);
        let g2 = i128::try_from(gcd(o.num.unsigned_abs(), self.den.unsigned_abs()))
            .ok()?
            .max(1);
        let num = (self.num / g1).checked_mul(o.num / g2)?;
        let den = (self.den / g2).checked_mul(o.den / g1)?;
        Self::new(num, den)
    }

    /// Checked quotient; `None` for division by zero.
    pub fn div(self, o: Self) -> Option<Self> {
        if o.num == 0 {
            return None;
        }
        self.mul(Self::new(o.den, o.num)?)
    }

    /// Integer power with a bounded exponent (|e| <= 4096); `None` on overflow.
    pub fn pow(self, e: i128) -> Option<Self> {
        if e.unsigned_abs() > 4096 {
            // Only 0, 1 and -1 survive large exponents without overflowing i128.
            return match (self.num, self.den) {
                (0, _) if e > 0 => Some(Self::ZERO),
                (1, 1) => Some(Self::ONE),
                (-1, 1) => Some(if e % 2 == 0 { Self::ONE } else { self }),
                _ => None,
            };
        }
        let base = if e < 0 { Self::ONE.div(self)? } else { self };
        let mut result = Self::ONE;
        let mut b = base;
        let mut n = e.unsigned_abs();
        while n > 0 {
            if n & 1 == 1 {
                result = result.mul(b)?;
            }
            n >>= 1;
            if n > 0 {
                b = b.mul(b)?;
            }
        }
        Some(result)
    }

    /// Nearest `f64`.
    pub fn to_f64(self) -> f64 {
        self.num as f64 / self.den as f64
    }

    /// Parses a plain decimal literal: `123`, `1.50`, `.4`, `6.02e23`, `1E-6`.
    ///
    /// Returns the value and the count of significant digits when the literal has a decimal
    /// point (0 for integers), or `None` when it is not a literal or does not fit.
    pub fn parse_decimal(s: &str) -> Option<(Self, u32)> {
        let (mantissa, exp) = match s.find(['e', 'E']) {
            Some(p) => (&s[..p], s[p + 1..].parse::<i32>().ok()?),
            None => (s, 0),
        };
        let (int_part, frac_part) = match mantissa.find('.') {
            Some(p) => (&mantissa[..p], &mantissa[p + 1..]),
            None => (mantissa, ""),
        };
        if int_part.is_empty() && frac_part.is_empty() {
            return None;
        }
        if !int_part
            .bytes()
            .chain(frac_part.bytes())
            .all(|b| b.is_ascii_digit())
        {
            return None;
        }
        let digits: String = int_part.chars().chain(frac_part.chars()).collect();
        let trimmed = digits.trim_start_matches('0');
        let sig = if mantissa.contains('.') {
            trimmed.len().max(1) as u32
        } else {
            0
        };
        if trimmed.len() > 36 || exp.unsigned_abs() > 60 {
            return None;
        }
        let n: i128 = if trimmed.is_empty() {
            0
        } else {
            trimmed.parse().ok()?
        };
        let scale = exp - frac_part.len() as i32;
        let ten = Self::int(10);
        let value = Self::int(n).mul(ten.pow(i128::from(scale))?)?;
        Some((value, sig))
    }
}

impl PartialOrd for Rational {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Rational {
    fn cmp(&self, other: &Self) -> Ordering {
        match (
            self.num.checked_mul(other.den),
            other.num.checked_mul(self.den),
        ) {
            (Some(a), Some(b)) => a.cmp(&b),
            _ => self.to_f64().total_cmp(&other.to_f64()),
        }
    }
}

/// A complex number in `f64`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Complex {
    /// Real part.
    pub re: f64,
    /// Imaginary part.
    pub im: f64,
}

impl Complex {
    /// A real number.
    pub fn real(re: f64) -> Self {
        Self { re, im: 0.0 }
    }

    /// The imaginary unit.
    pub const I: Self = Self { re: 0.0, im: 1.0 };

    /// Whether both parts are finite.
    pub fn is_finite(self) -> bool {
        self.re.is_finite() && self.im.is_finite()
    }

    /// Whether the imaginary part is negligible.
    pub fn is_real(self) -> bool {
        self.im.abs() <= 1e-12 * self.re.abs().max(1.0)
    }

    /// Modulus.
    pub fn abs(self) -> f64 {
        self.re.hypot(self.im)
    }

    /// Sum.
    pub fn add(self, o: Self) -> Self {
        Self {
            re: self.re + o.re,
            im: self.im + o.im,
        }
    }

    /// Difference.
    pub fn sub(self, o: Self) -> Self {
        Self {
            re: self.re - o.re,
            im: self.im - o.im,
        }
    }

    /// Negation.
    pub fn neg(self) -> Self {
        Self {
            re: -self.re,
            im: -self.im,
        }
    }

    /// Product.
    pub fn mul(self, o: Self) -> Self {
        if self.im == 0.0 && o.im == 0.0 {
            return Self::real(self.re * o.re);
        }
        Self {
            re: self.re * o.re - self.im * o.im,
            im: self.re * o.im + self.im * o.re,
        }
    }

    /// Quotient (non-finite on division by zero).
    pub fn div(self, o: Self) -> Self {
        if self.im == 0.0 && o.im == 0.0 {
            return Self::real(self.re / o.re);
        }
        let d = o.re * o.re + o.im * o.im;
        Self {
            re: (self.re * o.re + self.im * o.im) / d,
            im: (self.im * o.re - self.re * o.im) / d,
        }
    }

    /// Principal exponential.
    pub fn exp(self) -> Self {
        let m = self.re.exp();
        if self.im == 0.0 {
            return Self::real(m);
        }
        Self {
            re: m * self.im.cos(),
            im: m * self.im.sin(),
        }
    }

    /// Principal logarithm.
    pub fn ln(self) -> Self {
        if self.im == 0.0 && self.re > 0.0 {
            return Self::real(self.re.ln());
        }
        Self {
            re: self.abs().ln(),
            // `+ 0.0` turns a negated zero into +0: the principal branch gives `ln(-1) = iπ`, so
            // `\sqrt{-1}` is `i`, not `-i`.
            im: (self.im + 0.0).atan2(self.re),
        }
    }

    /// Principal power `self^o`.
    pub fn pow(self, o: Self) -> Self {
        if o.im == 0.0 && self.im == 0.0 {
            if o.re.fract() == 0.0 && o.re.abs() <= 1024.0 {
                return Self::real(self.re.powi(o.re as i32));
            }
            if self.re >= 0.0 {
                return Self::real(self.re.powf(o.re));
            }
        }
        if self.re == 0.0 && self.im == 0.0 {
            return if o.re > 0.0 {
                Self::real(0.0)
            } else {
                Self::real(f64::NAN)
            };
        }
        o.mul(self.ln()).exp()
    }

    /// Principal square root.
    pub fn sqrt(self) -> Self {
        if self.im == 0.0 && self.re >= 0.0 {
            return Self::real(self.re.sqrt());
        }
        self.pow(Self::real(0.5))
    }

    /// Real `n`-th root for real inputs (odd roots of negatives stay real), else principal.
    pub fn root(self, n: Self) -> Self {
        if self.im == 0.0 && n.im == 0.0 && n.re.fract() == 0.0 && n.re != 0.0 {
            if self.re < 0.0 && (n.re as i64) % 2 != 0 {
                return Self::real(-(-self.re).powf(1.0 / n.re));
            }
            if self.re >= 0.0 {
                return Self::real(self.re.powf(1.0 / n.re));
            }
        }
        self.pow(Self::real(1.0).div(n))
    }

    /// Sine.
    pub fn sin(self) -> Self {
        if self.im == 0.0 {
            return Self::real(self.re.sin());
        }
        Self {
            re: self.re.sin() * self.im.cosh(),
            im: self.re.cos() * self.im.sinh(),
        }
    }

    /// Cosine.
    pub fn cos(self) -> Self {
        if self.im == 0.0 {
            return Self::real(self.re.cos());
        }
        Self {
            re: self.re.cos() * self.im.cosh(),
            im: -self.re.sin() * self.im.sinh(),
        }
    }

    /// Whether two values agree to a relative tolerance `tol` (absolute near zero).
    pub fn close(self, o: Self, tol: f64) -> bool {
        let scale = self.abs().max(o.abs()).max(1.0);
        self.sub(o).abs() <= tol * scale
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reduces_and_normalises_sign() {
        let r = Rational::new(6, -8).expect("valid");
        assert_eq!((r.numer(), r.denom()), (-3, 4));
        assert!(Rational::new(1, 0).is_none());
    }

    #[test]
    fn arithmetic_is_exact() {
        let a = Rational::new(1, 3).expect("valid");
        let b = Rational::new(1, 6).expect("valid");
        assert_eq!(a.add(b), Rational::new(1, 2));
        assert_eq!(a.sub(b), Some(b));
        assert_eq!(a.mul(b), Rational::new(1, 18));
        assert_eq!(a.div(b), Some(Rational::int(2)));
        assert_eq!(a.div(Rational::ZERO), None);
    }

    #[test]
    fn overflow_is_none_not_panic() {
        let big = Rational::int(i128::MAX);
        assert!(big.add(big).is_none());
        assert!(big.mul(big).is_none());
        assert!(Rational::int(10).pow(200).is_none());
        assert!(Rational::int(i128::MIN).neg().is_none());
        assert!(Rational::new(i128::MIN, -1).is_none());
        assert_eq!(Rational::int(-1).pow(1 << 40), Some(Rational::ONE));
    }

    #[test]
    fn parses_decimals() {
        let (v, sig) = Rational::parse_decimal("1.50").expect("decimal");
        assert_eq!((v, sig), (Rational::new(3, 2).expect("valid"), 3));
        assert_eq!(
            Rational::parse_decimal(".4").map(|p| p.0),
            Rational::new(2, 5)
        );
        assert_eq!(
            Rational::parse_decimal("1e-6").map(|p| p.0),
            Rational::new(1, 1_000_000)
        );
        assert_eq!(
            Rational::parse_decimal("6.02E23").map(|p| p.0),
            Some(Rational::int(602 * 10i128.pow(21)))
        );
        assert_eq!(Rational::parse_decimal("12").map(|p| p.1), Some(0));
        assert!(Rational::parse_decimal("1e999").is_none());
        assert!(Rational::parse_decimal("abc").is_none());
    }

    #[test]
    fn complex_roots_and_powers() {
        assert!(
            Complex::real(-8.0)
                .root(Complex::real(3.0))
                .close(Complex::real(-2.0), 1e-12)
        );
        assert!(Complex::real(-1.0).sqrt().close(Complex::I, 1e-12));
        assert!(Complex::I.mul(Complex::I).close(Complex::real(-1.0), 1e-12));
        assert!(
            Complex::real(2.0)
                .pow(Complex::real(10.0))
                .close(Complex::real(1024.0), 1e-12)
        );
    }
}
