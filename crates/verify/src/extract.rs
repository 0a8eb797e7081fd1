//! Final-answer extraction from a full model response.
//!
//! [`extract_final`] applies this fallback order:
//! 1. Cut chat-template tokens (`<|im_start|>`, `<|im_end|>`, `<|endoftext|>`, `<|eot_id|>`) and
//!    keep the text after the last `</think>`. A response whose `<think>` never closes is
//!    [`Reason::Truncated`] unless it holds a strong answer (step 3); one whose text after
//!    `</think>` is empty only counts a strong answer.
//! 2. A response that keeps going after its answer is cut: at the first new-question marker
//!    (`Question:`, `Q:`, `Problem:`, `Human:`, `User:`, `### Instruction:` at the start of a line
//!    or a sentence) that follows a strong answer, the rest is a continuation the model invented,
//!    and the answer committed before it counts. A marker with no strong answer before it is
//!    part of the response (`... Question: what is the width? ...`). Inside the kept text the
//!    *last* strong answer still wins, so a response that corrects itself (`\boxed{10}`, then
//!    "I forgot a term", then `\boxed{12}`) counts its correction.
//! 3. Strong answers: the last `\boxed{..}`/`\fbox{..}` (nested braces; adjacent boxes joined by
//!    `,`, `and`, `or` or punctuation form one list), or the last answer marker ("final answer is",
//!    "the answer is", "Answer:", `####`), whichever comes later in the text. A marker's sentence
//!    is reduced to its answer (`The largest $n$ is 34.` gives `34`); its sign is kept (`#### -5`,
//!    `The answer is - 7`), a dash that starts a new line (a list bullet) or a rule `---` is not.
//! 4. With a `length` finish reason (the generation hit its token limit), only an answer that
//!    the model completed counts: a strong answer before a continuation (step 2), or a closed
//!    box that ends the text. Anything else is [`Reason::Truncated`], never the last number seen.
//! 5. A short response that reads as an answer by itself (`1,000.99`, `28 percent`).
//! 6. A response that ends mid-sentence (longer than 300 characters, not ending in `.`, `!`, `$`,
//!    a bracket or a digit) is [`Reason::Truncated`].
//! 7. The last math span (`$..$`, `$$..$$`, `\(..\)`, `\[..\]`) or the last number, whichever ends
//!    later; with neither, [`Reason::NoAnswer`].

use crate::Reason;
use crate::normalize::{fix_doubled_backslashes, is_unit, number_words};

const CHAT_TOKENS: &[&str] = &[
    "<|im_start|>",
    "<|im_end|>",
    "<|endoftext|>",
    "<|eot_id|>",
    "<|end|>",
];
const MARKERS: &[&str] = &[
    "final answer is",
    "final answer:",
    "the answer is",
    "answer is",
    "answer:",
    "####",
];
/// Words that, before a colon, start a new exchange the model invented after answering.
const CONTINUATIONS: &[&str] = &["question", "q", "problem", "human", "user", "instruction"];
/// Continuation markers checked per response (each costs a strong-answer scan of the prefix).
const MAX_CONTINUATION_CHECKS: usize = 8;

/// Extracts the final answer of a model response (see the module docs for the order).
pub fn extract_answer(response: &str) -> Option<String> {
    extract_final(response, false).ok()
}

/// Extracts the final answer of a response, or says why there is none. `hit_length` is true
/// when the generation stopped at its token limit (finish reason `length`).
pub fn extract_final(response: &str, hit_length: bool) -> Result<String, Reason> {
    let text = fix_doubled_backslashes(response);
    let mut body: &str = &text;
    for tok in CHAT_TOKENS {
        if let Some(p) = body.find(tok)
            && !body[..p].trim().is_empty()
        {
            body = &body[..p];
        }
    }
    let mut strong_only = None;
    if let Some(p) = body.rfind("</think>") {
        let after = &body[p + "</think>".len()..];
        if after.trim().is_empty() {
            strong_only = Some(Reason::NoAnswer);
        } else {
            body = after;
        }
    } else if body.contains("<think>") {
        strong_only = Some(Reason::Truncated);
    }
    let committed = match committed_prefix(body) {
        Some(end) => {
            body = &body[..end];
            true
        }
        None => false,
    };
    if hit_length && !committed && !ends_with_closed_box(body) {
        return Err(Reason::Truncated);
    }
    if let Some(a) = strong_answer(body) {
        return Ok(a);
    }
    if let Some(reason) = strong_only {
        return Err(reason);
    }
    weak_answer(body)
}

/// Where a continuation starts: the first new-question marker, at the start of a line or a
/// sentence, with a strong answer before it. One pass over the colons (every marker ends in
/// one), since this runs on every response.
fn committed_prefix(body: &str) -> Option<usize> {
    let bytes = body.as_bytes();
    let mut checks = 0;
    let mut colon = 0;
    while checks < MAX_CONTINUATION_CHECKS {
        // `str::find` with a char uses memchr: this runs over every response.
        colon += body[colon..].find(':')?;
        let word_len = bytes[..colon]
            .iter()
            .rev()
            .take(12)
            .take_while(|c| c.is_ascii_alphabetic())
            .count();
        let pos = colon - word_len;
        colon += 1;
        if !CONTINUATIONS
            .iter()
            .any(|m| m.as_bytes().eq_ignore_ascii_case(&bytes[pos..colon - 1]))
        {
            continue;
        }
        let before = body[..pos].trim_end_matches([' ', '\t', '*', '#']);
        let starts_block = before.ends_with('\n')
            || (bytes.get(pos.wrapping_sub(1)) == Some(&b' ')
                && before.ends_with(['.', '!', '?', '$', '}', ']']));
        if !starts_block || before.trim().is_empty() {
            continue;
        }
        checks += 1;
        if strong_answer(before).is_some() {
            return Some(before.len());
        }
    }
    None
}

/// Whether the text ends with a closed `\boxed{..}` and at most closing punctuation.
fn ends_with_closed_box(body: &str) -> bool {
    let tail = body.trim_end_matches(|c: char| {
        c.is_whitespace() || matches!(c, '.' | '$' | '*' | '!' | ')' | ']' | '\\')
    });
    if !tail.ends_with('}') {
        return false;
    }
    boxes(body)
        .last()
        .is_some_and(|(_, end, _)| *end == tail.len())
}

fn strong_answer(body: &str) -> Option<String> {
    let boxed = last_box_group(body);
    let marker = last_marker(body);
    match (boxed, marker) {
        (Some((_, end, b)), Some((pos, m))) => Some(if pos >= end { m } else { b }),
        (Some((_, _, b)), None) => Some(b),
        (None, Some((_, m))) => Some(m),
        (None, None) => None,
    }
    .filter(|s| !s.trim().is_empty())
}

fn weak_answer(body: &str) -> Result<String, Reason> {
    let trimmed = body.trim();
    if trimmed.is_empty() {
        return Err(Reason::NoAnswer);
    }
    if trimmed.chars().count() <= 100 && reads_as_answer(trimmed) {
        return Ok(trimmed.trim_end_matches('.').trim().to_string());
    }
    if trimmed.len() > 300 {
        let last = trimmed.chars().last().unwrap_or(' ');
        if !(matches!(last, '.' | '!' | '$' | ')' | ']' | '}' | '%') || last.is_ascii_digit()) {
            return Err(Reason::Truncated);
        }
    }
    let math = last_math_span(trimmed);
    let number = last_number(trimmed);
    match (math, number) {
        (Some((me, m)), Some((ne, n))) => Ok(if ne > me { n } else { m }),
        (Some((_, m)), None) => Ok(m),
        (None, Some((_, n))) => Ok(n),
        (None, None) => Err(Reason::NoAnswer),
    }
}

/// Words a short answer may contain besides math: units, percent words, connectives, functions.
fn known_word(w: &str) -> bool {
    let w = w.to_ascii_lowercase();
    is_unit(&w)
        || matches!(
            w.as_str(),
            "and"
                | "or"
                | "percent"
                | "percentage"
                | "pct"
                | "sin"
                | "cos"
                | "tan"
                | "sec"
                | "csc"
                | "cot"
                | "log"
                | "ln"
                | "exp"
                | "sqrt"
                | "pi"
                | "inf"
                | "infty"
                | "gcd"
                | "lcm"
                | "max"
                | "min"
        )
}

/// Whether a short text is an answer by itself rather than a sentence.
pub(crate) fn reads_as_answer(s: &str) -> bool {
    if !s.chars().any(char::is_whitespace) {
        return true;
    }
    let b = s.as_bytes();
    let mut i = 0;
    let mut short_words = 0;
    while i < b.len() {
        if b[i] == b'\\' {
            // Skip a command name; `\text{..}` content is checked like plain words.
            i += 1;
            while i < b.len() && b[i].is_ascii_alphabetic() {
                i += 1;
            }
            continue;
        }
        if b[i].is_ascii_alphabetic() {
            let start = i;
            while i < b.len() && b[i].is_ascii_alphabetic() {
                i += 1;
            }
            let w = &s[start..i];
            if w.len() >= 2 && !known_word(w) {
                // One short word may be a label (`AB = 4`); two are prose (`it is`).
                short_words += 1;
                if w.len() >= 3 || short_words >= 2 {
                    return false;
                }
            }
            continue;
        }
        i += 1;
    }
    true
}

/// Byte ranges and contents of every top-level `\boxed{..}` / `\fbox{..}`.
fn boxes(text: &str) -> Vec<(usize, usize, String)> {
    let b = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let Some(rel) = text[i..].find('\\') else {
            break;
        };
        let start = i + rel;
        let name_end = start
            + 1
            + b[start + 1..]
                .iter()
                .take_while(|c| c.is_ascii_alphabetic())
                .count();
        let name = &text[start + 1..name_end];
        if name != "boxed" && name != "fbox" {
            i = name_end.max(start + 1);
            continue;
        }
        let mut j = name_end;
        while j < b.len() && b[j] == b' ' {
            j += 1;
        }
        if j < b.len() && b[j] == b'{' {
            let mut depth = 0usize;
            let mut k = j;
            let mut end = None;
            while k < b.len() {
                match b[k] {
                    b'\\' => k += 1,
                    b'{' => depth += 1,
                    b'}' => {
                        depth -= 1;
                        if depth == 0 {
                            end = Some(k);
                            break;
                        }
                    }
                    _ => {}
                }
                k += 1;
            }
            match end {
                Some(e) => {
                    out.push((start, e + 1, text[j + 1..e].to_string()));
                    i = e + 1;
                }
                None => {
                    // Unclosed: the box runs to the end of the text.
                    out.push((start, b.len(), text[j + 1..].to_string()));
                    break;
                }
            }
        } else if j > name_end {
            // `\boxed 5`
            let e = j + b[j..]
                .iter()
                .take_while(|c| !c.is_ascii_whitespace() && **c != b'$')
                .count();
            out.push((start, e, text[j..e].to_string()));
            i = e.max(j + 1);
        } else {
            i = name_end;
        }
    }
    out
}

/// Whether the text between two boxes joins them into one answer list.
fn joins(gap: &str) -> bool {
    if gap.len() > 80 {
        return false;
    }
    let mut cleaned = gap.to_string();
    for pat in [
        "\\text", "\\quad", "\\qquad", "\\mathrm", "\\(", "\\)", "\\[", "\\]", "\\,", "\\;", "\\\\",
    ] {
        cleaned = cleaned.replace(pat, " ");
    }
    let words: Vec<String> = cleaned
        .split(|c: char| !c.is_alphabetic())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect();
    words.is_empty() || (words.iter().any(|w| w == "and" || w == "or") && words.len() <= 6)
}

/// The last box and the boxes joined to it: (start, end, contents joined by `, `).
fn last_box_group(text: &str) -> Option<(usize, usize, String)> {
    if !text.contains("\\boxed") && !text.contains("\\fbox") {
        return None;
    }
    let all = boxes(text);
    let (mut start, end, last) = all.last()?.clone();
    let mut parts = vec![last];
    for k in (0..all.len() - 1).rev() {
        if parts.len() >= 32 || !joins(&text[all[k].1..start]) {
            break;
        }
        parts.push(all[k].2.clone());
        start = all[k].0;
    }
    parts.reverse();
    Some((start, end, parts.join(", ")))
}

/// The answer after the last marker: (marker start, answer).
fn last_marker(text: &str) -> Option<(usize, String)> {
    let lower = text.to_ascii_lowercase();
    let (pos, len) = MARKERS
        .iter()
        .filter_map(|m| lower.rfind(m).map(|p| (p, m.len())))
        .max_by_key(|(p, l)| p + l)?;
    let rest = marker_rest(&text[pos + len..]);
    let sentence = sentence(rest);
    let mut s = sentence
        .trim()
        .trim_end_matches(['.', ',', ';', '*', '"', ' '])
        .trim()
        .to_string();
    if let Some(p) = s.to_ascii_lowercase().rfind(" is ")
        && !in_math(&s, p)
    {
        s = s[p + 4..].trim().to_string();
    }
    if s.is_empty() {
        return None;
    }
    if !reads_as_answer(&s) && number_words(&s).is_none() {
        let math = last_math_span(&s);
        let number = last_number(&s);
        s = match (math, number) {
            (Some((me, m)), Some((ne, n))) => {
                if ne > me {
                    n
                } else {
                    m
                }
            }
            (Some((_, m)), None) => m,
            (None, Some((_, n))) => n,
            (None, None) => s,
        };
    }
    Some((pos, s))
}

/// The text after an answer marker, without the marker's punctuation. A `-` right before the
/// answer is its sign (`#### -5`, `Answer: - 7`); a rule (`---`) or a dash that starts a new
/// line (a list bullet) is dropped.
fn marker_rest(rest: &str) -> &str {
    let mut rest = rest;
    loop {
        let trimmed =
            rest.trim_start_matches(|c: char| c.is_whitespace() || matches!(c, ':' | '*' | '"'));
        let newline = rest[..rest.len() - trimmed.len()].contains('\n');
        rest = trimmed;
        if rest.starts_with("--") {
            rest = rest.trim_start_matches('-');
        } else if newline && rest.starts_with("- ") {
            rest = &rest[1..];
        } else {
            return rest;
        }
    }
}

fn in_math(s: &str, pos: usize) -> bool {
    s[..pos].bytes().filter(|&b| b == b'$').count() % 2 == 1
}

/// Whether a `$` followed by `rest` opens math: a closing `$` follows on the same line with no
/// sentence break in between (`$72. She ... $5` is currency).
fn opens_math(rest: &str) -> bool {
    let line = rest.split('\n').next().unwrap_or("");
    line.find('$').is_some_and(|p| !line[..p].contains(". "))
}

/// The first sentence of `s`: up to a newline or a `.` followed by whitespace, outside math.
fn sentence(s: &str) -> &str {
    let b = s.as_bytes();
    let mut dollars = false;
    let mut depth = 0i32;
    let mut paren_math = 0i32;
    let mut i = 0;
    let mut seen = false;
    while i < b.len() && i < 400 {
        let c = b[i];
        match c {
            b'\\' if i + 1 < b.len() => {
                match b[i + 1] {
                    b'(' | b'[' => paren_math += 1,
                    b')' | b']' => paren_math -= 1,
                    _ => {}
                }
                i += 2;
                seen = true;
                continue;
            }
            // A `$` opens math only when another `$` closes it on the same line (else currency).
            b'$' if dollars || opens_math(&s[i + 1..]) => dollars = !dollars,
            b'{' => depth += 1,
            b'}' => depth -= 1,
            b'\n' if seen && !dollars && depth <= 0 && paren_math <= 0 => return &s[..i],
            b'.' if !dollars
                && depth <= 0
                && paren_math <= 0
                && (i + 1 >= b.len() || b[i + 1].is_ascii_whitespace()) =>
            {
                return &s[..i];
            }
            _ => {}
        }
        if !c.is_ascii_whitespace() {
            seen = true;
        }
        i += 1;
    }
    let mut end = i.min(s.len());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// The last math span: (end byte, content).
fn last_math_span(text: &str) -> Option<(usize, String)> {
    let b = text.as_bytes();
    let mut best: Option<(usize, usize, usize)> = None; // content start, content end, span end
    let mut i = 0;
    let mut open: Option<(usize, &str)> = None;
    while i < b.len() {
        if !text.is_char_boundary(i) {
            i += 1;
            continue;
        }
        let rest = &text[i..];
        if let Some((start, delim)) = open {
            if rest.starts_with(delim) {
                best = Some((start, i, i + delim.len()));
                i += delim.len();
                open = None;
                continue;
            }
            if b[i] == b'\\' && delim == "$" && rest.starts_with("\\$") {
                i += 2;
                continue;
            }
        } else if rest.starts_with("$$") {
            open = Some((i + 2, "$$"));
            i += 2;
            continue;
        } else if rest.starts_with("\\$") {
            i += 2;
            continue;
        } else if b[i] == b'$' {
            open = Some((i + 1, "$"));
        } else if rest.starts_with("\\(") {
            open = Some((i + 2, "\\)"));
            i += 2;
            continue;
        } else if rest.starts_with("\\[") {
            open = Some((i + 2, "\\]"));
            i += 2;
            continue;
        }
        i += 1;
    }
    let (s, e, end) = best?;
    let content = text[s..e].trim();
    (!content.is_empty()).then(|| (end, content.to_string()))
}

/// The last number in plain text (`1,000.99`, `2/3`, `-5`, `100%`): (end byte, text).
fn last_number(text: &str) -> Option<(usize, String)> {
    let b = text.as_bytes();
    let mut i = b.len();
    while i > 0 {
        i -= 1;
        if !b[i].is_ascii_digit() {
            continue;
        }
        // Extend backwards over digits and in-number separators.
        let end = i + 1;
        let mut start = i;
        while start > 0 {
            let c = b[start - 1];
            let digit_before = |k: usize| start >= k && b[start - k].is_ascii_digit();
            if c.is_ascii_digit()
                || (matches!(c, b',' | b'.' | b'/' | b'e' | b'E') && digit_before(2))
            {
                start -= 1;
            } else if matches!(c, b'-' | b'+')
                && start >= 3
                && matches!(b[start - 2], b'e' | b'E')
                && digit_before(3)
            {
                // Scientific notation `1e-6`.
                start -= 2;
            } else if c == b' '
                && digit_before(2)
                && b[start..].iter().take_while(|d| d.is_ascii_digit()).count() == 3
            {
                // Space-separated thousands `1 000 000`.
                start -= 1;
            } else {
                break;
            }
        }
        if start > 0 && b[start - 1] == b'^' {
            // A power `3 × 10^5`: take the whole product.
            let head = &text[..start - 1];
            let kept = head
                .char_indices()
                .rev()
                .take_while(|(_, c)| {
                    c.is_ascii_digit() || matches!(c, '.' | ' ' | '×' | '*' | '·' | '{' | '}' | '-')
                })
                .last()
                .map_or(start - 1, |(p, _)| p);
            let expr = text[kept..end]
                .trim_start_matches([' ', '×', '*', '·'])
                .to_string();
            return Some((end, expr));
        }
        if start > 0 && (b[start - 1].is_ascii_alphabetic() || b[start - 1] == b'_') {
            i = start;
            continue;
        }
        if start > 0 && b[start - 1] == b'-' {
            start -= 1;
        }
        let mut stop = end;
        if stop < b.len() && b[stop] == b'%' {
            stop += 1;
        }
        return Some((stop, text[start..stop].to_string()));
    }
    None
}

/// The answer part of a gold: its boxed group, the extracted answer of a full solution, or
/// the gold itself.
pub(crate) fn gold_answer(gold: &str) -> String {
    let g = fix_doubled_backslashes(gold);
    if let Some((_, _, b)) = last_box_group(&g) {
        return b;
    }
    let lower = g.to_ascii_lowercase();
    if (g.len() > 120 || MARKERS.iter().any(|m| lower.contains(m)))
        && let Some(a) = strong_answer(&g).or_else(|| weak_answer(&g).ok())
    {
        return a;
    }
    g.trim().to_string()
}

fn clean_choice(s: &str) -> String {
    let mut t = s.trim().to_string();
    for pat in [
        "\\textbf", "\\text", "\\mathrm", "\\mathbf", "\\boxed", "\\(", "\\)", "\\ ", "$", "**",
        "{", "}",
    ] {
        t = t.replace(pat, "");
    }
    let t = t.trim();
    let t = ["option", "Option", "choice", "Choice"]
        .iter()
        .find_map(|p| t.strip_prefix(p))
        .unwrap_or(t);
    t.trim().to_string()
}

/// A multiple-choice letter written alone: `B`, `(B)`, `B)`, `B.`, `\text{(B)}`, `**B**`.
pub(crate) fn choice_letter(s: &str, max: char) -> Option<char> {
    let t = clean_choice(s);
    let t = t.trim_end_matches(['.', ':']).trim();
    let inner = t
        .strip_prefix('(')
        .and_then(|x| x.strip_suffix(')'))
        .or_else(|| t.strip_suffix(')'))
        .unwrap_or(t);
    let mut chars = inner.chars();
    match (chars.next(), chars.next()) {
        (Some(c), None) if c.is_ascii_uppercase() && c <= max => Some(c),
        _ => None,
    }
}

/// A letter leading an answer: `(B) 42`, `B) 42`, `B. 42`, `C, because`.
fn leading_choice(s: &str, max: char) -> Option<char> {
    let t = clean_choice(s);
    let paren = t.starts_with('(');
    let t = t.trim_start_matches('(');
    let mut it = t.chars();
    let c = it.next()?;
    let d = it.next()?;
    (c.is_ascii_uppercase()
        && c <= max
        && (matches!(d, ')' | '.' | ':' | ',') || (paren && d == ')')))
        .then_some(c)
}

/// The chosen letter of a multiple-choice response and the text it came from.
pub(crate) fn extract_choice(response: &str, max: char) -> Option<(char, String)> {
    if let Some(a) = extract_answer(response)
        && let Some(c) = choice_letter(&a, max).or_else(|| leading_choice(&a, max))
    {
        return Some((c, a));
    }
    // The last `(X)`, or `X` after "is", "option", "choice", "answer", "select", "choose".
    let text = fix_doubled_backslashes(response);
    let b = text.as_bytes();
    (0..b.len()).rev().find_map(|i| {
        let c = b[i] as char;
        if !(c.is_ascii_uppercase() && c <= max)
            || b.get(i + 1).is_some_and(u8::is_ascii_alphanumeric)
        {
            return None;
        }
        if i >= 1 && b[i - 1] == b'(' && b.get(i + 1) == Some(&b')') {
            return Some((c, format!("({c})")));
        }
        let before = text[..i]
            .trim_end_matches([' ', '*', ':'])
            .to_ascii_lowercase();
        let cue = ["is", "option", "choice", "answer", "select", "choose"]
            .iter()
            .any(|w| {
                before.ends_with(w)
                    && !before[..before.len() - w.len()]
                        .ends_with(|x: char| x.is_ascii_alphabetic())
            });
        (cue && i >= 1 && matches!(b[i - 1], b' ' | b'*' | b':')).then(|| (c, c.to_string()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(s: &str) -> Option<String> {
        extract_answer(s)
    }

    #[test]
    fn boxed_nested_and_last() {
        assert_eq!(
            ex("so \\boxed{1} then \\boxed{\\frac{1}{2}}."),
            Some("\\frac{1}{2}".into())
        );
        assert_eq!(ex("\\fbox{7}"), Some("7".into()));
        assert_eq!(ex("\\boxed{1} and \\boxed{2}"), Some("1, 2".into()));
        assert_eq!(ex("\\boxed{1} no no no no no \\boxed{2}"), Some("2".into()));
        assert_eq!(ex("\\boxed 5$"), Some("5".into()));
        assert_eq!(ex("x = \\boxed{3"), Some("3".into()));
    }

    #[test]
    fn markers() {
        assert_eq!(ex("blah\n#### 72"), Some("72".into()));
        assert_eq!(ex("The answer is 12."), Some("12".into()));
        assert_eq!(
            ex("The answer is $72. That is what she earns, and $5 more."),
            Some("$72".into())
        );
        assert_eq!(ex("Answer: B"), Some("B".into()));
        assert_eq!(
            ex("Final Answer: The largest $n$ is 34."),
            Some("34".into())
        );
        assert_eq!(
            ex("Final Answer: Jane started growing Sphere 3 hours ago."),
            Some("3".into())
        );
        assert_eq!(
            ex("\\boxed{5}. Final Answer: The final answer is $6$. I hope it is correct."),
            Some("$6$".into())
        );
    }

    // See: #16
    #[test]
    fn marker_keeps_the_sign() {
        assert_eq!(ex("12 - 17 = -5.\n#### -5"), Some("-5".into()));
        assert_eq!(ex("The answer is -3."), Some("-3".into()));
        assert_eq!(ex("Answer: - 7"), Some("- 7".into()));
        assert_eq!(ex("Answer:\n- 7"), Some("7".into()));
        assert_eq!(ex("Final answer: --- 4"), Some("4".into()));
    }

    // See: #16
    #[test]
    fn continuation_after_a_committed_answer() {
        assert_eq!(
            ex("So \\boxed{17}. Question: What is 5 + 6? Answer: 11"),
            Some("17".into())
        );
        assert_eq!(
            ex("#### 36\n\nQ: How many cows?\nA: The answer is 6."),
            Some("36".into())
        );
        // No answer before the marker: it belongs to the response.
        assert_eq!(
            ex("Question: what is 2 + 2? We add. The answer is 4."),
            Some("4".into())
        );
        // Corrections within the response still count.
        assert_eq!(ex("\\boxed{10}, no: \\boxed{12}"), Some("12".into()));
    }

    // See: #16
    #[test]
    fn truncation_by_length() {
        assert_eq!(
            extract_final("We get 3, then 7, then 13", true),
            Err(Reason::Truncated)
        );
        assert_eq!(
            extract_final("The sum is \\boxed{17}.", true),
            Ok("17".into())
        );
        assert_eq!(
            extract_final("The sum is \\boxed{17}.\nQuestion: 5 + 6?\nAnswer: 1", true),
            Ok("17".into())
        );
        assert_eq!(extract_final("", false), Err(Reason::NoAnswer));
        assert_eq!(
            extract_final("<think>so 3 and", false),
            Err(Reason::Truncated)
        );
        assert_eq!(
            extract_final("<think>x</think>", false),
            Err(Reason::NoAnswer)
        );
    }

    #[test]
    fn think_and_chat_tokens() {
        assert_eq!(
            ex("<think>maybe 3</think> The answer is 4."),
            Some("4".into())
        );
        assert_eq!(ex("<think>so the value is 3 and"), None);
        assert_eq!(ex("<think>ok \\boxed{9}"), Some("9".into()));
        assert_eq!(
            ex("the result is 2/3. <|im_start|>user"),
            Some("2/3".into())
        );
    }

    #[test]
    fn weak_fallbacks() {
        assert_eq!(ex("1,000.99"), Some("1,000.99".into()));
        assert_eq!(
            ex("the number is not 10 which is 1,000.99€"),
            Some("1,000.99".into())
        );
        assert_eq!(ex("Answer \\( (9+1) \\)"), Some("(9+1)".into()));
        assert_eq!(ex("AZYUK2A"), Some("AZYUK2A".into()));
        let truncated = format!(
            "{} so we compute the sum and get",
            "We need to find x. ".repeat(20)
        );
        assert_eq!(ex(&truncated), None);
    }

    #[test]
    fn choices() {
        assert_eq!(choice_letter("\\text{(C)}", 'J'), Some('C'));
        assert_eq!(choice_letter("B)", 'J'), Some('B'));
        assert_eq!(choice_letter("e", 'J'), None);
        assert_eq!(
            extract_choice("I pick (B) because it is right.", 'J').map(|c| c.0),
            Some('B')
        );
        assert_eq!(extract_choice("Answer: C) 42", 'J').map(|c| c.0), Some('C'));
        assert_eq!(
            extract_choice("The answer is **D**.", 'J').map(|c| c.0),
            Some('D')
        );
        assert_eq!(
            extract_choice("The answer is $\\boxed{\\textbf{(A)}\\ 12}$", 'J').map(|c| c.0),
            Some('A')
        );
        assert_eq!(
            extract_choice("I think the answer is C, because it fits.", 'J').map(|c| c.0),
            Some('C')
        );
        assert_eq!(
            extract_choice("The correct answer is option E.", 'J').map(|c| c.0),
            Some('E')
        );
    }

    #[test]
    fn gold_forms() {
        assert_eq!(gold_answer("42"), "42");
        assert_eq!(gold_answer("so $x = \\boxed{2\\sqrt{3}}$."), "2\\sqrt{3}");
        assert_eq!(gold_answer("\\\\boxed{004}"), "004");
    }
}
