//! Expression trees: a recursive-descent parser over [`Token`]s and two evaluators.
//!
//! [`parse`] builds a [`Node`] for numbers, expressions, relations (`x = 3`, `a < x \le b`),
//! tuples and intervals ([`Node::Seq`]), sets, bare lists, unions, ratios and matrices, plus
//! tree helpers ([`with_sign`] for `\pm`, [`free_vars`], [`is_label`]). Evaluation lives in
//! [`crate::eval`]. Recursion is bounded by [`ParseOptions::max_depth`], so hostile input fails
//! cleanly instead of overflowing the stack. About a quarter of the file is its unit tests.

use crate::normalize::{Fun, RelOp, Tok, Token};
use crate::number::Rational;

/// The sign in front of a term of a sum.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sign {
    /// `+`
    Plus,
    /// `-`
    Minus,
    /// `\pm`
    Pm,
    /// `\mp`
    Mp,
}

/// A named constant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Konst {
    /// π
    Pi,
    /// Euler's number.
    E,
    /// The imaginary unit.
    I,
    /// ∞
    Inf,
}

/// A parsed answer.
#[derive(Clone, Debug, PartialEq)]
pub enum Node {
    /// An exact literal and its significant digits when written with a decimal point (else 0).
    Num(Rational, u32),
    /// A literal too large for [`Rational`], with its significant digits.
    Float(f64, u32),
    /// A variable or an opaque symbol.
    Var(String),
    /// A subscripted symbol `a_{n}`: a function of its index.
    Indexed(String, Box<Self>),
    /// A constant.
    Const(Konst),
    /// Negation.
    Neg(Box<Self>),
    /// A sum of signed terms.
    Add(Vec<(Sign, Self)>),
    /// A product; `true` marks a divisor.
    Mul(Vec<(bool, Self)>),
    /// Power.
    Pow(Box<Self>, Box<Self>),
    /// A function application (`log` takes an optional second argument, the base).
    Func(Fun, Vec<Self>),
    /// `\sqrt[n]{x}`: radicand and index.
    Root(Box<Self>, Box<Self>),
    /// Factorial.
    Fact(Box<Self>),
    /// A value followed by `%`.
    Percent(Box<Self>),
    /// A value in degrees (`60^\circ`, `60°`): `π/180` times it.
    Degrees(Box<Self>),
    /// `|x|`
    Abs(Box<Self>),
    /// `\lfloor x \rfloor`
    Floor(Box<Self>),
    /// `\lceil x \rceil`
    Ceil(Box<Self>),
    /// `\binom{n}{k}`
    Binom(Box<Self>, Box<Self>),
    /// `\sum_{var=lo}^{hi} body` (or `\prod` when `prod`).
    BigOp {
        /// Bound variable.
        var: String,
        /// Lower bound.
        lo: Box<Self>,
        /// Upper bound.
        hi: Box<Self>,
        /// Summand.
        body: Box<Self>,
        /// Product instead of sum.
        prod: bool,
    },
    /// A bracketed sequence: tuple `(a,b)`, interval `[a,b)`.
    Seq {
        /// Opening bracket.
        open: char,
        /// Closing bracket.
        close: char,
        /// Items.
        items: Vec<Self>,
    },
    /// `\{a, b\}`
    Set(Vec<Self>),
    /// An unbracketed list `a, b and c`.
    Bare(Vec<Self>),
    /// `A \cup B`
    Union(Vec<Self>),
    /// `a:b`
    Ratio(Vec<Self>),
    /// A matrix, row-major.
    Matrix(Vec<Vec<Self>>),
    /// A relation chain `parts[0] ops[0] parts[1] …`.
    Rel {
        /// The sides.
        parts: Vec<Self>,
        /// The relations between consecutive sides.
        ops: Vec<RelOp>,
    },
    /// A word or phrase.
    Text(String),
}

/// Parser settings.
#[derive(Clone, Copy, Debug)]
pub struct ParseOptions {
    /// `e` is Euler's number.
    pub e_is_euler: bool,
    /// `i` is the imaginary unit.
    pub i_is_imaginary: bool,
    /// `3\frac{1}{2}` and `3 1/2` are mixed numbers (3.5).
    pub mixed_numbers: bool,
    /// Nesting limit.
    pub max_depth: u32,
    /// Words after a value are units and dropped.
    pub strip_units: bool,
}

type R<T> = Result<T, ()>;

struct Parser<'a> {
    t: &'a [Token],
    pos: usize,
    depth: u32,
    abs_depth: u32,
    opts: ParseOptions,
}

/// Parses a whole token stream; `None` when it is not a well-formed answer.
pub fn parse(tokens: &[Token], opts: &ParseOptions) -> Option<Node> {
    if tokens.is_empty() {
        return None;
    }
    let mut p = Parser {
        t: tokens,
        pos: 0,
        depth: 0,
        abs_depth: 0,
        opts: *opts,
    };
    let node = p.list().ok()?;
    (p.pos == tokens.len()).then_some(node)
}

fn boxed(n: Node) -> Box<Node> {
    Box::new(n)
}

impl Parser<'_> {
    fn peek(&self) -> Option<&Tok> {
        self.t.get(self.pos).map(|t| &t.tok)
    }

    fn peek_at(&self, k: usize) -> Option<&Tok> {
        self.t.get(self.pos + k).map(|t| &t.tok)
    }

    fn bump(&mut self) {
        self.pos += 1;
    }

    fn eat(&mut self, tok: &Tok) -> bool {
        if self.peek() == Some(tok) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn enter(&mut self) -> R<()> {
        self.depth += 1;
        if self.depth > self.opts.max_depth {
            Err(())
        } else {
            Ok(())
        }
    }

    fn leave(&mut self) {
        self.depth -= 1;
    }

    fn at_terminator(&self) -> bool {
        match self.peek() {
            None => true,
            Some(
                Tok::Close(_) | Tok::RBrace | Tok::SetClose | Tok::EndMat | Tok::Amp | Tok::RowSep,
            ) => true,
            Some(Tok::Floor(false) | Tok::Ceil(false)) => true,
            Some(Tok::Bar) => self.abs_depth > 0,
            _ => false,
        }
    }

    /// Items separated by `,` / `and` / `or`, grouped by `;`.
    fn list(&mut self) -> R<Node> {
        let mut groups: Vec<Vec<Node>> = vec![Vec::new()];
        loop {
            while let Some(t @ (Tok::Comma | Tok::Sep | Tok::Semi)) = self.peek() {
                if *t == Tok::Semi && groups.last().is_some_and(|g| !g.is_empty()) {
                    groups.push(Vec::new());
                }
                self.bump();
            }
            if self.at_terminator() {
                break;
            }
            let item = self.rel()?;
            if let Some(g) = groups.last_mut() {
                g.push(item);
            }
            match self.peek() {
                Some(Tok::Comma | Tok::Sep | Tok::Semi) => {}
                _ => break,
            }
        }
        let mut groups: Vec<Node> = groups
            .into_iter()
            .filter(|g| !g.is_empty())
            .map(|mut g| {
                if g.len() == 1 {
                    g.pop().expect("one item")
                } else {
                    Node::Bare(g)
                }
            })
            .collect();
        match groups.len() {
            0 => Err(()),
            1 => Ok(groups.pop().expect("one group")),
            _ => Ok(Node::Bare(groups)),
        }
    }

    fn rel(&mut self) -> R<Node> {
        while matches!(self.peek(), Some(Tok::Rel(_))) {
            self.bump();
        }
        let mut parts = vec![self.ratio()?];
        let mut ops = Vec::new();
        while let Some(Tok::Rel(op)) = self.peek() {
            let op = *op;
            self.bump();
            if self.at_terminator()
                || matches!(self.peek(), Some(Tok::Comma | Tok::Sep | Tok::Semi))
            {
                break;
            }
            ops.push(op);
            parts.push(self.ratio()?);
        }
        if ops.is_empty() {
            Ok(parts.pop().expect("one part"))
        } else {
            Ok(Node::Rel { parts, ops })
        }
    }

    fn ratio(&mut self) -> R<Node> {
        let mut items = vec![self.union()?];
        while self.eat(&Tok::Colon) {
            items.push(self.union()?);
        }
        Ok(if items.len() == 1 {
            items.pop().expect("one item")
        } else {
            Node::Ratio(items)
        })
    }

    fn union(&mut self) -> R<Node> {
        let mut items = vec![self.add()?];
        while self.eat(&Tok::Cup) {
            items.push(self.add()?);
        }
        if items.len() == 1 && self.eat(&Tok::Setminus) {
            let removed = self.add()?;
            return reals_without(&items[0], &removed).ok_or(());
        }
        Ok(if items.len() == 1 {
            items.pop().expect("one item")
        } else {
            Node::Union(items)
        })
    }

    fn add(&mut self) -> R<Node> {
        let mut terms = vec![(Sign::Plus, self.mul()?)];
        loop {
            let sign = match self.peek() {
                Some(Tok::Plus) => Sign::Plus,
                Some(Tok::Minus) => Sign::Minus,
                Some(Tok::Pm) => Sign::Pm,
                Some(Tok::Mp) => Sign::Mp,
                _ => break,
            };
            self.bump();
            terms.push((sign, self.mul()?));
        }
        if terms.len() == 1 {
            return Ok(terms.pop().expect("one term").1);
        }
        Ok(Node::Add(terms))
    }

    fn starts_factor(&self) -> bool {
        match self.peek() {
            Some(
                Tok::Num(_)
                | Tok::Vulgar(..)
                | Tok::Ident(_)
                | Tok::Pi
                | Tok::Inf
                | Tok::Frac
                | Tok::Sqrt
                | Tok::Binom
                | Tok::Func(_)
                | Tok::BigOp(_)
                | Tok::Open('(')
                | Tok::LBrace
                | Tok::Floor(true)
                | Tok::Ceil(true)
                | Tok::BeginMat,
            ) => true,
            Some(Tok::Bar) => self.abs_depth == 0,
            _ => false,
        }
    }

    fn mul(&mut self) -> R<Node> {
        let mut factors = vec![(false, self.unary()?)];
        loop {
            match self.peek() {
                Some(Tok::Times) => {
                    self.bump();
                    factors.push((false, self.unary()?));
                }
                Some(Tok::Divide) => {
                    self.bump();
                    factors.push((true, self.unary()?));
                }
                _ if self.starts_factor() => factors.push((false, self.pow()?)),
                _ => break,
            }
        }
        if factors.len() == 1 {
            return Ok(factors.pop().expect("one factor").1);
        }
        Ok(Node::Mul(factors))
    }

    fn unary(&mut self) -> R<Node> {
        self.enter()?;
        let r = match self.peek() {
            Some(Tok::Minus) => {
                self.bump();
                self.unary().map(|n| Node::Neg(boxed(n)))
            }
            Some(Tok::Plus) => {
                self.bump();
                self.unary()
            }
            Some(Tok::Pm | Tok::Mp) => {
                let sign = if self.peek() == Some(&Tok::Pm) {
                    Sign::Pm
                } else {
                    Sign::Mp
                };
                self.bump();
                self.unary().map(|n| Node::Add(vec![(sign, n)]))
            }
            _ => self.pow(),
        };
        self.leave();
        r
    }

    fn pow(&mut self) -> R<Node> {
        let base = self.postfix()?;
        if self.eat(&Tok::Caret) {
            let e = self.exponent()?;
            return Ok(Node::Pow(boxed(base), boxed(e)));
        }
        Ok(base)
    }

    fn exponent(&mut self) -> R<Node> {
        self.enter()?;
        let r = (|| {
            let atom = match self.peek() {
                Some(Tok::Minus) => {
                    self.bump();
                    return self.exponent().map(|n| Node::Neg(boxed(n)));
                }
                Some(Tok::Plus) => {
                    self.bump();
                    return self.exponent();
                }
                _ => self.postfix()?,
            };
            if self.eat(&Tok::Caret) {
                let e = self.exponent()?;
                return Ok(Node::Pow(boxed(atom), boxed(e)));
            }
            Ok(atom)
        })();
        self.leave();
        r
    }

    fn postfix(&mut self) -> R<Node> {
        let mut n = self.primary()?;
        loop {
            match self.peek() {
                Some(Tok::Bang) => {
                    self.bump();
                    n = Node::Fact(boxed(n));
                }
                Some(Tok::Percent) => {
                    self.bump();
                    n = Node::Percent(boxed(n));
                }
                Some(Tok::Degree) => {
                    self.bump();
                    n = Node::Degrees(boxed(n));
                }
                Some(Tok::Prime) => {
                    self.bump();
                    if let Node::Var(name) = &n {
                        n = Node::Var(format!("{name}'"));
                    }
                }
                Some(Tok::Under) => {
                    self.bump();
                    let sub = self.arg()?;
                    n = match n {
                        Node::Var(name) => Node::Indexed(name, boxed(sub)),
                        Node::Num(r, 0) => match (&sub, r.is_integer()) {
                            (Node::Num(b, 0), true) => {
                                base_convert(r, *b).unwrap_or(Node::Num(r, 0))
                            }
                            _ => Node::Num(r, 0),
                        },
                        other => other,
                    };
                }
                // A word right after a value is a unit.
                Some(Tok::Word(_))
                    if self.opts.strip_units && !matches!(n, Node::Var(_) | Node::Text(_)) =>
                {
                    self.bump()
                }
                _ => break,
            }
        }
        Ok(n)
    }

    /// A macro argument: a `{..}` group or a single primary.
    fn arg(&mut self) -> R<Node> {
        if self.eat(&Tok::LBrace) {
            let n = self.list()?;
            if !self.eat(&Tok::RBrace) {
                return Err(());
            }
            return Ok(n);
        }
        self.primary()
    }

    fn integer_lit(n: &Node) -> Option<Rational> {
        match n {
            Node::Num(r, 0) if r.is_integer() => Some(*r),
            _ => None,
        }
    }

    fn mixed(&mut self, whole: Rational) -> R<Option<Rational>> {
        let proper = |a: Rational, b: Rational| {
            (a > Rational::ZERO && a < b)
                .then(|| whole.add(a.div(b)?))
                .flatten()
        };
        match self.peek() {
            Some(Tok::Vulgar(a, b)) => {
                let (a, b) = (Rational::int(i128::from(*a)), Rational::int(i128::from(*b)));
                self.bump();
                Ok(proper(a, b))
            }
            Some(Tok::Frac) => {
                let save = self.pos;
                self.bump();
                let a = self.arg()?;
                let b = self.arg()?;
                if let (Some(a), Some(b)) = (Self::integer_lit(&a), Self::integer_lit(&b))
                    && let Some(v) = proper(a, b)
                {
                    return Ok(Some(v));
                }
                self.pos = save;
                Ok(None)
            }
            Some(Tok::Num(a))
                if self.t[self.pos].space && self.peek_at(1) == Some(&Tok::Divide) =>
            {
                let (Some(Tok::Num(b)), false) = (
                    self.peek_at(2),
                    matches!(
                        self.peek_at(3),
                        Some(Tok::Caret | Tok::Num(_) | Tok::Ident(_) | Tok::Open(_))
                    ),
                ) else {
                    return Ok(None);
                };
                let (Ok(a), Ok(b)) = (a.parse::<i128>(), b.parse::<i128>()) else {
                    return Ok(None);
                };
                if let Some(v) = proper(Rational::int(a), Rational::int(b)) {
                    self.pos += 3;
                    return Ok(Some(v));
                }
                Ok(None)
            }
            _ => Ok(None),
        }
    }

    fn primary(&mut self) -> R<Node> {
        self.enter()?;
        let r = self.primary_inner();
        self.leave();
        r
    }

    fn primary_inner(&mut self) -> R<Node> {
        let Some(tok) = self.peek().cloned() else {
            return Err(());
        };
        self.bump();
        match tok {
            Tok::Num(s) => {
                let node = match Rational::parse_decimal(&s) {
                    Some((r, sig)) => Node::Num(r, sig),
                    None => {
                        let f: f64 = s.parse().map_err(|_| ())?;
                        let sig = s
                            .trim_start_matches(['0', '.'])
                            .chars()
                            .filter(char::is_ascii_digit)
                            .count();
                        Node::Float(f, sig as u32)
                    }
                };
                if self.opts.mixed_numbers
                    && let Node::Num(whole, 0) = node
                    && whole.is_integer()
                    && let Some(v) = self.mixed(whole)?
                {
                    return Ok(Node::Num(v, 0));
                }
                Ok(node)
            }
            Tok::Vulgar(a, b) => Rational::new(i128::from(a), i128::from(b))
                .map(|r| Node::Num(r, 0))
                .ok_or(()),
            Tok::Ident(name) => Ok(match name.as_str() {
                "e" if self.opts.e_is_euler => Node::Const(Konst::E),
                "i" if self.opts.i_is_imaginary => Node::Const(Konst::I),
                _ => Node::Var(name),
            }),
            Tok::Pi => Ok(Node::Const(Konst::Pi)),
            Tok::Inf => Ok(Node::Const(Konst::Inf)),
            Tok::Frac => {
                let a = self.arg()?;
                let b = self.arg()?;
                Ok(Node::Mul(vec![(false, a), (true, b)]))
            }
            Tok::Sqrt => {
                let mut index = None;
                if self.eat(&Tok::Open('[')) {
                    let n = self.list()?;
                    if !self.eat(&Tok::Close(']')) {
                        return Err(());
                    }
                    index = Some(n);
                }
                let x = if self.peek() == Some(&Tok::Open('(')) {
                    self.postfix()?
                } else {
                    self.arg()?
                };
                Ok(match index {
                    Some(n) => Node::Root(boxed(x), boxed(n)),
                    None => Node::Func(Fun::Sqrt, vec![x]),
                })
            }
            Tok::Binom => {
                let n = self.arg()?;
                let k = self.arg()?;
                Ok(Node::Binom(boxed(n), boxed(k)))
            }
            Tok::Func(f) => self.function(f),
            Tok::BigOp(prod) => {
                if !self.eat(&Tok::Under) {
                    return Err(());
                }
                let (var, lo) = match self.arg()? {
                    Node::Rel { mut parts, ops } if ops == [RelOp::Eq] && parts.len() == 2 => {
                        let lo = parts.pop().expect("two parts");
                        match parts.pop() {
                            Some(Node::Var(v)) => (v, lo),
                            _ => return Err(()),
                        }
                    }
                    _ => return Err(()),
                };
                if !self.eat(&Tok::Caret) {
                    return Err(());
                }
                let hi = self.arg()?;
                let body = self.mul()?;
                Ok(Node::BigOp {
                    var,
                    lo: boxed(lo),
                    hi: boxed(hi),
                    body: boxed(body),
                    prod,
                })
            }
            Tok::Open(open) => self.sequence(open),
            Tok::LBrace => {
                let n = self.list()?;
                if !self.eat(&Tok::RBrace) {
                    return Err(());
                }
                Ok(n)
            }
            Tok::SetOpen => {
                let items = if self.peek() == Some(&Tok::SetClose) {
                    Vec::new()
                } else {
                    match self.list()? {
                        Node::Bare(items) => items,
                        one => vec![one],
                    }
                };
                if !self.eat(&Tok::SetClose) {
                    return Err(());
                }
                Ok(Node::Set(items))
            }
            Tok::Bar => {
                self.abs_depth += 1;
                let inner = self.add();
                self.abs_depth -= 1;
                let inner = inner?;
                if !self.eat(&Tok::Bar) {
                    return Err(());
                }
                Ok(Node::Abs(boxed(inner)))
            }
            Tok::Floor(true) | Tok::Ceil(true) => {
                let inner = self.add()?;
                let floor = tok == Tok::Floor(true);
                if !self.eat(&if floor {
                    Tok::Floor(false)
                } else {
                    Tok::Ceil(false)
                }) {
                    return Err(());
                }
                Ok(if floor {
                    Node::Floor(boxed(inner))
                } else {
                    Node::Ceil(boxed(inner))
                })
            }
            Tok::BeginMat => self.matrix(),
            Tok::Word(w) => Ok(Node::Var(w)),
            _ => Err(()),
        }
    }

    fn function(&mut self, f: Fun) -> R<Node> {
        let mut power = None;
        let mut base = None;
        loop {
            if self.eat(&Tok::Caret) {
                power = Some(self.exponent()?);
            } else if self.eat(&Tok::Under) {
                base = Some(self.arg()?);
            } else {
                break;
            }
        }
        let mut args = if self.eat(&Tok::Open('(')) {
            let inner = self.list()?;
            if !self.eat(&Tok::Close(')')) {
                return Err(());
            }
            match inner {
                Node::Bare(items) => items,
                one => vec![one],
            }
        } else if self.peek() == Some(&Tok::LBrace) {
            vec![self.arg()?]
        } else {
            vec![self.pow()?]
        };
        if let Some(b) = base {
            args.push(b);
        }
        let inverse = matches!(&power, Some(Node::Neg(one)) if matches!(**one, Node::Num(r, 0) if r == Rational::ONE));
        let f = match (f, inverse) {
            (Fun::Sin, true) => Fun::Asin,
            (Fun::Cos, true) => Fun::Acos,
            (Fun::Tan, true) => Fun::Atan,
            _ => f,
        };
        let node = Node::Func(f, args);
        Ok(match power {
            Some(p) if !inverse || !matches!(f, Fun::Asin | Fun::Acos | Fun::Atan) => {
                Node::Pow(boxed(node), boxed(p))
            }
            _ => node,
        })
    }

    fn sequence(&mut self, open: char) -> R<Node> {
        let mut items = Vec::new();
        let mut commas = 0;
        let close = loop {
            match self.peek() {
                Some(Tok::Close(c)) => {
                    let c = *c;
                    self.bump();
                    break c;
                }
                None => return Err(()),
                Some(Tok::Comma | Tok::Semi | Tok::Sep) => {
                    commas += 1;
                    self.bump();
                }
                _ => {
                    items.push(self.rel()?);
                    if !matches!(
                        self.peek(),
                        Some(Tok::Comma | Tok::Semi | Tok::Sep | Tok::Close(_))
                    ) {
                        return Err(());
                    }
                }
            }
        };
        if items.len() == 1 && commas == 0 && (open == '(') == (close == ')') {
            return Ok(items.pop().expect("one item"));
        }
        Ok(Node::Seq { open, close, items })
    }

    fn matrix(&mut self) -> R<Node> {
        let mut rows = Vec::new();
        let mut row = Vec::new();
        loop {
            match self.peek() {
                None => break,
                Some(Tok::EndMat) => {
                    self.bump();
                    break;
                }
                Some(Tok::RowSep) => {
                    self.bump();
                    if !row.is_empty() {
                        rows.push(std::mem::take(&mut row));
                    }
                }
                Some(Tok::Amp) => self.bump(),
                _ => row.push(self.rel()?),
            }
        }
        if !row.is_empty() {
            rows.push(row);
        }
        Ok(Node::Matrix(rows))
    }
}

/// `\mathbb{R} \setminus [a, b]` (or `\setminus \{a\}`) as a union of intervals; `None` for
/// any other set difference.
fn reals_without(set: &Node, removed: &Node) -> Option<Node> {
    if !matches!(set, Node::Var(name) if name == "R") {
        return None;
    }
    let inf = Node::Const(Konst::Inf);
    let neg_inf = Node::Neg(boxed(inf.clone()));
    let (lo, hi, lo_closed, hi_closed) = match removed {
        Node::Seq { open, close, items } if items.len() == 2 => {
            (&items[0], &items[1], *open == '[', *close == ']')
        }
        Node::Set(items) if items.len() == 1 => (&items[0], &items[0], true, true),
        _ => return None,
    };
    let unbounded = |n: &Node, negative: bool| match n {
        Node::Const(Konst::Inf) => !negative,
        Node::Neg(x) => matches!(**x, Node::Const(Konst::Inf)) && negative,
        _ => false,
    };
    let mut pieces = Vec::new();
    if !unbounded(lo, true) {
        pieces.push(Node::Seq {
            open: '(',
            close: if lo_closed { ')' } else { ']' },
            items: vec![neg_inf, lo.clone()],
        });
    }
    if !unbounded(hi, false) {
        pieces.push(Node::Seq {
            open: if hi_closed { '(' } else { '[' },
            close: ')',
            items: vec![hi.clone(), inf],
        });
    }
    match pieces.len() {
        0 => Some(Node::Set(Vec::new())),
        1 => pieces.pop(),
        _ => Some(Node::Union(pieces)),
    }
}

fn base_convert(value: Rational, base: Rational) -> Option<Node> {
    let b = u32::try_from(base.numer())
        .ok()
        .filter(|b| (2..=36).contains(b) && base.is_integer())?;
    let digits = value.numer().to_string();
    let v = i128::from_str_radix(&digits, b).ok()?;
    Some(Node::Num(Rational::int(v), 0))
}

/// Replaces every `\pm` by `+` (or `-` when `plus` is false) and `\mp` by the opposite.
pub fn with_sign(n: &Node, plus: bool) -> Node {
    let map = |v: &[Node]| v.iter().map(|x| with_sign(x, plus)).collect::<Vec<_>>();
    match n {
        Node::Add(terms) => Node::Add(
            terms
                .iter()
                .map(|(s, t)| {
                    let s = match (s, plus) {
                        (Sign::Pm, true) | (Sign::Mp, false) => Sign::Plus,
                        (Sign::Pm, false) | (Sign::Mp, true) => Sign::Minus,
                        (s, _) => *s,
                    };
                    (s, with_sign(t, plus))
                })
                .collect(),
        ),
        Node::Neg(a) => Node::Neg(boxed(with_sign(a, plus))),
        Node::Mul(f) => Node::Mul(f.iter().map(|(d, x)| (*d, with_sign(x, plus))).collect()),
        Node::Pow(a, b) => Node::Pow(boxed(with_sign(a, plus)), boxed(with_sign(b, plus))),
        Node::Func(f, a) => Node::Func(*f, map(a)),
        Node::Root(a, b) => Node::Root(boxed(with_sign(a, plus)), boxed(with_sign(b, plus))),
        Node::Percent(a) => Node::Percent(boxed(with_sign(a, plus))),
        Node::Degrees(a) => Node::Degrees(boxed(with_sign(a, plus))),
        Node::Abs(a) => Node::Abs(boxed(with_sign(a, plus))),
        Node::Seq { open, close, items } => Node::Seq {
            open: *open,
            close: *close,
            items: map(items),
        },
        Node::Rel { parts, ops } => Node::Rel {
            parts: map(parts),
            ops: ops.clone(),
        },
        other => other.clone(),
    }
}

/// Whether `\pm` or `\mp` occurs anywhere in `n`.
pub fn has_pm(n: &Node) -> bool {
    let mut found = false;
    visit(n, &mut |x| {
        if let Node::Add(t) = x {
            found |= t.iter().any(|(s, _)| matches!(s, Sign::Pm | Sign::Mp));
        }
    });
    found
}

/// Calls `f` on `n` and every node below it (iteratively, so depth is not a concern).
pub fn visit(n: &Node, f: &mut impl FnMut(&Node)) {
    let mut stack = vec![n];
    while let Some(x) = stack.pop() {
        f(x);
        match x {
            Node::Indexed(_, a)
            | Node::Neg(a)
            | Node::Fact(a)
            | Node::Percent(a)
            | Node::Degrees(a)
            | Node::Abs(a) => stack.push(a),
            Node::Floor(a) | Node::Ceil(a) => stack.push(a),
            Node::Pow(a, b) | Node::Root(a, b) | Node::Binom(a, b) => stack.extend([&**a, &**b]),
            Node::Add(t) => stack.extend(t.iter().map(|(_, x)| x)),
            Node::Mul(t) => stack.extend(t.iter().map(|(_, x)| x)),
            Node::Func(_, a) | Node::Set(a) | Node::Bare(a) | Node::Union(a) | Node::Ratio(a) => {
                stack.extend(a)
            }
            Node::Seq { items, .. } => stack.extend(items),
            Node::Rel { parts, .. } => stack.extend(parts),
            Node::Matrix(rows) => stack.extend(rows.iter().flatten()),
            Node::BigOp { lo, hi, body, .. } => stack.extend([&**lo, &**hi, &**body]),
            _ => {}
        }
    }
}

/// Free variable names in `n` (subscripted symbols count by name).
pub fn free_vars(n: &Node) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    visit(n, &mut |x| {
        if let Node::Var(v) | Node::Indexed(v, _) = x
            && !out.contains(v)
        {
            out.push(v.clone());
        }
    });
    out
}

/// Whether a relation side names something (`x`, `f(x)`, `|AB|`, `a_{37}`, `(p, q)`) rather
/// than states a value: it has a symbol and no number outside subscripts.
pub fn is_label(n: &Node) -> bool {
    fn walk(n: &Node, has_symbol: &mut bool) -> bool {
        match n {
            Node::Var(_) | Node::Indexed(..) | Node::Text(_) => {
                *has_symbol = true;
                true
            }
            Node::Num(..) | Node::Float(..) | Node::Const(_) => false,
            Node::Neg(a) | Node::Abs(a) | Node::Fact(a) => walk(a, has_symbol),
            Node::Add(t) => t.iter().all(|(_, x)| walk(x, has_symbol)),
            Node::Mul(t) => t.iter().all(|(_, x)| walk(x, has_symbol)),
            Node::Pow(a, b) => walk(a, has_symbol) && walk(b, has_symbol),
            Node::Func(_, a) | Node::Ratio(a) | Node::Bare(a) => {
                a.iter().all(|x| walk(x, has_symbol))
            }
            Node::Seq {
                open: '(', items, ..
            } => items.iter().all(|x| walk(x, has_symbol)),
            _ => false,
        }
    }
    let mut has_symbol = false;
    walk(n, &mut has_symbol) && has_symbol
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::{eval, exact};
    use crate::normalize::lex;
    use crate::number::Complex;

    const OPTS: ParseOptions = ParseOptions {
        e_is_euler: true,
        i_is_imaginary: true,
        mixed_numbers: true,
        max_depth: 200,
        strip_units: true,
    };

    fn p(s: &str) -> Node {
        parse(&lex(s, true), &OPTS).unwrap_or_else(|| panic!("parse {s}"))
    }

    fn ex(s: &str) -> Option<Rational> {
        exact(&p(s))
    }

    fn q(a: i128, b: i128) -> Option<Rational> {
        Rational::new(a, b)
    }

    #[test]
    fn exact_arithmetic() {
        assert_eq!(ex("\\frac{10}{9}"), q(10, 9));
        assert_eq!(ex("\\frac12"), q(1, 2));
        assert_eq!(ex("\\frac3{3}"), q(1, 1));
        assert_eq!(ex("-\\frac{1}{2}+3"), q(5, 2));
        assert_eq!(ex("2^{10}"), q(1024, 1));
        assert_eq!(ex("-2^2"), q(-4, 1));
        assert_eq!(ex("6.02\\times10^{23}"), q(602 * 10i128.pow(21), 1));
        assert_eq!(ex("5!"), q(120, 1));
        assert_eq!(ex("\\binom{5}{2}"), q(10, 1));
        assert_eq!(ex("25\\%"), q(1, 4));
        assert_eq!(ex("(9+1)"), q(10, 1));
    }

    #[test]
    fn mixed_numbers() {
        assert_eq!(ex("3\\frac{1}{2}"), q(7, 2));
        assert_eq!(ex("-3\\frac12"), q(-7, 2));
        assert_eq!(ex("3 1/2"), q(7, 2));
        assert_eq!(ex("1½"), q(3, 2));
        assert_eq!(ex("2\\frac{3}{2}"), q(3, 1));
    }

    #[test]
    fn base_subscripts() {
        assert_eq!(ex("204_5"), q(54, 1));
        assert_eq!(
            ex("1112112_3"),
            Some(Rational::int(729 + 243 + 81 + 2 * 27 + 9 + 3 + 2))
        );
    }

    #[test]
    fn structures() {
        assert!(matches!(
            p("[0,1)"),
            Node::Seq {
                open: '[',
                close: ')',
                ..
            }
        ));
        assert!(matches!(p("\\{1,2\\}"), Node::Set(v) if v.len() == 2));
        assert!(matches!(p("1, 2 and 3"), Node::Bare(v) if v.len() == 3));
        assert!(matches!(p("x = 3"), Node::Rel { .. }));
        assert!(
            matches!(p("\\begin{pmatrix}1 & 2 \\\\ 3 & 4\\end{pmatrix}"), Node::Matrix(r) if r.len() == 2)
        );
        assert!(matches!(p("(1,2) \\cup [3,4]"), Node::Union(v) if v.len() == 2));
    }

    #[test]
    fn evaluates_functions() {
        let v = eval(&p("\\sin^2(x)+\\cos^2(x)"), 7, 10_000).expect("value");
        assert!(v.close(Complex::real(1.0), 1e-12));
        let v = eval(&p("e^{i\\pi}"), 1, 10_000).expect("value");
        assert!(v.close(Complex::real(-1.0), 1e-12));
        let v = eval(&p("\\sqrt[3]{27}"), 1, 10_000).expect("value");
        assert!(v.close(Complex::real(3.0), 1e-12));
        let v = eval(&p("\\sum_{k=1}^{4} k"), 1, 10_000).expect("value");
        assert!(v.close(Complex::real(10.0), 1e-12));
        let v = eval(&p("\\log_2 8"), 1, 10_000).expect("value");
        assert!(v.close(Complex::real(3.0), 1e-12));
    }

    #[test]
    fn labels() {
        assert!(is_label(&p("f(x)")));
        assert!(is_label(&p("a_{37}")));
        assert!(is_label(&p("\\frac{NO}{BO}")));
        assert!(!is_label(&p("2x+1")));
        assert!(!is_label(&p("7")));
    }

    #[test]
    fn depth_is_bounded() {
        let deep = format!("{}1{}", "(".repeat(5000), ")".repeat(5000));
        assert!(parse(&lex(&deep, true), &OPTS).is_none());
        let tower = vec!["2"; 3000].join("^");
        assert!(parse(&lex(&tower, true), &OPTS).is_none());
    }
}
