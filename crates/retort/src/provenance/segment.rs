//! The sentence segmenter: splits a response into actions ([`Segment`]s) whose byte ranges cover
//! the text exactly, end to end, so concatenating the segments gives the response back.
//!
//! Rules, in order:
//! - **Protected spans** are never split: inline math `$…$` (pandoc's rule: the opening `$` is
//!   followed by a non-space, the closing `$` follows a non-space and is not followed by a digit,
//!   so `$5. He paid $3` stays prose), display math `$$…$$`, `\[…\]`, `\(…\)`,
//!   `\begin{env}…\end{env}`, and fenced code blocks. A span that never closes is not a span.
//! - **Newlines** end an action: a reasoning step per line is the common shape of traces.
//! - **`.`, `!`, `?`** (optionally followed by closers such as `)`, `"`, `**`, `$`, `\]`) end an
//!   action when whitespace follows, except: a decimal (`3.5`: no whitespace follows), a known
//!   abbreviation (`e.g.`, `i.e.`, `Dr.`, `vs.`, `cf.`, …, and any dotted letter group such as
//!   `U.S.`), a list marker alone (`1.`, `a.`), a `.` followed by a lowercase word, and a
//!   terminator followed by an operator or punctuation (`5! = 120`, `x. , y`).
//!
//! Whitespace between two actions belongs to the *following* action (a boundary sits at the start
//! of the whitespace run), which matches how byte-level BPE and SentencePiece tokenizers attach a
//! leading space to the next word; trailing whitespace at the end of the text stays with the last
//! action. So "19 - 5 = 14. 14 + 3 = 17." gives `19 - 5 = 14.` and ` 14 + 3 = 17.`.

/// One action: the byte range `start..end` of the text it was cut from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// First byte (inclusive).
    pub start: usize,
    /// One past the last byte.
    pub end: usize,
}

impl Segment {
    /// The segment's text within `text` (the string it was cut from).
    pub fn text<'a>(&self, text: &'a str) -> &'a str {
        text.get(self.start..self.end).unwrap_or("")
    }
}

/// Words that end with a `.` without ending a sentence (compared case-insensitively, without
/// the final dot). `etc.` is left out on purpose: it ends sentences as often as not, and the
/// lowercase rule already keeps "etc. and" together.
const ABBREVIATIONS: &[&str] = &[
    "e.g", "i.e", "cf", "vs", "viz", "approx", "resp", "dr", "mr", "mrs", "ms", "prof", "st", "jr",
    "sr", "fig", "figs", "eq", "eqs", "no", "al", "ca", "sec", "ch", "vol", "pp", "p",
];

/// Characters that may follow a terminator before the whitespace and still end the sentence.
const CLOSERS: &[char] = &[')', ']', '}', '"', '\'', '”', '’', '*', '$', '\\', '_'];

/// Splits `text` into actions covering it end to end (an empty text gives no segment).
pub fn segment(text: &str) -> Vec<Segment> {
    if text.is_empty() {
        return Vec::new();
    }
    let protected = protected_spans(text);
    let bytes = text.as_bytes();
    let mut boundaries = Vec::new();
    let mut segment_start = 0;
    let mut i = 0;
    let mut seen_content = false;
    let mut next_span = 0;
    // The end of the last display block, which ends an action when a capital or digit follows.
    let mut display_end = None;
    while i < bytes.len() {
        while next_span < protected.len() && protected[next_span].0 < i {
            next_span += 1;
        }
        if let Some(&(_, end, display)) = protected.get(next_span).filter(|s| s.0 == i) {
            i = end;
            display_end = display.then_some(end);
            seen_content = true;
            continue;
        }
        let c = next_char(text, i);
        if !c.is_whitespace() {
            seen_content = true;
            i += c.len_utf8();
            continue;
        }
        // A maximal whitespace run starting at i.
        let run_start = i;
        let mut has_newline = false;
        while i < bytes.len() {
            let c = next_char(text, i);
            if !c.is_whitespace() {
                break;
            }
            has_newline |= c == '\n' || c == '\r';
            i += c.len_utf8();
        }
        if i >= bytes.len() || !seen_content {
            // Trailing whitespace stays with the last action; leading with the first.
            continue;
        }
        let sentence = &text[segment_start..run_start];
        let after_display = display_end == Some(run_start)
            && text[i..]
                .chars()
                .next()
                .is_some_and(|c| c.is_uppercase() || c.is_ascii_digit());
        if has_newline || after_display || ends_sentence(sentence, &text[i..]) {
            boundaries.push(run_start);
            segment_start = run_start;
        }
    }
    let mut out = Vec::with_capacity(boundaries.len() + 1);
    let mut start = 0;
    for b in boundaries {
        out.push(Segment { start, end: b });
        start = b;
    }
    out.push(Segment {
        start,
        end: text.len(),
    });
    out
}

fn next_char(text: &str, i: usize) -> char {
    text[i..].chars().next().unwrap_or(' ')
}

/// Whether `sentence` (the current action up to a whitespace run) ends a sentence, given the
/// text `after` the whitespace run.
fn ends_sentence(sentence: &str, after: &str) -> bool {
    let body = sentence.trim_end_matches(|c: char| CLOSERS.contains(&c) || c.is_whitespace());
    let Some(last) = body.chars().last() else {
        return false;
    };
    if !matches!(last, '.' | '!' | '?') {
        return false;
    }
    let next = after.chars().next().unwrap_or(' ');
    // An operator or punctuation after the terminator continues the expression (`5! = 120`).
    if matches!(
        next,
        '=' | '+'
            | ','
            | ';'
            | ':'
            | '<'
            | '>'
            | '^'
            | '/'
            | '|'
            | ')'
            | ']'
            | '}'
            | '&'
            | '×'
            | '÷'
            | '·'
            | '−'
            | '-'
            | '≤'
            | '≥'
            | '≠'
            | '≈'
    ) || (next == '*' && !after.starts_with("**"))
    {
        return false;
    }
    let terminators = body.trim_end_matches(['.', '!', '?']);
    let run = &body[terminators.len()..];
    if run == "." {
        if next.is_lowercase() {
            return false;
        }
        let word = last_word(terminators);
        if is_abbreviation(word) {
            return false;
        }
        // A list marker alone ("1." or "a." at the start of the action) is not a sentence.
        let head = sentence.trim_start();
        let marker = head.trim_end_matches('.');
        if head.len() == marker.len() + 1
            && (marker.chars().all(|c| c.is_ascii_digit())
                || (marker.len() == 1 && marker.chars().all(char::is_alphabetic)))
            && !marker.is_empty()
        {
            return false;
        }
    }
    true
}

/// The word before a terminator: back to whitespace or an opening bracket or quote.
fn last_word(text: &str) -> &str {
    let start = text
        .rfind(|c: char| c.is_whitespace() || matches!(c, '(' | '[' | '"' | '“' | '\''))
        .map_or(0, |i| {
            i + text[i..].chars().next().map_or(1, char::len_utf8)
        });
    &text[start..]
}

fn is_abbreviation(word: &str) -> bool {
    if word.is_empty() {
        return false;
    }
    let lower = word.to_lowercase();
    if ABBREVIATIONS.contains(&lower.as_str()) {
        return true;
    }
    // Dotted letter groups: "U.S", "a.m", "e.g" written with capitals.
    word.contains('.')
        && word.split('.').all(|part| {
            !part.is_empty() && part.len() <= 2 && part.chars().all(char::is_alphabetic)
        })
}

/// Delimited blocks: opening, closing, and whether the block is a display block.
const DELIMITERS: &[(&str, &str, bool)] = &[
    ("```", "```", true),
    ("$$", "$$", true),
    ("\\[", "\\]", true),
    ("\\(", "\\)", false),
];

/// Byte ranges that must not be split, sorted by start and non-overlapping, each with whether it
/// is a display block (everything but inline `$…$` and `\(…\)`).
fn protected_spans(text: &str) -> Vec<(usize, usize, bool)> {
    let bytes = text.as_bytes();
    let mut spans = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let rest = &text[i..];
        let delimited = DELIMITERS.iter().find_map(|&(open, close, display)| {
            let inner = rest.strip_prefix(open)?;
            Some(
                inner
                    .find(close)
                    .map(|j| (i + open.len() + j + close.len(), display)),
            )
        });
        let found = if let Some(found) = delimited {
            found
        } else if let Some(env) = rest
            .strip_prefix("\\begin{")
            .and_then(|r| r.find('}').map(|j| &r[..j]))
        {
            let close = format!("\\end{{{env}}}");
            rest.find(&close).map(|j| (i + j + close.len(), true))
        } else if rest.starts_with('$') && !(i > 0 && bytes[i - 1] == b'\\') {
            inline_math_end(text, i).map(|end| (end, false))
        } else {
            None
        };
        match found {
            Some((end, display)) => {
                spans.push((i, end, display));
                i = end;
            }
            None => i += next_char(text, i).len_utf8(),
        }
    }
    spans
}

/// The end of inline math opened by the `$` at `open`, by pandoc's rule; none when it does not
/// close before a blank line.
fn inline_math_end(text: &str, open: usize) -> Option<usize> {
    let bytes = text.as_bytes();
    let first = text[open + 1..].chars().next()?;
    if first.is_whitespace() || first == '$' {
        return None;
    }
    let mut j = open + 1;
    while j < bytes.len() {
        match bytes[j] {
            b'\\' => j += 2,
            b'\n'
                if text[j + 1..]
                    .trim_start_matches([' ', '\t', '\r'])
                    .starts_with('\n') =>
            {
                return None;
            }
            b'$' => {
                let before = bytes[j - 1];
                let after = bytes.get(j + 1).copied();
                if !before.is_ascii_whitespace() && !after.is_some_and(|a| a.is_ascii_digit()) {
                    return Some(j + 1);
                }
                j += 1;
            }
            _ => j += 1,
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The actions of `text`, trimmed, after checking that they cover it.
    fn split(text: &str) -> Vec<&str> {
        let segments = segment(text);
        let mut cursor = 0;
        for s in &segments {
            assert_eq!(s.start, cursor, "segments must be contiguous in {text:?}");
            assert!(s.end > s.start, "empty segment in {text:?}");
            cursor = s.end;
        }
        assert_eq!(cursor, text.len(), "segments must cover {text:?}");
        segments.iter().map(|s| s.text(text).trim()).collect()
    }

    #[test]
    fn basic_sentences() {
        assert_eq!(
            split("Hello there. How are you? Fine!"),
            ["Hello there.", "How are you?", "Fine!"]
        );
        assert_eq!(split(""), Vec::<&str>::new());
        assert_eq!(split("one"), ["one"]);
        assert_eq!(split("  lead. Trail.  "), ["lead.", "Trail."]);
        assert_eq!(split("Wait... Let me check."), ["Wait...", "Let me check."]);
        assert_eq!(split("Really?! Yes."), ["Really?!", "Yes."]);
    }

    #[test]
    fn whitespace_goes_to_the_next_action() {
        let text = "A b. C d.\n\nE f.";
        let segments = segment(text);
        let pieces: Vec<&str> = segments.iter().map(|s| s.text(text)).collect();
        assert_eq!(pieces, ["A b.", " C d.", "\n\nE f."]);
    }

    #[test]
    fn decimals_and_numbers_stay_intact() {
        assert_eq!(
            split("The price is 3.5 dollars. Then 0.25 more."),
            ["The price is 3.5 dollars.", "Then 0.25 more."]
        );
        assert_eq!(split("Pi is about 3.14159."), ["Pi is about 3.14159."]);
        assert_eq!(
            split("It costs $12.50 in total. Done."),
            ["It costs $12.50 in total.", "Done."]
        );
    }

    #[test]
    fn abbreviations_stay_intact() {
        assert_eq!(
            split("Use a prime, e.g. 7, here. Next."),
            ["Use a prime, e.g. 7, here.", "Next."]
        );
        assert_eq!(
            split("That is, i.e. The same. Ok."),
            ["That is, i.e. The same.", "Ok."]
        );
        assert_eq!(
            split("Ask Dr. Smith now. Then go."),
            ["Ask Dr. Smith now.", "Then go."]
        );
        assert_eq!(
            split("Python vs. Rust is old. Yes."),
            ["Python vs. Rust is old.", "Yes."]
        );
        assert_eq!(
            split("Born in the U.S. Army. Yes."),
            ["Born in the U.S. Army.", "Yes."]
        );
        assert_eq!(
            split("See Fig. 3 and Eq. 2 for it."),
            ["See Fig. 3 and Eq. 2 for it."]
        );
        assert_eq!(
            split("apples, pears, etc. and more."),
            ["apples, pears, etc. and more."]
        );
    }

    #[test]
    fn latex_stays_intact() {
        assert_eq!(
            split("We get $x = 3. y = 4$ here. Then stop."),
            ["We get $x = 3. y = 4$ here.", "Then stop."]
        );
        assert_eq!(
            split("So \\[ a = 1. \\quad B = 2. \\] Then done."),
            ["So \\[ a = 1. \\quad B = 2. \\]", "Then done."]
        );
        assert_eq!(
            split("Inline \\(p. Q\\) holds. Next."),
            ["Inline \\(p. Q\\) holds.", "Next."]
        );
        assert_eq!(
            split("Display:\n$$\nx = 1.\nY = 2.\n$$\nAfter."),
            ["Display:", "$$\nx = 1.\nY = 2.\n$$", "After."]
        );
        assert_eq!(
            split("\\begin{align} a &= 1. \\\\ B &= 2. \\end{align} End."),
            ["\\begin{align} a &= 1. \\\\ B &= 2. \\end{align}", "End."]
        );
        assert_eq!(
            split("The answer is $\\boxed{3.5}$. Done."),
            ["The answer is $\\boxed{3.5}$.", "Done."]
        );
        assert_eq!(
            split("The answer is \\boxed{42}. Done."),
            ["The answer is \\boxed{42}.", "Done."]
        );
    }

    #[test]
    fn currency_dollars_are_not_math() {
        assert_eq!(
            split("He paid $5. She paid $3. Total $8."),
            ["He paid $5.", "She paid $3.", "Total $8."]
        );
    }

    #[test]
    fn equation_steps_are_one_action_each() {
        assert_eq!(
            split("19 - 5 = 14. 14 + 3 = 17. So 17."),
            ["19 - 5 = 14.", "14 + 3 = 17.", "So 17."]
        );
        assert_eq!(
            split("3 * 4 = 12, 12 / 2 = 6.\n6 + 1 = 7"),
            ["3 * 4 = 12, 12 / 2 = 6.", "6 + 1 = 7"]
        );
        assert_eq!(
            split("So 5! = 120 ways. Next."),
            ["So 5! = 120 ways.", "Next."]
        );
        assert_eq!(
            split("x = 2.5 + 1.5 = 4. Done."),
            ["x = 2.5 + 1.5 = 4.", "Done."]
        );
    }

    #[test]
    fn newlines_and_lists() {
        assert_eq!(
            split("Step one\nStep two\n\nStep three"),
            ["Step one", "Step two", "Step three"]
        );
        assert_eq!(
            split("1. Add the numbers.\n2. Check it."),
            ["1. Add the numbers.", "2. Check it."]
        );
        assert_eq!(
            split("A. First part. B. Second."),
            ["A. First part.", "B. Second."]
        );
        assert_eq!(
            split("- item one\r\n- item two"),
            ["- item one", "- item two"]
        );
    }

    #[test]
    fn closers_after_terminators() {
        assert_eq!(
            split("He said \"stop.\" Then left."),
            ["He said \"stop.\"", "Then left."]
        );
        assert_eq!(
            split("(This is aside.) Main."),
            ["(This is aside.)", "Main."]
        );
        assert_eq!(split("**Answer: 5.** Done."), ["**Answer: 5.**", "Done."]);
    }

    #[test]
    fn lowercase_after_period_continues() {
        assert_eq!(
            split("The value is approx. two. Ok."),
            ["The value is approx. two.", "Ok."]
        );
        assert_eq!(split("We use 3. then 4."), ["We use 3. then 4."]);
    }

    #[test]
    fn unicode_and_code_blocks() {
        assert_eq!(
            split("Café é bon. Très bien."),
            ["Café é bon.", "Très bien."]
        );
        assert_eq!(
            split("Run:\n```\nx = 1. Y = 2.\n\nz\n```\nOk."),
            ["Run:", "```\nx = 1. Y = 2.\n\nz\n```", "Ok."]
        );
        assert_eq!(
            split("日本語。 No split here. Yes."),
            ["日本語。 No split here.", "Yes."]
        );
    }
}
