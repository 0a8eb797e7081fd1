//! Equivalence of two extracted answers.
//!
//! Order of checks in [`equivalent`]: two quantities with units of one dimension compare
//! converted ([`crate::units`], when [`VerifyOptions::convert_units`]); number words become
//! numbers (`twelve`); identical token streams; text answers (words compared
//! case-insensitively); then parsed trees compared by `Checker::eq`: relations (label forms
//! such as `x = 3` or `f(2) = 6` reduce to their value, equations and inequalities compare as
//! `lhs - rhs` up to a constant factor, inequalities, `|x| < a` and `x \in I` become intervals
//! or unions), a one-column or one-row matrix against a tuple entry by entry, collections
//! (tuples and intervals in order, sets, bare lists and unions in any order, `\pm` expands to
//! two elements), matrices cell by cell, and scalars: a degree mark dropped or read as `π/180`,
//! a `%` dropped only after a written number (`28\%` may be `28`, `\frac{3}{4}\%` is only
//! 0.0075), then exactly as rationals when possible, otherwise numerically at seeded
//! pseudo-random points.

use crate::eval;
use crate::expr::{self, Konst, Node, ParseOptions, Sign};
use crate::normalize::{self, RelOp, Tok};
use crate::number::{Complex, Rational};
use crate::units;
use crate::{PercentPolicy, VerifyOptions};

/// Numerical noise allowed between two constant expressions (relative).
const CONSTANT_TOL: f64 = 1e-11;
/// Noise allowed between two expressions with variables (relative).
const EXPR_TOL: f64 = 1e-8;
/// Largest collection compared element by element.
const MAX_ITEMS: usize = 256;

/// Whether two extracted answers are mathematically the same under `opts`.
pub fn equivalent(a: &str, b: &str, opts: &VerifyOptions) -> bool {
    let a = a.trim();
    let b = b.trim();
    if a.len() > opts.max_answer_chars || b.len() > opts.max_answer_chars {
        return !a.is_empty() && a.split_whitespace().eq(b.split_whitespace());
    }
    if opts.convert_units
        && let Some(x) = units::quantity(a)
        && let Some(y) = units::quantity(b)
        && let Some(same) = units::same_quantity(&x, &y)
    {
        return same;
    }
    // `two`, `Twelve`, `twenty-one` are numbers.
    let words = |s: &str| normalize::number_words(s).map(|n| n.to_string());
    let a = words(a).unwrap_or_else(|| normalize::fix_doubled_backslashes(a));
    let b = words(b).unwrap_or_else(|| normalize::fix_doubled_backslashes(b));
    let ta = normalize::lex(&a, opts.strip_units);
    let tb = normalize::lex(&b, opts.strip_units);
    if ta.is_empty() || tb.is_empty() {
        return false;
    }
    if ta.iter().map(|t| &t.tok).eq(tb.iter().map(|t| &t.tok)) {
        return true;
    }
    let has_word = |t: &[normalize::Token]| t.iter().any(|x| matches!(x.tok, Tok::Word(_)));
    if (has_word(&ta) || has_word(&tb))
        && let (Some(x), Some(y)) = (as_text(&ta), as_text(&tb))
    {
        return x == y;
    }
    let popts = ParseOptions {
        e_is_euler: opts.e_is_euler,
        i_is_imaginary: opts.i_is_imaginary,
        mixed_numbers: opts.mixed_numbers,
        max_depth: opts.max_depth,
        strip_units: opts.strip_units,
    };
    let (Some(na), Some(nb)) = (expr::parse(&ta, &popts), expr::parse(&tb, &popts)) else {
        return false;
    };
    let checker = Checker { opts };
    if checker.eq(&na, &nb) {
        return true;
    }
    if opts.decimal_comma {
        // `1,22` against a single number reads as a decimal comma.
        for (raw, other) in [(&a, &nb), (&b, &na)] {
            if let Some(v) = decimal_comma(raw)
                && is_scalar(other)
                && let Some(n) = expr::parse(&normalize::lex(&v, opts.strip_units), &popts)
                && checker.eq(&n, other)
            {
                return true;
            }
        }
    }
    false
}

/// Words of a text answer, lower-cased; `None` when the tokens are not all words and letters.
fn as_text(t: &[normalize::Token]) -> Option<String> {
    let mut s = String::new();
    for x in t {
        match &x.tok {
            Tok::Ident(c) if c.len() == 1 => {
                if x.space && !s.is_empty() {
                    s.push(' ');
                }
                s.push_str(&c.to_lowercase());
            }
            Tok::Word(w) => {
                if !s.is_empty() {
                    s.push(' ');
                }
                s.push_str(&w.to_lowercase());
            }
            _ => return None,
        }
    }
    let s = s.split_whitespace().collect::<Vec<_>>().join(" ");
    (s.len() >= 2).then_some(s)
}

/// `d+,d+` written without spaces, read with a decimal point instead.
fn decimal_comma(raw: &str) -> Option<String> {
    let t = raw.trim().trim_matches('$').trim();
    let t2 = t.strip_prefix('-').unwrap_or(t);
    let (x, y) = t2.split_once(',')?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|c| c.is_ascii_digit());
    (digits(x) && digits(y)).then(|| t.replacen(',', ".", 1))
}

fn is_scalar(n: &Node) -> bool {
    !matches!(
        n,
        Node::Seq { .. }
            | Node::Set(_)
            | Node::Bare(_)
            | Node::Union(_)
            | Node::Matrix(_)
            | Node::Rel { .. }
            | Node::Ratio(_)
    )
}

/// What kind of collection a node is.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Set,
    Bare,
    Bracketed(char, char),
}

fn collection(n: &Node) -> Option<(Kind, &[Node])> {
    match n {
        Node::Set(v) => Some((Kind::Set, v)),
        Node::Bare(v) => Some((Kind::Bare, v)),
        Node::Seq { open, close, items } => Some((Kind::Bracketed(*open, *close), items)),
        _ => None,
    }
}

/// Elements of an unordered collection with `\pm` expanded.
fn expand(items: &[Node]) -> Vec<Node> {
    let mut out = Vec::with_capacity(items.len());
    for it in items {
        if expr::has_pm(it) {
            out.push(expr::with_sign(it, true));
            out.push(expr::with_sign(it, false));
        } else {
            out.push(it.clone());
        }
    }
    out
}

fn unneg(n: &Node) -> &Node {
    match n {
        Node::Neg(a) => unneg(a),
        other => other,
    }
}

/// The entries of a one-column or one-row matrix with at least two entries.
fn vector_items(n: &Node) -> Option<Vec<&Node>> {
    let Node::Matrix(rows) = n else { return None };
    let items: Vec<&Node> = if rows.iter().all(|r| r.len() == 1) {
        rows.iter().flatten().collect()
    } else if rows.len() == 1 {
        rows[0].iter().collect()
    } else {
        return None;
    };
    (items.len() >= 2).then_some(items)
}

/// The items of a parenthesised tuple `(a, b, ..)`.
fn tuple_items(n: &Node) -> Option<&[Node]> {
    match n {
        Node::Seq {
            open: '(',
            close: ')',
            items,
        } => Some(items),
        _ => None,
    }
}

fn inf_sign(n: &Node) -> Option<bool> {
    match n {
        Node::Const(Konst::Inf) => Some(true),
        Node::Neg(a) => inf_sign(a).map(|s| !s),
        Node::Add(t) if t.len() == 1 && t[0].0 == Sign::Plus => inf_sign(&t[0].1),
        _ => None,
    }
}

/// The comparison engine for one pair.
pub(crate) struct Checker<'a> {
    pub(crate) opts: &'a VerifyOptions,
}

impl Checker<'_> {
    /// Whether two parsed answers are equivalent.
    pub(crate) fn eq(&self, a: &Node, b: &Node) -> bool {
        match (a, b) {
            (Node::Rel { parts: pa, ops: oa }, Node::Rel { parts: pb, ops: ob }) => {
                return self.rel_eq(pa, oa, pb, ob);
            }
            (Node::Rel { parts, ops }, other) | (other, Node::Rel { parts, ops }) => {
                if let Some(v) = rel_value(parts, ops) {
                    return self.eq(v, other);
                }
                return interval_of(parts, ops).is_some_and(|iv| self.eq(&iv, other));
            }
            _ => {}
        }
        // A column (or row) vector is the tuple of its entries.
        let vector_tuple = match (vector_items(a), tuple_items(b)) {
            (Some(v), Some(t)) => Some((v, t)),
            _ => vector_items(b).zip(tuple_items(a)),
        };
        if let Some((v, t)) = vector_tuple {
            return v.len() == t.len() && v.iter().zip(t).all(|(p, q)| self.eq(p, q));
        }
        // `x < -2 or x > 3` is the union of two intervals.
        if matches!(a, Node::Union(_))
            && let Some(u) = as_union(b)
        {
            return self.eq(a, &u);
        }
        if matches!(b, Node::Union(_))
            && let Some(u) = as_union(a)
        {
            return self.eq(&u, b);
        }
        // `\pm` outside a collection stands for a two-element set.
        if is_scalar(a) && expr::has_pm(a) || is_scalar(b) && expr::has_pm(b) {
            let wrap = |n: &Node| {
                if is_scalar(n) && expr::has_pm(n) {
                    Node::Set(vec![n.clone()])
                } else {
                    n.clone()
                }
            };
            return self.eq(&wrap(a), &wrap(b));
        }
        match (collection(a), collection(b)) {
            (Some(x), Some(y)) => self.collections_eq(x, y),
            (Some((kind, items)), None) | (None, Some((kind, items))) => {
                let other = if collection(a).is_some() { b } else { a };
                let items = if kind == Kind::Bracketed('(', ')') {
                    Vec::new()
                } else {
                    expand(items)
                };
                items.len() == 1 && self.eq(&items[0], other)
            }
            (None, None) => self.scalar_eq(a, b),
        }
    }

    fn collections_eq(&self, (ka, xa): (Kind, &[Node]), (kb, xb): (Kind, &[Node])) -> bool {
        if xa.len() > MAX_ITEMS || xb.len() > MAX_ITEMS {
            return false;
        }
        let ordered = |x: &[Node], y: &[Node]| {
            x.len() == y.len() && x.iter().zip(y).all(|(p, q)| self.eq(p, q))
        };
        match (ka, kb) {
            (Kind::Bracketed(o1, c1), Kind::Bracketed(o2, c2)) => {
                o1 == o2 && c1 == c2 && ordered(xa, xb)
            }
            (Kind::Bracketed(..), Kind::Bare) | (Kind::Bare, Kind::Bracketed(..)) => {
                ordered(xa, xb)
            }
            _ => self.unordered_eq(&expand(xa), &expand(xb)),
        }
    }

    fn unordered_eq(&self, xa: &[Node], xb: &[Node]) -> bool {
        let covered = |x: &[Node], y: &[Node]| x.iter().all(|p| y.iter().any(|q| self.eq(p, q)));
        covered(xa, xb) && covered(xb, xa)
    }

    fn scalar_eq(&self, a: &Node, b: &Node) -> bool {
        match (a, b) {
            (Node::Matrix(ra), Node::Matrix(rb)) => {
                return ra.len() == rb.len()
                    && ra.iter().zip(rb).all(|(x, y)| {
                        x.len() == y.len() && x.iter().zip(y).all(|(p, q)| self.eq(p, q))
                    });
            }
            (Node::Ratio(x), Node::Ratio(y)) => {
                if x.len() == y.len() && x.iter().zip(y).all(|(p, q)| self.eq(p, q)) {
                    return true;
                }
                // `2:4` is the ratio `1:2` (exact, nonzero parts only; `12:00` stays a time).
                return match (x.as_slice(), y.as_slice()) {
                    ([a, b], [c, d]) => match (
                        eval::exact(a),
                        eval::exact(b),
                        eval::exact(c),
                        eval::exact(d),
                    ) {
                        (Some(a), Some(b), Some(c), Some(d))
                            if [a, b, c, d].iter().all(|v| *v != Rational::ZERO) =>
                        {
                            a.mul(d).is_some_and(|l| b.mul(c) == Some(l))
                        }
                        _ => false,
                    },
                    _ => false,
                };
            }
            // A union is the same set in any order.
            (Node::Union(x), Node::Union(y)) => {
                return x.len() <= MAX_ITEMS && y.len() <= MAX_ITEMS && self.unordered_eq(x, y);
            }
            (Node::Ratio(_) | Node::Union(_), _) | (_, Node::Ratio(_) | Node::Union(_)) => {
                return false;
            }
            _ if has_matrix(a) || has_matrix(b) => return self.matrix_value_eq(a, b),
            _ => {}
        }
        if let (Some(x), Some(y)) = (inf_sign(a), inf_sign(b)) {
            return x == y;
        }
        if inf_sign(a).is_some() || inf_sign(b).is_some() {
            return false;
        }
        // A degree mark may be dropped (`90^\circ` is `90`) or read as radians (`\frac{\pi}{3}`).
        match (a, b) {
            (Node::Degrees(x), Node::Degrees(y)) => return self.eq(x, y),
            (Node::Degrees(x), other) | (other, Node::Degrees(x)) => {
                return self.eq(x, other) || self.value_eq(a, b);
            }
            _ => {}
        }
        let strip = |n: &Node| match n {
            Node::Percent(inner) => (inner.as_ref().clone(), true),
            other => (other.clone(), false),
        };
        let (ia, pa) = strip(a);
        let (ib, pb) = strip(b);
        if pa == pb {
            return self.value_eq(&ia, &ib);
        }
        // Only a written number drops its `%` (`28\%` for `28`); `\frac{3}{4}\%` is 0.0075.
        let literal = |n: &Node| matches!(unneg(n), Node::Num(..) | Node::Float(..));
        let droppable = if pa { literal(&ia) } else { literal(&ib) };
        match self.opts.percent {
            PercentPolicy::Either if !droppable => self.value_eq(a, b),
            PercentPolicy::Either => self.value_eq(&ia, &ib) || self.value_eq(a, b),
            PercentPolicy::Strict => self.value_eq(a, b),
            PercentPolicy::Ignore => self.value_eq(&ia, &ib),
        }
    }

    /// Tolerance the policies grant two numbers: [`VerifyOptions::float_tolerance`], or the last
    /// written digit of a machine-precision decimal ([`VerifyOptions::precise_decimal_digits`]).
    fn policy_tol(&self, a: &Node, b: &Node) -> Option<f64> {
        let mut tol = self.opts.float_tolerance;
        if let Some(min) = self.opts.precise_decimal_digits {
            let d = decimal_digits(a).max(decimal_digits(b));
            if d >= min {
                let t = 10f64.powi(1 - d as i32);
                tol = Some(tol.map_or(t, |x| x.max(t)));
            }
        }
        tol
    }

    /// Tolerance for two constants: numerical noise or the policy tolerance.
    fn constant_tol(&self, a: &Node, b: &Node) -> f64 {
        self.policy_tol(a, b)
            .map_or(CONSTANT_TOL, |t| t.max(CONSTANT_TOL))
    }

    fn value_eq(&self, a: &Node, b: &Node) -> bool {
        if let (Some(x), Some(y)) = (eval::exact(a), eval::exact(b)) {
            if x == y {
                return true;
            }
            return self.policy_tol(a, b).is_some_and(|tol| {
                Complex::real(x.to_f64()).close(Complex::real(y.to_f64()), tol)
            });
        }
        let mut vars = expr::free_vars(a);
        for v in expr::free_vars(b) {
            if !vars.contains(&v) {
                vars.push(v);
            }
        }
        let budget = self.opts.eval_budget;
        if vars.is_empty() {
            return match (
                eval::eval(a, self.opts.seed, budget),
                eval::eval(b, self.opts.seed, budget),
            ) {
                (Some(x), Some(y)) if x.is_finite() && y.is_finite() => {
                    x.close(y, self.constant_tol(a, b))
                }
                _ => a == b,
            };
        }
        let mut agreeing = 0;
        for k in 0..self.opts.eval_points {
            let seed = self
                .opts
                .seed
                .wrapping_add(u64::from(k).wrapping_mul(0x9E37_79B9));
            let x = eval::eval(a, seed, budget).filter(|v| v.is_finite());
            let y = eval::eval(b, seed, budget).filter(|v| v.is_finite());
            match (x, y) {
                (Some(x), Some(y)) => {
                    if !x.close(y, EXPR_TOL) {
                        return false;
                    }
                    agreeing += 1;
                }
                (None, None) => {}
                _ => return false,
            }
        }
        if agreeing >= 2 { true } else { a == b }
    }

    /// Compares matrix-valued expressions (`A + B`, `A B`, `2A`) cell by cell at sample points.
    fn matrix_value_eq(&self, a: &Node, b: &Node) -> bool {
        for k in 0..self.opts.eval_points.min(3) {
            let seed = self
                .opts
                .seed
                .wrapping_add(u64::from(k).wrapping_mul(0x9E37_79B9));
            let (Some(x), Some(y)) = (self.mat_eval(a, seed, 0), self.mat_eval(b, seed, 0)) else {
                return false;
            };
            if x.rows != y.rows
                || x.cols != y.cols
                || !x
                    .cells
                    .iter()
                    .zip(&y.cells)
                    .all(|(p, q)| p.close(*q, EXPR_TOL))
            {
                return false;
            }
        }
        true
    }

    fn mat_eval(&self, n: &Node, seed: u64, depth: u32) -> Option<Mat> {
        if depth > self.opts.max_depth {
            return None;
        }
        let budget = self.opts.eval_budget;
        match n {
            Node::Matrix(rows) => {
                let cols = rows.first()?.len();
                let mut cells = Vec::with_capacity(rows.len() * cols);
                for r in rows {
                    if r.len() != cols {
                        return None;
                    }
                    for c in r {
                        cells.push(eval::eval(c, seed, budget).filter(|v| v.is_finite())?);
                    }
                }
                Some(Mat {
                    rows: rows.len(),
                    cols,
                    cells,
                })
            }
            Node::Neg(x) => self
                .mat_eval(x, seed, depth + 1)
                .map(|m| m.map(Complex::neg)),
            Node::Add(terms) => {
                let mut acc: Option<Mat> = None;
                for (sign, t) in terms {
                    let m = self.mat_eval(t, seed, depth + 1)?;
                    let m = match sign {
                        Sign::Plus => m,
                        Sign::Minus => m.map(Complex::neg),
                        _ => return None,
                    };
                    acc = Some(match acc {
                        None => m,
                        Some(a) if a.rows == m.rows && a.cols == m.cols => {
                            let cells = a
                                .cells
                                .iter()
                                .zip(&m.cells)
                                .map(|(p, q)| p.add(*q))
                                .collect();
                            Mat { cells, ..a }
                        }
                        Some(_) => return None,
                    });
                }
                acc
            }
            Node::Mul(factors) => {
                let mut acc: Option<Mat> = None;
                let mut scale = Complex::real(1.0);
                for (div, f) in factors {
                    if has_matrix(f) {
                        if *div {
                            return None;
                        }
                        let m = self.mat_eval(f, seed, depth + 1)?;
                        acc = Some(match acc {
                            None => m,
                            Some(a) => a.matmul(&m)?,
                        });
                    } else {
                        let v = eval::eval(f, seed, budget)?;
                        scale = if *div { scale.div(v) } else { scale.mul(v) };
                    }
                }
                acc.map(|m| m.map(|c| c.mul(scale)))
            }
            other => {
                let v = eval::eval(other, seed, budget)?;
                Some(Mat {
                    rows: 1,
                    cols: 1,
                    cells: vec![v],
                })
            }
        }
    }

    fn rel_eq(&self, pa: &[Node], oa: &[RelOp], pb: &[Node], ob: &[RelOp]) -> bool {
        if let (Some(x), Some(y)) = (rel_value(pa, oa), rel_value(pb, ob)) {
            return self.eq(x, y);
        }
        if let (Some((ca, fa)), Some((cb, fb))) = (equation_form(pa, oa), equation_form(pb, ob))
            && ca == cb
            && self.proportional(&fa, &fb, ca != RelOp::Eq && ca != RelOp::Ne)
        {
            return true;
        }
        if let (Some(x), Some(y)) = (interval_of(pa, oa), interval_of(pb, ob)) {
            return self.eq(&x, &y);
        }
        oa == ob && pa.len() == pb.len() && pa.iter().zip(pb).all(|(x, y)| self.eq(x, y))
    }

    /// Whether `f = c * g` for a constant `c` (positive when `positive`).
    fn proportional(&self, f: &Node, g: &Node, positive: bool) -> bool {
        let budget = self.opts.eval_budget;
        let mut ratio: Option<Complex> = None;
        let mut agreeing = 0;
        for k in 0..self.opts.eval_points {
            let seed = self
                .opts
                .seed
                .wrapping_add(u64::from(k).wrapping_mul(0x9E37_79B9));
            let (Some(x), Some(y)) = (eval::eval(f, seed, budget), eval::eval(g, seed, budget))
            else {
                continue;
            };
            if !x.is_finite() || !y.is_finite() {
                continue;
            }
            let (zx, zy) = (x.abs() < 1e-12, y.abs() < 1e-12);
            if zx && zy {
                continue;
            }
            if zx || zy {
                return false;
            }
            let r = x.div(y);
            match ratio {
                None => {
                    if !r.is_real() || (positive && r.re <= 0.0) {
                        return false;
                    }
                    ratio = Some(r);
                }
                Some(r0) => {
                    if !r.close(r0, EXPR_TOL) {
                        return false;
                    }
                }
            }
            agreeing += 1;
        }
        agreeing >= 2
    }
}

/// A numeric matrix, row-major.
struct Mat {
    rows: usize,
    cols: usize,
    cells: Vec<Complex>,
}

impl Mat {
    fn map(self, f: impl Fn(Complex) -> Complex) -> Self {
        Self {
            cells: self.cells.into_iter().map(f).collect(),
            ..self
        }
    }

    fn matmul(&self, o: &Self) -> Option<Self> {
        if self.cols != o.rows || self.rows * o.cols > 4096 {
            return None;
        }
        let mut cells = Vec::with_capacity(self.rows * o.cols);
        for i in 0..self.rows {
            for j in 0..o.cols {
                let mut acc = Complex::real(0.0);
                for k in 0..self.cols {
                    acc = acc.add(self.cells[i * self.cols + k].mul(o.cells[k * o.cols + j]));
                }
                cells.push(acc);
            }
        }
        Some(Self {
            rows: self.rows,
            cols: o.cols,
            cells,
        })
    }
}

fn has_matrix(n: &Node) -> bool {
    let mut found = false;
    expr::visit(n, &mut |x| found |= matches!(x, Node::Matrix(_)));
    found
}

/// Significant digits of a plain decimal literal (0 for anything else).
fn decimal_digits(n: &Node) -> u32 {
    match n {
        Node::Num(_, d) | Node::Float(_, d) => *d,
        Node::Neg(a) => decimal_digits(a),
        _ => 0,
    }
}

/// The value a relation states when its left side is a label (`x = 3`, `f(x) = 1`,
/// `x = 5+5+1 = 11`, `x \approx 11`, `x \in [0, 1)`); `None` for a proper equation or inequality.
fn rel_value<'n>(parts: &'n [Node], ops: &[RelOp]) -> Option<&'n Node> {
    if ops
        .iter()
        .any(|o| matches!(o, RelOp::Lt | RelOp::Le | RelOp::Gt | RelOp::Ge | RelOp::Ne))
    {
        return None;
    }
    if let Some(k) = ops.iter().position(|o| *o == RelOp::Approx) {
        // The exact value before `\approx` wins over the approximation after it.
        return if expr::is_label(&parts[k]) {
            parts.get(k + 1)
        } else {
            Some(&parts[k])
        };
    }
    let constant = parts.iter().all(|p| expr::free_vars(p).is_empty());
    if expr::is_label(&parts[0])
        || parts.len() >= 3
        || constant
        || ops.contains(&RelOp::Implies)
        || (parts.len() == 2 && applied_at_constant(&parts[0]) && is_constant(&parts[1]))
    {
        return parts.last();
    }
    None
}

/// `f(2)`, `g(-1)`: a one-letter function applied to a constant (parsed as a product).
fn applied_at_constant(n: &Node) -> bool {
    match n {
        Node::Mul(f) => match f.as_slice() {
            [(false, Node::Var(name)), (false, arg)] => {
                name.chars().count() == 1 && is_constant(arg) && !matches!(arg, Node::Var(_))
            }
            _ => false,
        },
        _ => false,
    }
}

fn is_constant(n: &Node) -> bool {
    expr::free_vars(n).is_empty()
}

/// A bare list of inequalities (`x < -2 or x > 3`) as a union of intervals.
fn as_union(n: &Node) -> Option<Node> {
    let Node::Bare(items) = n else { return None };
    let parts = items
        .iter()
        .map(|it| match it {
            Node::Rel { parts, ops } => interval_of(parts, ops),
            _ => None,
        })
        .collect::<Option<Vec<_>>>()?;
    Some(Node::Union(parts))
}

/// `lhs - rhs` with the relation normalised to `=`, `<`, `<=` or `!=`.
fn equation_form(parts: &[Node], ops: &[RelOp]) -> Option<(RelOp, Node)> {
    let (op, l, r) = match ops {
        [op] => (*op, &parts[0], &parts[1]),
        _ if ops.iter().all(|o| *o == RelOp::Eq) => (RelOp::Eq, &parts[0], parts.last()?),
        _ => return None,
    };
    let (op, l, r) = match op {
        RelOp::Gt => (RelOp::Lt, r, l),
        RelOp::Ge => (RelOp::Le, r, l),
        RelOp::Eq | RelOp::Lt | RelOp::Le | RelOp::Ne => (op, l, r),
        _ => return None,
    };
    if !is_scalar(l) || !is_scalar(r) {
        return None;
    }
    Some((
        op,
        Node::Add(vec![(Sign::Plus, l.clone()), (Sign::Minus, r.clone())]),
    ))
}

/// The set `|x| < a`, `|x| \ge a` or `a \le |x| \le b` describes: an interval or a union of two.
fn abs_interval(parts: &[Node], ops: &[RelOp]) -> Option<Node> {
    let inner_label = |n: &Node| matches!(n, Node::Abs(x) if expr::is_label(x));
    let neg = |n: &Node| Node::Neg(Box::new(n.clone()));
    let inf = Node::Const(Konst::Inf);
    let seq = |open: char, lo: Node, hi: Node, close: char| Node::Seq {
        open,
        close,
        items: vec![lo, hi],
    };
    let flip = |o: RelOp| match o {
        RelOp::Lt => RelOp::Gt,
        RelOp::Le => RelOp::Ge,
        RelOp::Gt => RelOp::Lt,
        RelOp::Ge => RelOp::Le,
        o => o,
    };
    let lo_b = |o: RelOp| {
        if matches!(o, RelOp::Le | RelOp::Ge) {
            ('[', ']')
        } else {
            ('(', ')')
        }
    };
    match (parts, ops) {
        ([l, r], [op]) if inner_label(l) != inner_label(r) => {
            let (op, a) = if inner_label(l) {
                (*op, r)
            } else {
                (flip(*op), l)
            };
            if !is_constant(a) {
                return None;
            }
            let (open, close) = lo_b(op);
            match op {
                RelOp::Lt | RelOp::Le => Some(seq(open, neg(a), a.clone(), close)),
                RelOp::Gt | RelOp::Ge => Some(Node::Union(vec![
                    seq('(', neg(&inf), neg(a), close),
                    seq(open, a.clone(), inf, ')'),
                ])),
                _ => None,
            }
        }
        ([a, x, b], [o1, o2])
            if inner_label(x)
                && matches!(o1, RelOp::Lt | RelOp::Le)
                && matches!(o2, RelOp::Lt | RelOp::Le)
                && is_constant(a)
                && is_constant(b) =>
        {
            let (open, _) = lo_b(*o1);
            let (_, close) = lo_b(*o2);
            let mirror = |c: char| match c {
                '[' => ']',
                '(' => ')',
                ']' => '[',
                _ => '(',
            };
            Some(Node::Union(vec![
                seq(mirror(close), neg(b), neg(a), mirror(open)),
                seq(open, a.clone(), b.clone(), close),
            ]))
        }
        _ => None,
    }
}

/// The interval an inequality or membership describes: `a < x <= b`, `x >= 5`, `x \in [0, 1)`.
fn interval_of(parts: &[Node], ops: &[RelOp]) -> Option<Node> {
    let inf = Node::Const(Konst::Inf);
    let neg_inf = Node::Neg(Box::new(inf.clone()));
    let seq = |open: char, lo: &Node, hi: &Node, close: char| Node::Seq {
        open,
        close,
        items: vec![lo.clone(), hi.clone()],
    };
    let closed = |o: RelOp| matches!(o, RelOp::Le | RelOp::Ge);
    if let Some(iv) = abs_interval(parts, ops) {
        return Some(iv);
    }
    match (parts, ops) {
        ([x, set], [RelOp::In]) if expr::is_label(x) => Some(set.clone()),
        ([l, r], [op]) => {
            let (var_left, bound) = if expr::is_label(l) && !expr::is_label(r) {
                (true, r)
            } else if expr::is_label(r) && !expr::is_label(l) {
                (false, l)
            } else {
                return None;
            };
            // Normalise to `x op bound`.
            let op = if var_left {
                *op
            } else {
                match op {
                    RelOp::Lt => RelOp::Gt,
                    RelOp::Le => RelOp::Ge,
                    RelOp::Gt => RelOp::Lt,
                    RelOp::Ge => RelOp::Le,
                    o => *o,
                }
            };
            match op {
                RelOp::Lt | RelOp::Le => Some(seq(
                    '(',
                    &neg_inf,
                    bound,
                    if closed(op) { ']' } else { ')' },
                )),
                RelOp::Gt | RelOp::Ge => {
                    Some(seq(if closed(op) { '[' } else { '(' }, bound, &inf, ')'))
                }
                _ => None,
            }
        }
        ([a, x, b], [o1, o2]) if expr::is_label(x) => {
            let lower = |o: RelOp| matches!(o, RelOp::Lt | RelOp::Le);
            let upper = |o: RelOp| matches!(o, RelOp::Gt | RelOp::Ge);
            if lower(*o1) && lower(*o2) {
                Some(seq(
                    if closed(*o1) { '[' } else { '(' },
                    a,
                    b,
                    if closed(*o2) { ']' } else { ')' },
                ))
            } else if upper(*o1) && upper(*o2) {
                Some(seq(
                    if closed(*o2) { '[' } else { '(' },
                    b,
                    a,
                    if closed(*o1) { ']' } else { ')' },
                ))
            } else {
                None
            }
        }
        _ => None,
    }
}
