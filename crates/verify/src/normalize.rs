//! Normalisation: turns an answer string (LaTeX, plain text or unicode math) into [`Token`]s.
//!
//! This is where notation is unified: `\dfrac`/`\tfrac`/`\cfrac` become `\frac`, thousands
//! separators (commas, spaces, thin spaces U+2009/U+202F, `\,`, `{,}`, `,\!`) are dropped inside
//! numbers, `\text{..}` units (`cm`, `km/h`), currency signs and spacing commands disappear, a
//! degree mark after a value becomes [`Tok::Degree`], `\emptyset`/`\varnothing` become `\{\}`,
//! percent words become [`Tok::Percent`], and unicode (½ √ π ° × ÷ − ≤ …) maps to the same
//! tokens as LaTeX. [`number_words`] reads English number words.
//! The lexer is iterative and linear in the input; nested `\text{}` is re-lexed at most
//! three levels deep. The file runs past 800 lines because the LaTeX command, unit and unicode
//! tables are one entry per line; they are the lexer's data and read best next to it.

/// How deep `\text{..}` contents are re-lexed inline.
const MAX_TEXT_NESTING: u32 = 3;

/// A relation between two sides.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RelOp {
    /// `=`
    Eq,
    /// `<`
    Lt,
    /// `\le`
    Le,
    /// `>`
    Gt,
    /// `\ge`
    Ge,
    /// `\ne`
    Ne,
    /// `\approx`
    Approx,
    /// `\in`
    In,
    /// `\Rightarrow`, `\to`
    Implies,
}

/// A named function.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[expect(missing_docs, reason = "names are the functions")]
pub enum Fun {
    Sin,
    Cos,
    Tan,
    Sec,
    Csc,
    Cot,
    Asin,
    Acos,
    Atan,
    Sinh,
    Cosh,
    Tanh,
    Ln,
    Log,
    Exp,
    Sqrt,
    Gcd,
    Lcm,
    Max,
    Min,
}

/// A lexical token of an answer.
#[derive(Clone, Debug, PartialEq)]
#[expect(missing_docs, reason = "variants are self-describing tokens")]
pub enum Tok {
    /// A decimal literal with separators removed (`1000.5`, `6e-3`).
    Num(String),
    /// A unicode vulgar fraction such as ½.
    Vulgar(u8, u8),
    /// A one-letter variable, a greek name, or an unknown command such as `\zzz`.
    Ident(String),
    Func(Fun),
    Pi,
    Inf,
    Frac,
    Sqrt,
    Binom,
    /// `\sum` (false) or `\prod` (true).
    BigOp(bool),
    Plus,
    Minus,
    Times,
    Divide,
    Caret,
    Under,
    Bang,
    Colon,
    Prime,
    Pm,
    Mp,
    Rel(RelOp),
    Comma,
    Semi,
    /// The words `and` / `or` between items.
    Sep,
    Open(char),
    Close(char),
    LBrace,
    RBrace,
    SetOpen,
    SetClose,
    Bar,
    Floor(bool),
    Ceil(bool),
    Percent,
    /// A degree mark `^\circ` or `°` after a value.
    Degree,
    Amp,
    RowSep,
    BeginMat,
    EndMat,
    Cup,
    Cap,
    Setminus,
    Ellipsis,
    /// A word from `\text{..}` or plain text (a unit or a label).
    Word(String),
    Other(char),
}

/// A token and whether whitespace preceded it.
#[derive(Clone, Debug, PartialEq)]
pub struct Token {
    /// The token.
    pub tok: Tok,
    /// Whitespace (or a spacing command) came right before it.
    pub space: bool,
}

/// Replaces `\\cmd` (a doubled backslash before a known command, left by raw-string escaping)
/// with `\cmd`, and `\dfrac`-style variants are left to the lexer.
pub fn fix_doubled_backslashes(s: &str) -> String {
    if !s.contains("\\\\") {
        return s.to_string();
    }
    let b = s.as_bytes();
    let mut out = String::with_capacity(s.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 1 < b.len() && b[i + 1] == b'\\' {
            let start = i + 2;
            let mut end = start;
            while end < b.len() && b[end].is_ascii_alphabetic() {
                end += 1;
            }
            if end > start && command(&s[start..end]).is_some() {
                out.push('\\');
                i += 2;
                continue;
            }
            out.push_str("\\\\");
            i += 2;
            continue;
        }
        // Copy one UTF-8 character.
        let ch_len = s[i..].chars().next().map_or(1, char::len_utf8);
        out.push_str(&s[i..i + ch_len]);
        i += ch_len;
    }
    out
}

/// What a LaTeX command name means to the lexer.
#[derive(Clone, Debug)]
enum Cmd {
    Tok(Tok),
    Skip,
    SkipArg,
    Text,
    Begin,
    End,
    Array,
    /// `\emptyset`, `\varnothing`: lexed as `\{\}`.
    EmptySet,
}

fn command(name: &str) -> Option<Cmd> {
    use Tok::*;
    let t = |t: Tok| Some(Cmd::Tok(t));
    match name {
        "frac" | "dfrac" | "tfrac" | "cfrac" => t(Frac),
        "sqrt" => t(Sqrt),
        "binom" | "dbinom" | "tbinom" => t(Binom),
        "pi" => t(Pi),
        "infty" | "infinity" | "infin" => t(Inf),
        "cdot" | "times" | "ast" | "cdotp" => t(Times),
        "div" => t(Divide),
        "pm" => t(Pm),
        "mp" => t(Mp),
        "le" | "leq" | "leqslant" | "leqq" => t(Rel(RelOp::Le)),
        "ge" | "geq" | "geqslant" | "geqq" => t(Rel(RelOp::Ge)),
        "lt" => t(Rel(RelOp::Lt)),
        "gt" => t(Rel(RelOp::Gt)),
        "ne" | "neq" => t(Rel(RelOp::Ne)),
        "approx" | "simeq" | "sim" | "thickapprox" | "doteq" => t(Rel(RelOp::Approx)),
        "equiv" | "cong" => t(Rel(RelOp::Eq)),
        "in" => t(Rel(RelOp::In)),
        "to" | "rightarrow" | "Rightarrow" | "implies" | "Longrightarrow" | "longrightarrow"
        | "iff" => t(Rel(RelOp::Implies)),
        "cup" => t(Cup),
        "cap" => t(Cap),
        "setminus" => t(Setminus),
        "sum" => t(BigOp(false)),
        "prod" => t(BigOp(true)),
        "lfloor" => t(Floor(true)),
        "rfloor" => t(Floor(false)),
        "lceil" => t(Ceil(true)),
        "rceil" => t(Ceil(false)),
        "vert" | "lvert" | "rvert" | "mid" => t(Bar),
        "lbrace" => t(SetOpen),
        "rbrace" => t(SetClose),
        "langle" => t(Open('(')),
        "rangle" => t(Close(')')),
        "dots" | "ldots" | "cdots" | "vdots" | "ddots" => t(Ellipsis),
        "prime" => t(Prime),
        "sin" => t(Func(Fun::Sin)),
        "cos" => t(Func(Fun::Cos)),
        "tan" | "tg" => t(Func(Fun::Tan)),
        "sec" => t(Func(Fun::Sec)),
        "csc" | "cosec" => t(Func(Fun::Csc)),
        "cot" | "ctg" => t(Func(Fun::Cot)),
        "arcsin" => t(Func(Fun::Asin)),
        "arccos" => t(Func(Fun::Acos)),
        "arctan" => t(Func(Fun::Atan)),
        "sinh" => t(Func(Fun::Sinh)),
        "cosh" => t(Func(Fun::Cosh)),
        "tanh" => t(Func(Fun::Tanh)),
        "ln" => t(Func(Fun::Ln)),
        "log" | "lg" => t(Func(Fun::Log)),
        "exp" => t(Func(Fun::Exp)),
        "gcd" => t(Func(Fun::Gcd)),
        "max" => t(Func(Fun::Max)),
        "min" => t(Func(Fun::Min)),
        "text" | "textbf" | "textit" | "textnormal" | "textrm" | "textsf" | "texttt" | "mbox"
        | "hbox" | "mathrm" | "mathbf" | "mathit" | "mathsf" | "mathtt" | "operatorname"
        | "mathnormal" | "emph" | "boldsymbol" | "bm" => Some(Cmd::Text),
        "left" | "right" | "middle" | "bigl" | "bigr" | "Bigl" | "Bigr" | "big" | "Big"
        | "bigg" | "Bigg" | "biggl" | "biggr" | "displaystyle" | "textstyle" | "limits"
        | "nolimits" | "quad" | "qquad" | "enspace" | "thinspace" | "negthinspace" | "boxed"
        | "fbox" | "framebox" | "overline" | "underline" | "vec" | "hat" | "bar" | "tilde"
        | "widehat" | "widetilde" | "overrightarrow" | "mathbb" | "mathcal" | "mathscr"
        | "mathfrak" | "circ" | "degree" | "rm" | "bf" | "it" | "noindent" | "newline"
        | "nonumber" | "notag" | "dfrac_" | "cr" | "hline" | "bigm" | "Bigm" | "pmod" | "bmod"
        | "mod" | "qed" | "square" | "blacksquare" | "checkmark" => Some(Cmd::Skip),
        "hspace" | "vspace" | "phantom" | "label" | "tag" | "color" | "textcolor" => {
            Some(Cmd::SkipArg)
        }
        "emptyset" | "varnothing" => Some(Cmd::EmptySet),
        "begin" => Some(Cmd::Begin),
        "end" => Some(Cmd::End),
        "array" => Some(Cmd::Array),
        "alpha" | "beta" | "gamma" | "delta" | "epsilon" | "varepsilon" | "zeta" | "eta"
        | "theta" | "vartheta" | "iota" | "kappa" | "lambda" | "mu" | "nu" | "xi" | "omicron"
        | "rho" | "varrho" | "sigma" | "varsigma" | "tau" | "upsilon" | "phi" | "varphi"
        | "chi" | "psi" | "omega" | "Gamma" | "Delta" | "Theta" | "Lambda" | "Xi" | "Pi"
        | "Sigma" | "Upsilon" | "Phi" | "Psi" | "Omega" | "angle" | "triangle" | "ell" => {
            t(Ident(name.to_string()))
        }
        _ => None,
    }
}

fn plain_word(w: &str) -> Option<Tok> {
    use Tok::*;
    Some(match w {
        "sin" => Func(Fun::Sin),
        "cos" => Func(Fun::Cos),
        "tan" => Func(Fun::Tan),
        "sec" => Func(Fun::Sec),
        "csc" => Func(Fun::Csc),
        "cot" => Func(Fun::Cot),
        "arcsin" | "asin" => Func(Fun::Asin),
        "arccos" | "acos" => Func(Fun::Acos),
        "arctan" | "atan" => Func(Fun::Atan),
        "sinh" => Func(Fun::Sinh),
        "cosh" => Func(Fun::Cosh),
        "tanh" => Func(Fun::Tanh),
        "ln" => Func(Fun::Ln),
        "log" => Func(Fun::Log),
        "exp" => Func(Fun::Exp),
        "sqrt" => Func(Fun::Sqrt),
        "gcd" => Func(Fun::Gcd),
        "lcm" => Func(Fun::Lcm),
        "max" => Func(Fun::Max),
        "min" => Func(Fun::Min),
        "pi" => Pi,
        "infty" | "infinity" | "inf" => Inf,
        "and" | "or" => Sep,
        "percent" | "percentage" | "pct" | "percents" => Percent,
        _ => return None,
    })
}

/// Words dropped after a value: units of measure and currencies.
pub fn is_unit(w: &str) -> bool {
    matches!(
        w.trim_end_matches('.').to_ascii_lowercase().as_str(),
        "cm" | "mm"
            | "km"
            | "m"
            | "kg"
            | "mg"
            | "g"
            | "lb"
            | "lbs"
            | "pound"
            | "pounds"
            | "oz"
            | "ounce"
            | "ounces"
            | "ft"
            | "feet"
            | "foot"
            | "inch"
            | "inches"
            | "yd"
            | "yard"
            | "yards"
            | "mile"
            | "miles"
            | "meter"
            | "meters"
            | "metre"
            | "metres"
            | "centimeter"
            | "centimeters"
            | "centimetres"
            | "kilometer"
            | "kilometers"
            | "millimeter"
            | "millimeters"
            | "second"
            | "seconds"
            | "s"
            | "minute"
            | "minutes"
            | "hour"
            | "hours"
            | "hr"
            | "hrs"
            | "h"
            | "day"
            | "days"
            | "week"
            | "weeks"
            | "month"
            | "months"
            | "year"
            | "years"
            | "dollar"
            | "dollars"
            | "cent"
            | "cents"
            | "yuan"
            | "euro"
            | "euros"
            | "unit"
            | "units"
            | "degree"
            | "degrees"
            | "deg"
            | "sq"
            | "square"
            | "cubic"
            | "liter"
            | "liters"
            | "litre"
            | "litres"
            | "ml"
            | "l"
            | "gallon"
            | "gallons"
            | "mph"
            | "kmh"
            | "rad"
            | "radians"
            | "radian"
            | "times"
            | "mi"
            | "km/h"
            | "m/s"
            | "usd"
            | "rs"
            | "rupees"
            | "yen"
            | "kilograms"
            | "grams"
            | "gram"
            | "kilogram"
            | "hz"
            | "kb"
            | "mb"
            | "gb"
            | "pages"
            | "people"
            | "ways"
            | "students"
            | "points"
            | "items"
    )
}

/// The value of an answer written in English number words: `two`, `Twelve`, `twenty-one`,
/// `one hundred and five`, `three thousand`. `None` for anything else (including digits).
pub fn number_words(s: &str) -> Option<i64> {
    let s = s.trim().trim_end_matches('.');
    if s.is_empty() || s.len() > 80 || !s.starts_with(|c: char| c.is_ascii_alphabetic()) {
        return None;
    }
    let (mut total, mut group, mut any) = (0i64, 0i64, false);
    for word in s.split(|c: char| c.is_whitespace() || c == '-') {
        let w = word.to_ascii_lowercase();
        let small = match w.as_str() {
            "" | "and" if any => continue,
            "zero" => 0,
            "one" => 1,
            "two" => 2,
            "three" => 3,
            "four" => 4,
            "five" => 5,
            "six" => 6,
            "seven" => 7,
            "eight" => 8,
            "nine" => 9,
            "ten" => 10,
            "eleven" => 11,
            "twelve" => 12,
            "thirteen" => 13,
            "fourteen" => 14,
            "fifteen" => 15,
            "sixteen" => 16,
            "seventeen" => 17,
            "eighteen" => 18,
            "nineteen" => 19,
            "twenty" => 20,
            "thirty" => 30,
            "forty" => 40,
            "fifty" => 50,
            "sixty" => 60,
            "seventy" => 70,
            "eighty" => 80,
            "ninety" => 90,
            "hundred" if any => {
                group = group.max(1).checked_mul(100)?;
                continue;
            }
            "thousand" | "million" if any => {
                let scale = if w == "thousand" { 1_000 } else { 1_000_000 };
                total = total.checked_add(group.max(1).checked_mul(scale)?)?;
                group = 0;
                continue;
            }
            _ => return None,
        };
        group = group.checked_add(small)?;
        any = true;
    }
    if any { total.checked_add(group) } else { None }
}

fn is_thin_space(c: char) -> bool {
    matches!(
        c,
        '\u{2009}' | '\u{202F}' | '\u{00A0}' | '\u{2007}' | '\u{200A}' | '\u{2002}' | '\u{2003}'
    )
}

fn greek(c: char) -> Option<&'static str> {
    Some(match c {
        'α' => "alpha",
        'β' => "beta",
        'γ' => "gamma",
        'δ' => "delta",
        'ε' => "epsilon",
        'θ' => "theta",
        'λ' => "lambda",
        'μ' => "mu",
        'σ' => "sigma",
        'τ' => "tau",
        'φ' => "phi",
        'ω' => "omega",
        'Δ' => "Delta",
        _ => return None,
    })
}

/// `int.fixed(repeat)` as an exact fraction `(num, den)` of decimal strings.
fn repeating_fraction(int: &str, fixed: &str, repeat: &str) -> Option<(String, String)> {
    if int.len() + fixed.len() + repeat.len() > 30 {
        return None;
    }
    let all: i128 = format!("{int}{fixed}{repeat}").parse().ok()?;
    let head: i128 = format!("{int}{fixed}").parse().ok()?;
    let den = 10i128
        .checked_pow(repeat.len() as u32)?
        .checked_sub(1)?
        .checked_mul(10i128.checked_pow(fixed.len() as u32)?)?;
    Some(((all - head).to_string(), den.to_string()))
}

struct Lexer<'a> {
    c: &'a [char],
    i: usize,
    out: Vec<Token>,
    space: bool,
    nesting: u32,
    strip_units: bool,
    depth: i32,
}

/// Lexes an answer into tokens. Never fails: unknown characters become [`Tok::Other`].
/// With `strip_units`, unit words after a value (and their powers) are dropped.
pub fn lex(s: &str, strip_units: bool) -> Vec<Token> {
    let chars: Vec<char> = s.chars().collect();
    let mut lx = Lexer {
        c: &chars,
        i: 0,
        out: Vec::new(),
        space: false,
        nesting: 0,
        strip_units,
        depth: 0,
    };
    lx.run();
    lx.out
}

impl Lexer<'_> {
    fn peek(&self, k: usize) -> Option<char> {
        self.c.get(self.i + k).copied()
    }

    fn push(&mut self, tok: Tok) {
        match tok {
            Tok::Open(_) | Tok::SetOpen => self.depth += 1,
            Tok::Close(_) | Tok::SetClose => self.depth -= 1,
            _ => {}
        }
        self.out.push(Token {
            tok,
            space: self.space,
        });
        self.space = false;
    }

    /// Open `(`, `[` and `\{` before the current position.
    fn bracket_depth(&self) -> i32 {
        self.depth
    }

    fn prev_is_value(&self) -> bool {
        matches!(
            self.out.last().map(|t| &t.tok),
            Some(Tok::Num(_) | Tok::Close(_) | Tok::RBrace | Tok::Vulgar(..) | Tok::Percent)
        )
    }

    /// A degree mark applies to the token before it (`60°`, `x^\circ`, `(a+b)°`).
    fn after_value(&self) -> bool {
        self.prev_is_value()
            || matches!(
                self.out.last().map(|t| &t.tok),
                Some(Tok::Ident(_) | Tok::Pi)
            )
    }

    fn skip_spaces(&mut self) {
        while let Some(c) = self.peek(0) {
            if c.is_whitespace() || is_thin_space(c) {
                self.i += 1;
            } else {
                break;
            }
        }
    }

    /// Reads a `{..}` group starting at `self.i` (which must be `{`); returns its content.
    fn braced(&mut self) -> Option<String> {
        if self.peek(0) != Some('{') {
            return None;
        }
        let mut depth = 0usize;
        let start = self.i + 1;
        while let Some(c) = self.peek(0) {
            self.i += 1;
            match c {
                '\\' => self.i += 1,
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        return Some(self.c[start..self.i - 1].iter().collect());
                    }
                }
                _ => {}
            }
        }
        Some(self.c[start.min(self.c.len())..].iter().collect())
    }

    /// Skips a superscript `^2`, `^{3}`, `²`, `³` that follows a unit.
    fn skip_unit_power(&mut self) {
        let save = self.i;
        self.skip_spaces();
        match self.peek(0) {
            Some('²' | '³') => self.i += 1,
            Some('^') => {
                self.i += 1;
                if self.peek(0) == Some('{') {
                    let _ = self.braced();
                } else if self.peek(0).is_some_and(|c| c.is_ascii_digit()) {
                    self.i += 1;
                } else {
                    self.i = save;
                }
            }
            _ => self.i = save,
        }
    }

    /// A repeating block `\overline{142857}` or `\dot{3}` at `j`: (digits, end index).
    fn repeating_at(&self, j: usize) -> Option<(String, usize)> {
        let rest: String = self.c[j.min(self.c.len())..(j + 12).min(self.c.len())]
            .iter()
            .collect();
        let cmd = ["\\overline", "\\dot", "\\bar"]
            .into_iter()
            .find(|c| rest.starts_with(c))?;
        let mut k = j + cmd.len();
        while self.c.get(k) == Some(&' ') {
            k += 1;
        }
        if self.c.get(k) != Some(&'{') {
            return None;
        }
        k += 1;
        let mut digits = String::new();
        while let Some(c) = self.c.get(k).filter(|c| c.is_ascii_digit()) {
            digits.push(*c);
            k += 1;
        }
        (self.c.get(k) == Some(&'}') && !digits.is_empty()).then_some((digits, k + 1))
    }

    /// Length of a thousands separator at `j`, if one is there.
    fn separator_at(&self, j: usize) -> Option<(usize, bool, bool)> {
        // Returns (length, has_comma, has_plain_space_after_comma_without_bang).
        let mut k = j;
        let mut comma = false;
        let mut bang = false;
        let mut plain_space = false;
        let mut any = false;
        while k < self.c.len() && k - j < 10 {
            let c = self.c[k];
            if c == ',' && !comma {
                comma = true;
                k += 1;
            } else if c == ' ' {
                plain_space = true;
                k += 1;
            } else if is_thin_space(c) {
                k += 1;
            } else if c == '\\' && matches!(self.c.get(k + 1), Some('!' | ',' | ' ' | ';')) {
                bang = true;
                k += 2;
            } else if c == '{' && self.c.get(k + 1) == Some(&',') {
                let close = if self.c.get(k + 2) == Some(&'}') {
                    3
                } else if self.c.get(k + 2) == Some(&' ') && self.c.get(k + 3) == Some(&'}') {
                    4
                } else {
                    break;
                };
                if comma {
                    break;
                }
                comma = true;
                bang = true;
                k += close;
            } else {
                break;
            }
            any = true;
        }
        if !any {
            return None;
        }
        // `32, 349` (comma then a plain space) is a list, not a number.
        if comma && plain_space && !bang {
            return None;
        }
        Some((k - j, comma, plain_space))
    }

    fn number(&mut self) {
        let mut s = String::new();
        let mut group_len = 0;
        while let Some(c) = self.peek(0).filter(char::is_ascii_digit) {
            s.push(c);
            group_len += 1;
            self.i += 1;
        }
        // Thousands groups: first group 1-3 digits not starting with 0, then groups of three.
        if (1..=3).contains(&group_len) && !s.starts_with('0') {
            let mut used_space_only = None;
            while let Some((len, comma, _)) = self.separator_at(self.i) {
                let j = self.i + len;
                let three = (0..3).all(|k| self.c.get(j + k).is_some_and(char::is_ascii_digit));
                let fourth = self.c.get(j + 3).is_some_and(char::is_ascii_digit);
                if !three || fourth {
                    break;
                }
                if *used_space_only.get_or_insert(!comma) == comma {
                    break;
                }
                // Inside `( )`, `[ ]` and `\{ \}` a comma separates items: `(12,102)`.
                if comma && self.bracket_depth() > 0 {
                    break;
                }
                s.extend(&self.c[j..j + 3]);
                self.i = j + 3;
            }
        }
        if self.peek(0) == Some('.') {
            let mut j = self.i + 1;
            let mut frac = String::new();
            while let Some(c) = self.c.get(j).filter(|c| c.is_ascii_digit()) {
                frac.push(*c);
                j += 1;
            }
            if let Some((rep, end)) = self.repeating_at(j)
                && let Some((num, den)) = repeating_fraction(&s, &frac, &rep)
            {
                // `0.1\overline{6}` is the exact fraction 1/6.
                self.i = end;
                self.push(Tok::Open('('));
                self.push(Tok::Num(num));
                self.push(Tok::Divide);
                self.push(Tok::Num(den));
                self.push(Tok::Close(')'));
                return;
            }
            if !frac.is_empty() {
                s.push('.');
                s.push_str(&frac);
                self.i = j;
            }
        }
        // Scientific notation `1e-6`, `2.5E+3` (not `2e` alone, which is 2 times e).
        if matches!(self.peek(0), Some('e' | 'E')) {
            let mut k = 1;
            if matches!(self.peek(1), Some('+' | '-')) {
                k = 2;
            }
            if self.peek(k).is_some_and(|c| c.is_ascii_digit()) {
                let mut end = k;
                while self.peek(end).is_some_and(|c| c.is_ascii_digit()) {
                    end += 1;
                }
                if !self.peek(end).is_some_and(|c| c.is_ascii_alphabetic()) {
                    s.push('e');
                    s.extend(&self.c[self.i + 1..self.i + end]);
                    self.i += end;
                }
            }
        }
        self.push(Tok::Num(s));
    }

    fn letters(&mut self) {
        let start = self.i;
        while self.peek(0).is_some_and(|c| c.is_ascii_alphabetic()) {
            self.i += 1;
        }
        let word: String = self.c[start..self.i].iter().collect();
        let lower = word.to_ascii_lowercase();
        if self.strip_units
            && matches!(lower.as_str(), "degree" | "degrees")
            && self.prev_is_value()
        {
            self.push(Tok::Degree);
            return;
        }
        // Units right after a value, with an optional power (`cm^2`, `m²`).
        let after_symbol = word.len() > 1
            && matches!(
                self.out.last().map(|t| &t.tok),
                Some(Tok::Pi | Tok::Ident(_))
            );
        if self.strip_units
            && (self.prev_is_value() || after_symbol)
            && is_unit(&lower)
            && (word.len() > 1 || self.space || matches!(self.peek(0), Some('²' | '³')))
        {
            self.space = false;
            self.skip_unit_power();
            return;
        }
        if let Some(t) = plain_word(&lower).filter(|_| lower == word || lower.len() > 3) {
            self.push(t);
            return;
        }
        // `1orW(x)`: a glued connective after a value.
        if self.prev_is_value() {
            for conj in ["or", "and"] {
                if word.len() > conj.len() && word.starts_with(conj) {
                    self.push(Tok::Sep);
                    self.i = start + conj.len();
                    return;
                }
            }
        }
        for c in word.chars() {
            self.push(Tok::Ident(c.to_string()));
        }
    }

    fn text_group(&mut self) {
        self.skip_spaces();
        let Some(content) = self.braced() else { return };
        let trimmed = content.trim();
        if trimmed.is_empty() {
            self.space = true;
            return;
        }
        if self.strip_units
            && trimmed.contains('/')
            && self.prev_is_value()
            && trimmed
                .split(['/', ' '])
                .all(|w| w.is_empty() || is_unit(w))
        {
            // A compound unit `\text{ km/h}`, `\mathrm{m/s}^2`.
            self.skip_unit_power();
            return;
        }
        if trimmed.chars().all(|c| c.is_ascii_alphabetic() || c == ' ') {
            let words: Vec<&str> = trimmed.split_whitespace().collect();
            let lower = trimmed.to_ascii_lowercase();
            if words.iter().any(|w| matches!(*w, "and" | "or")) {
                self.push(Tok::Sep);
            } else if words.len() == 1 && trimmed.len() == 1 {
                self.push(Tok::Ident(trimmed.to_string()));
            } else if let Some(t) = plain_word(&lower).filter(|t| !matches!(t, Tok::Sep)) {
                self.push(t);
            } else if lower == "lcm" {
                self.push(Tok::Func(Fun::Lcm));
            } else if self.strip_units
                && (self.prev_is_value()
                    || matches!(
                        self.out.last().map(|t| &t.tok),
                        Some(Tok::Pi | Tok::Ident(_))
                    ))
                && words.iter().all(|w| is_unit(w))
            {
                self.skip_unit_power();
            } else {
                self.push(Tok::Word(lower));
            }
            return;
        }
        if self.nesting >= MAX_TEXT_NESTING {
            self.push(Tok::Word(trimmed.to_string()));
            return;
        }
        let chars: Vec<char> = content.chars().collect();
        let mut sub = Lexer {
            c: &chars,
            i: 0,
            out: Vec::new(),
            space: true,
            nesting: self.nesting + 1,
            strip_units: self.strip_units,
            depth: self.depth,
        };
        sub.run();
        self.out.append(&mut sub.out);
        self.space = true;
    }

    fn backslash(&mut self) {
        self.i += 1;
        let Some(c) = self.peek(0) else { return };
        if !c.is_ascii_alphabetic() {
            self.i += 1;
            match c {
                '\\' => self.push(Tok::RowSep),
                '{' => self.push(Tok::SetOpen),
                '}' => self.push(Tok::SetClose),
                '%' => self.push(Tok::Percent),
                '|' => self.push(Tok::Bar),
                '&' => self.push(Tok::Other('&')),
                _ => self.space = true, // `\,` `\!` `\ ` `\$` `\(` `\)` `\[` `\]` `\#`
            }
            return;
        }
        let start = self.i;
        while self.peek(0).is_some_and(|c| c.is_ascii_alphabetic()) {
            self.i += 1;
        }
        let full: String = self.c[start..self.i].iter().collect();
        let (name, cmd) = match command(&full) {
            Some(cmd) => (full, cmd),
            None => {
                // `\quadx`: a known command glued to following letters.
                let found = (2..full.len())
                    .rev()
                    .find_map(|n| command(&full[..n]).map(|c| (n, c)));
                match found {
                    Some((n, cmd)) => {
                        self.i = start + n;
                        (full[..n].to_string(), cmd)
                    }
                    None => {
                        self.push(Tok::Ident(format!("\\{full}")));
                        return;
                    }
                }
            }
        };
        match cmd {
            Cmd::Tok(t) => {
                let digit_args = match t {
                    Tok::Frac | Tok::Binom => 2,
                    Tok::Sqrt => 1,
                    _ => 0,
                };
                self.push(t);
                // `\frac12`, `\sqrt3`: an unbraced argument is a single digit.
                for _ in 0..digit_args {
                    self.skip_spaces();
                    match self.peek(0) {
                        Some(d) if d.is_ascii_digit() => {
                            self.push(Tok::Num(d.to_string()));
                            self.i += 1;
                        }
                        _ => break,
                    }
                }
            }
            Cmd::Skip if name == "degree" && self.after_value() => self.push(Tok::Degree),
            Cmd::Skip => {
                self.space = true;
                if matches!(name.as_str(), "left" | "right" | "middle") && self.peek(0) == Some('.')
                {
                    self.i += 1;
                }
            }
            Cmd::SkipArg => {
                self.skip_spaces();
                let _ = self.braced();
                self.space = true;
            }
            Cmd::Text => self.text_group(),
            Cmd::Begin | Cmd::End => {
                self.skip_spaces();
                let env = self.braced().unwrap_or_default();
                let env = env.trim().trim_end_matches('*');
                if matches!(
                    env,
                    "pmatrix"
                        | "bmatrix"
                        | "Bmatrix"
                        | "vmatrix"
                        | "Vmatrix"
                        | "matrix"
                        | "smallmatrix"
                        | "array"
                ) {
                    if matches!(cmd, Cmd::Begin) {
                        self.push(Tok::BeginMat);
                        if env == "array" {
                            self.skip_spaces();
                            let _ = self.braced();
                        }
                    } else {
                        self.push(Tok::EndMat);
                    }
                } else {
                    self.space = true;
                }
            }
            Cmd::Array => self.space = true,
            Cmd::EmptySet => {
                self.push(Tok::SetOpen);
                self.push(Tok::SetClose);
            }
        }
    }

    fn run(&mut self) {
        while let Some(c) = self.peek(0) {
            if c.is_ascii_digit() || (c == '.' && self.peek(1).is_some_and(|d| d.is_ascii_digit()))
            {
                self.number();
                continue;
            }
            if c.is_ascii_alphabetic() {
                self.letters();
                continue;
            }
            if c == '\\' {
                self.backslash();
                continue;
            }
            self.i += 1;
            let tok = match c {
                _ if c.is_whitespace() || is_thin_space(c) || c.is_control() => {
                    self.space = true;
                    continue;
                }
                '+' => Tok::Plus,
                '-' | '−' | '–' | '—' => Tok::Minus,
                '*' | '×' | '·' | '⋅' | '∙' | '∗' => Tok::Times,
                '/' | '÷' => Tok::Divide,
                '^' => {
                    // `^\circ`, `^{\circ}`: a degree mark (dropped when nothing precedes it).
                    let rest: String = self.c[self.i..(self.i + 12).min(self.c.len())]
                        .iter()
                        .collect();
                    let rest = rest.replace(' ', "");
                    let pat = ["\\circ", "{\\circ}", "\\degree", "{\\degree}", "{}\\circ"]
                        .into_iter()
                        .find(|p| rest.starts_with(p));
                    if let Some(pat) = pat {
                        let mut need = pat.len();
                        while need > 0 && self.i < self.c.len() {
                            if self.c[self.i] != ' ' {
                                need -= 1;
                            }
                            self.i += 1;
                        }
                        if self.after_value() {
                            Tok::Degree
                        } else {
                            self.space = true;
                            continue;
                        }
                    } else {
                        Tok::Caret
                    }
                }
                '²' | '³' | '¹' => {
                    self.push(Tok::Caret);
                    Tok::Num(
                        match c {
                            '²' => "2",
                            '³' => "3",
                            _ => "1",
                        }
                        .to_string(),
                    )
                }
                '_' => Tok::Under,
                '!' if self.peek(0) == Some('=') => {
                    self.i += 1;
                    Tok::Rel(RelOp::Ne)
                }
                '!' => Tok::Bang,
                ':' if self.peek(0) == Some('=') => {
                    self.i += 1;
                    Tok::Rel(RelOp::Eq)
                }
                ':' | '：' => Tok::Colon,
                '\'' | '′' => Tok::Prime,
                '=' => {
                    if self.peek(0) == Some('=') {
                        self.i += 1;
                    } else if self.peek(0) == Some('>') {
                        self.i += 1;
                        self.push(Tok::Rel(RelOp::Implies));
                        continue;
                    }
                    Tok::Rel(RelOp::Eq)
                }
                '<' if self.peek(0) == Some('=') => {
                    self.i += 1;
                    Tok::Rel(RelOp::Le)
                }
                '>' if self.peek(0) == Some('=') => {
                    self.i += 1;
                    Tok::Rel(RelOp::Ge)
                }
                '<' => Tok::Rel(RelOp::Lt),
                '>' => Tok::Rel(RelOp::Gt),
                '≤' | '⩽' => Tok::Rel(RelOp::Le),
                '≥' | '⩾' => Tok::Rel(RelOp::Ge),
                '≠' => Tok::Rel(RelOp::Ne),
                '≈' => Tok::Rel(RelOp::Approx),
                '∈' => Tok::Rel(RelOp::In),
                '→' | '⇒' => Tok::Rel(RelOp::Implies),
                ',' | '，' => Tok::Comma,
                ';' => Tok::Semi,
                '(' | '[' | '（' => Tok::Open(if c == '[' { '[' } else { '(' }),
                ')' | ']' | '）' => Tok::Close(if c == ']' { ']' } else { ')' }),
                '⟨' => Tok::Open('('),
                '⟩' => Tok::Close(')'),
                '{' => Tok::LBrace,
                '}' => Tok::RBrace,
                '|' => Tok::Bar,
                '&' => Tok::Amp,
                '%' | '％' => Tok::Percent,
                '∞' => Tok::Inf,
                'π' => Tok::Pi,
                '√' => Tok::Sqrt,
                '∪' => Tok::Cup,
                '∩' => Tok::Cap,
                '±' => Tok::Pm,
                '∓' => Tok::Mp,
                '…' => Tok::Ellipsis,
                '⌊' => Tok::Floor(true),
                '⌋' => Tok::Floor(false),
                '⌈' => Tok::Ceil(true),
                '⌉' => Tok::Ceil(false),
                '½' => Tok::Vulgar(1, 2),
                '⅓' => Tok::Vulgar(1, 3),
                '⅔' => Tok::Vulgar(2, 3),
                '¼' => Tok::Vulgar(1, 4),
                '¾' => Tok::Vulgar(3, 4),
                '⅕' => Tok::Vulgar(1, 5),
                '⅛' => Tok::Vulgar(1, 8),
                '⅙' => Tok::Vulgar(1, 6),
                '°' if self.after_value() => Tok::Degree,
                '°' | '$' | '€' | '£' | '¥' | '₹' | '"' | '`' | '~' | '“' | '”' | '#' => {
                    self.space = true;
                    continue;
                }
                '.' if self.peek(0).is_none_or(char::is_whitespace) => {
                    self.space = true;
                    continue;
                }
                _ => match greek(c) {
                    Some(g) => Tok::Ident(g.to_string()),
                    None => Tok::Other(c),
                },
            };
            self.push(tok);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toks(s: &str) -> Vec<Tok> {
        lex(s, true).into_iter().map(|t| t.tok).collect()
    }

    fn num(s: &str) -> Tok {
        Tok::Num(s.to_string())
    }

    #[test]
    fn thousands_separators() {
        assert_eq!(toks("7,425,000"), [num("7425000")]);
        assert_eq!(toks("1 000"), [num("1000")]);
        assert_eq!(toks("1\u{2009}000\u{2009}000"), [num("1000000")]);
        assert_eq!(toks("1\u{202F}234"), [num("1234")]);
        assert_eq!(toks("12\\,345"), [num("12345")]);
        assert_eq!(toks("14{,}916"), [num("14916")]);
        assert_eq!(toks("11,\\! 111,\\! 111,\\! 100"), [num("11111111100")]);
        assert_eq!(toks("1,000.99"), [num("1000.99")]);
        assert_eq!(toks("32, 349"), [num("32"), Tok::Comma, num("349")]);
        assert_eq!(toks("0,111"), [num("0"), Tok::Comma, num("111")]);
        assert_eq!(toks("1000,99"), [num("1000"), Tok::Comma, num("99")]);
    }

    #[test]
    fn repeating_decimals() {
        let frac =
            |n: &str, d: &str| vec![Tok::Open('('), num(n), Tok::Divide, num(d), Tok::Close(')')];
        assert_eq!(toks("0.\\overline{3}"), frac("3", "9"));
        assert_eq!(toks("0.1\\overline{6}"), frac("15", "90"));
        assert_eq!(toks("1.\\dot{3}"), frac("12", "9"));
    }

    #[test]
    fn scientific_and_decimals() {
        assert_eq!(toks("1e-6"), [num("1e-6")]);
        assert_eq!(toks(".4"), [num(".4")]);
        assert_eq!(toks("2e"), [num("2"), Tok::Ident("e".into())]);
    }

    #[test]
    fn frac_digit_arguments() {
        assert_eq!(toks("\\frac12"), [Tok::Frac, num("1"), num("2")]);
        assert_eq!(
            toks("\\dfrac{1}{2}"),
            [
                Tok::Frac,
                Tok::LBrace,
                num("1"),
                Tok::RBrace,
                Tok::LBrace,
                num("2"),
                Tok::RBrace
            ]
        );
        assert_eq!(toks("\\sqrt3"), [Tok::Sqrt, num("3")]);
    }

    #[test]
    fn units_degrees_and_text() {
        assert_eq!(toks("90^\\circ"), [num("90"), Tok::Degree]);
        assert_eq!(toks("90^{\\circ}"), [num("90"), Tok::Degree]);
        assert_eq!(toks("90°"), [num("90"), Tok::Degree]);
        assert_eq!(toks("60 \\text{ km/h}"), [num("60")]);
        assert_eq!(toks("\\varnothing"), [Tok::SetOpen, Tok::SetClose]);
        assert_eq!(toks("15\\mbox{ cm}^2"), [num("15")]);
        assert_eq!(toks("125 miles"), [num("125")]);
        assert_eq!(toks("1,000.99m²"), [num("1000.99")]);
        assert_eq!(toks("28 percent"), [num("28"), Tok::Percent]);
        assert_eq!(toks("\\$5"), [num("5")]);
        assert_eq!(toks("6 \\text{ and } 8"), [num("6"), Tok::Sep, num("8")]);
        assert_eq!(toks("\\text{Evelyn}"), [Tok::Word("evelyn".into())]);
        assert_eq!(toks("\\mathrm{e}"), [Tok::Ident("e".into())]);
    }

    #[test]
    fn unicode_math() {
        assert_eq!(
            toks("−3×2÷π"),
            [
                Tok::Minus,
                num("3"),
                Tok::Times,
                num("2"),
                Tok::Divide,
                Tok::Pi
            ]
        );
        assert_eq!(toks("√2"), [Tok::Sqrt, num("2")]);
        assert_eq!(
            toks("x≤1"),
            [Tok::Ident("x".into()), Tok::Rel(RelOp::Le), num("1")]
        );
        assert_eq!(toks("1½"), [num("1"), Tok::Vulgar(1, 2)]);
    }

    // See: #16
    #[test]
    fn number_words_are_numbers() {
        assert_eq!(number_words("two"), Some(2));
        assert_eq!(number_words("Twelve."), Some(12));
        assert_eq!(number_words("twenty-one"), Some(21));
        assert_eq!(number_words("one hundred and five"), Some(105));
        assert_eq!(number_words("three thousand two hundred"), Some(3200));
        assert_eq!(number_words("no one"), None);
        assert_eq!(number_words("12"), None);
        assert_eq!(number_words("and"), None);
        // Bounded: at most 80 characters, checked arithmetic.
        let hundreds = format!("one{}", " hundred".repeat(9));
        assert_eq!(number_words(&hundreds), Some(10i64.pow(18)));
        assert_eq!(number_words(&format!("one{}", " hundred".repeat(10))), None);
    }

    #[test]
    fn doubled_backslashes_before_commands() {
        assert_eq!(fix_doubled_backslashes("\\\\frac{1}{2}"), "\\frac{1}{2}");
        assert_eq!(fix_doubled_backslashes("1 \\\\ 2"), "1 \\\\ 2");
        assert_eq!(fix_doubled_backslashes("a\\\\\\end{x}"), "a\\\\\\end{x}");
    }

    #[test]
    fn glued_commands_and_connectives() {
        assert_eq!(toks("\\quadx"), [Tok::Ident("x".into())]);
        assert_eq!(toks("1orW"), [num("1"), Tok::Sep, Tok::Ident("W".into())]);
    }
}
