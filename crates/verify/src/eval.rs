//! Evaluation of [`Node`] trees: [`exact`] gives constant arithmetic as a [`Rational`];
//! [`eval`] gives any scalar as a [`Complex`] at a sample point, with free variables (and
//! subscripted symbols, as functions of their index) bound to pseudo-random values drawn
//! deterministically from a seed. A step budget bounds sums, products and towers.

use crate::expr::{Konst, Node, Sign};
use crate::normalize::Fun;
use crate::number::{Complex, Rational};

/// Exact value of constant arithmetic, or `None`.
pub fn exact(n: &Node) -> Option<Rational> {
    match n {
        Node::Num(r, _) => Some(*r),
        Node::Neg(a) => exact(a)?.neg(),
        Node::Add(terms) => terms
            .iter()
            .try_fold(Rational::ZERO, |acc, (s, t)| match s {
                Sign::Plus => acc.add(exact(t)?),
                Sign::Minus => acc.sub(exact(t)?),
                _ => None,
            }),
        Node::Mul(f) => f.iter().try_fold(Rational::ONE, |acc, (div, x)| {
            if *div {
                acc.div(exact(x)?)
            } else {
                acc.mul(exact(x)?)
            }
        }),
        Node::Pow(a, b) => {
            let e = exact(b)?;
            if !e.is_integer() {
                return None;
            }
            exact(a)?.pow(e.numer())
        }
        Node::Percent(a) => exact(a)?.div(Rational::int(100)),
        Node::Abs(a) => {
            let v = exact(a)?;
            if v < Rational::ZERO { v.neg() } else { Some(v) }
        }
        Node::Fact(a) => {
            let v = exact(a)?;
            if !v.is_integer() || !(0..=33).contains(&v.numer()) {
                return None;
            }
            (1..=v.numer()).try_fold(Rational::ONE, |acc, k| acc.mul(Rational::int(k)))
        }
        Node::Binom(a, b) => {
            let (n, k) = (exact(a)?, exact(b)?);
            if !n.is_integer()
                || !k.is_integer()
                || k.numer() < 0
                || k.numer() > 200
                || n.numer() < 0
            {
                return None;
            }
            if k > n {
                return Some(Rational::ZERO);
            }
            (0..k.numer()).try_fold(Rational::ONE, |acc, j| {
                acc.mul(Rational::int(n.numer().checked_sub(j)?))?
                    .div(Rational::int(j + 1))
            })
        }
        _ => None,
    }
}

/// Evaluation context: the sample point and a step budget.
pub struct Ctx<'a> {
    seed: u64,
    budget: u32,
    bound: Vec<(&'a str, Complex)>,
}

fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn hash_str(s: &str, seed: u64) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ seed;
    for b in s.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    mix(h)
}

fn unit(h: u64) -> f64 {
    0.35 + 2.0 * ((h >> 11) as f64 / (1u64 << 53) as f64)
}

/// Evaluates `n` at the point identified by `seed` with at most `budget` steps.
pub fn eval(n: &Node, seed: u64, budget: u32) -> Option<Complex> {
    let mut ctx = Ctx {
        seed,
        budget,
        bound: Vec::new(),
    };
    ctx.ev(n)
}

fn real(c: Complex) -> Option<f64> {
    c.is_real().then_some(c.re)
}

impl<'a> Ctx<'a> {
    fn ev(&mut self, n: &'a Node) -> Option<Complex> {
        self.budget = self.budget.checked_sub(1)?;
        Some(match n {
            Node::Num(r, _) => Complex::real(r.to_f64()),
            Node::Float(f, _) => Complex::real(*f),
            Node::Var(v) => match self.bound.iter().rev().find(|(b, _)| b == v) {
                Some((_, x)) => *x,
                None => Complex::real(unit(hash_str(v, self.seed))),
            },
            Node::Indexed(v, idx) => {
                let i = self.ev(idx)?;
                let q = ((i.re * 1e6).round() as i64, (i.im * 1e6).round() as i64);
                let h = hash_str(
                    v,
                    self.seed ^ mix(q.0 as u64) ^ mix(q.1 as u64).rotate_left(17),
                );
                Complex::real(unit(h))
            }
            Node::Const(Konst::Pi) => Complex::real(std::f64::consts::PI),
            Node::Const(Konst::E) => Complex::real(std::f64::consts::E),
            Node::Const(Konst::I) => Complex::I,
            Node::Const(Konst::Inf) => return None,
            Node::Neg(a) => self.ev(a)?.neg(),
            Node::Add(terms) => {
                let mut acc = Complex::real(0.0);
                for (s, t) in terms {
                    let v = self.ev(t)?;
                    acc = match s {
                        Sign::Plus => acc.add(v),
                        Sign::Minus => acc.sub(v),
                        _ => return None,
                    };
                }
                acc
            }
            Node::Mul(f) => {
                let mut acc = Complex::real(1.0);
                for (div, x) in f {
                    let v = self.ev(x)?;
                    acc = if *div { acc.div(v) } else { acc.mul(v) };
                }
                acc
            }
            Node::Pow(a, b) => {
                let (a, b) = (self.ev(a)?, self.ev(b)?);
                a.pow(b)
            }
            Node::Root(a, k) => {
                let (a, k) = (self.ev(a)?, self.ev(k)?);
                a.root(k)
            }
            Node::Func(f, args) => self.func(*f, args)?,
            Node::Fact(a) => {
                let v = real(self.ev(a)?)?;
                if v.fract() != 0.0 || !(0.0..=170.0).contains(&v) {
                    return None;
                }
                Complex::real((1..=v as u32).map(f64::from).product())
            }
            Node::Percent(a) => self.ev(a)?.div(Complex::real(100.0)),
            Node::Degrees(a) => self.ev(a)?.mul(Complex::real(std::f64::consts::PI / 180.0)),
            Node::Abs(a) => Complex::real(self.ev(a)?.abs()),
            Node::Floor(a) => Complex::real(real(self.ev(a)?)?.floor()),
            Node::Ceil(a) => Complex::real(real(self.ev(a)?)?.ceil()),
            Node::Binom(a, b) => {
                let (n, k) = (real(self.ev(a)?)?, real(self.ev(b)?)?);
                if k.fract() != 0.0 || !(0.0..=1000.0).contains(&k) {
                    return None;
                }
                let mut acc = 1.0;
                for j in 0..k as u32 {
                    acc = acc * (n - f64::from(j)) / f64::from(j + 1);
                }
                Complex::real(acc)
            }
            Node::BigOp {
                var,
                lo,
                hi,
                body,
                prod,
            } => {
                let lo = real(self.ev(lo)?)?.round();
                let hi = real(self.ev(hi)?)?.round();
                if !(lo.is_finite() && hi.is_finite()) || hi - lo > 1000.0 {
                    return None;
                }
                let mut acc = Complex::real(if *prod { 1.0 } else { 0.0 });
                let mut k = lo;
                while k <= hi {
                    self.bound.push((var.as_str(), Complex::real(k)));
                    let v = self.ev(body);
                    self.bound.pop();
                    let v = v?;
                    acc = if *prod { acc.mul(v) } else { acc.add(v) };
                    k += 1.0;
                }
                acc
            }
            _ => return None,
        })
    }

    fn func(&mut self, f: Fun, args: &'a [Node]) -> Option<Complex> {
        let mut vals = Vec::with_capacity(args.len());
        for a in args {
            vals.push(self.ev(a)?);
        }
        let x = *vals.first()?;
        let one = Complex::real(1.0);
        Some(match f {
            Fun::Sin => x.sin(),
            Fun::Cos => x.cos(),
            Fun::Tan => x.sin().div(x.cos()),
            Fun::Sec => one.div(x.cos()),
            Fun::Csc => one.div(x.sin()),
            Fun::Cot => x.cos().div(x.sin()),
            Fun::Asin => Complex::real(real(x)?.asin()),
            Fun::Acos => Complex::real(real(x)?.acos()),
            Fun::Atan => Complex::real(real(x)?.atan()),
            Fun::Sinh => Complex::real(real(x)?.sinh()),
            Fun::Cosh => Complex::real(real(x)?.cosh()),
            Fun::Tanh => Complex::real(real(x)?.tanh()),
            Fun::Ln => x.ln(),
            Fun::Log => match vals.get(1) {
                Some(b) => x.ln().div(b.ln()),
                None => x.ln().div(Complex::real(std::f64::consts::LN_10)),
            },
            Fun::Exp => x.exp(),
            Fun::Sqrt => x.sqrt(),
            Fun::Max | Fun::Min => {
                let mut best = real(x)?;
                for v in &vals[1..] {
                    let v = real(*v)?;
                    best = if f == Fun::Max {
                        best.max(v)
                    } else {
                        best.min(v)
                    };
                }
                Complex::real(best)
            }
            Fun::Gcd | Fun::Lcm => {
                let mut acc = real(x)?;
                for v in &vals[1..] {
                    let v = real(*v)?;
                    if acc.fract() != 0.0 || v.fract() != 0.0 || acc.abs() > 1e15 || v.abs() > 1e15
                    {
                        return None;
                    }
                    let (mut a, mut b) = (acc.abs() as u64, v.abs() as u64);
                    while b != 0 {
                        (a, b) = (b, a % b);
                    }
                    acc = if f == Fun::Gcd {
                        a as f64
                    } else if a == 0 {
                        0.0
                    } else {
                        acc.abs() / a as f64 * v.abs()
                    };
                }
                Complex::real(acc)
            }
        })
    }
}
