//! Integration tests of retort-verify: the public math-verify cases, feature cases on full
//! responses, and robustness on hostile input.

use retort_verify::{
    PercentPolicy, Reason, VerifyOptions, equivalent, extract_answer, verify, verify_finished,
};
use std::time::{Duration, Instant};

const CASES: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../../shared/data/verify/mathverify-tests.jsonl"
);

struct Case {
    id: String,
    gold: String,
    pred: String,
    truth: bool,
    config_dependent: bool,
}

fn load_cases() -> Vec<Case> {
    let text = fs_err::read_to_string(CASES).unwrap_or_else(|e| panic!("{CASES}: {e}"));
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            let v: serde_json::Value =
                serde_json::from_str(l).unwrap_or_else(|e| panic!("{CASES}:{}: {e}", i + 1));
            let s = |k: &str| {
                v[k].as_str()
                    .unwrap_or_else(|| panic!("{CASES}:{}: field `{k}`", i + 1))
                    .to_string()
            };
            Case {
                id: s("id"),
                gold: s("gold"),
                pred: s("pred"),
                truth: v["truth"].as_bool().expect("truth is a bool"),
                config_dependent: v["config_dependent"]
                    .as_bool()
                    .expect("config_dependent is a bool"),
            }
        })
        .collect()
}

#[test]
fn mathverify_agreement_at_least_99_2_percent() {
    let opts = VerifyOptions::default();
    let cases: Vec<Case> = load_cases()
        .into_iter()
        .filter(|c| !c.config_dependent)
        .collect();
    assert!(
        cases.len() > 200,
        "expected the full case file, got {}",
        cases.len()
    );
    let mut misses = Vec::new();
    for c in &cases {
        if std::env::var_os("VERIFY_TRACE").is_some() {
            eprintln!("case {}", c.id);
        }
        let v = verify(&c.pred, &c.gold, &opts);
        if v.correct != c.truth {
            misses.push(format!(
                "  {} truth={} got={} extracted={:?} gold={:?}",
                c.id,
                c.truth,
                v.correct,
                v.extracted
                    .as_deref()
                    .map(|s| s.chars().take(80).collect::<String>()),
                c.gold.chars().take(80).collect::<String>()
            ));
        }
    }
    let agreement = 1.0 - misses.len() as f64 / cases.len() as f64;
    println!("misses ({}):\n{}", misses.len(), misses.join("\n"));
    println!(
        "agreement {:.2}% on {} cases",
        100.0 * agreement,
        cases.len()
    );
    assert!(agreement >= 0.992, "agreement {agreement:.4} below 0.992");
}

fn yes(response: &str, gold: &str) -> bool {
    verify(response, gold, &VerifyOptions::default()).correct
}

fn eqv(a: &str, b: &str) -> bool {
    equivalent(a, b, &VerifyOptions::default())
}

#[test]
fn numbers_fractions_and_decimals() {
    assert!(eqv("0.5", "\\frac{1}{2}"));
    assert!(eqv("\\frac12", "1/2"));
    assert!(eqv("\\dfrac{3}{4}", "0.75"));
    assert!(eqv("\\tfrac{6}{8}", "3/4"));
    assert!(eqv("-\\frac{10}{9}", "-10/9"));
    assert!(eqv("3\\frac{1}{2}", "7/2"));
    assert!(eqv("3 1/2", "3.5"));
    assert!(eqv("1½", "3/2"));
    assert!(!eqv("0.33", "\\frac13"));
    assert!(!eqv("0.333", "1/3"));
    assert!(!eqv("1.414", "\\sqrt{2}"));
    assert!(!eqv("3.14", "\\pi"));
    assert!(eqv("1000", "1000.0"));
    assert!(!eqv("12", "13"));
    assert!(eqv("0.\\overline{3}", "\\frac{1}{3}"));
    assert!(eqv("0.1\\overline{6}", "1/6"));
    assert!(eqv("2:4", "1:2"));
    assert!(!eqv("12:00", "1:00"));
}

#[test]
fn tolerance_option() {
    let opts = VerifyOptions {
        float_tolerance: Some(1e-3),
        ..VerifyOptions::default()
    };
    assert!(equivalent("1.414", "\\sqrt{2}", &opts));
    assert!(equivalent("0.3333", "1/3", &opts));
    assert!(!equivalent("1.5", "\\sqrt{2}", &opts));
}

#[test]
fn thousands_separators() {
    assert!(eqv("7,425,000", "7425000"));
    assert!(eqv("1\u{2009}000\u{2009}000", "1000000"));
    assert!(eqv("1\u{202F}234", "1234"));
    assert!(eqv("12\\,345", "12345"));
    assert!(eqv("14{,}916", "14916"));
    assert!(eqv("1 000", "1000"));
    assert!(!eqv("32, 349", "32349"));
}

#[test]
fn scientific_notation() {
    assert!(eqv("1e-6", "0.000001"));
    assert!(eqv("1e-6", "10^{-6}"));
    assert!(eqv("6.02\\times10^{23}", "602000000000000000000000"));
    assert!(eqv("6.02 \\cdot 10^{23}", "6.02e23"));
    assert!(!eqv("1e-6", "1e-5"));
}

#[test]
fn percent_policies() {
    assert!(eqv("28\\%", "28"));
    assert!(eqv("28\\%", "0.28"));
    assert!(eqv("28 percent", "28\\%"));
    let strict = VerifyOptions {
        percent: PercentPolicy::Strict,
        ..VerifyOptions::default()
    };
    assert!(!equivalent("28\\%", "28", &strict));
    assert!(equivalent("28\\%", "0.28", &strict));
    let ignore = VerifyOptions {
        percent: PercentPolicy::Ignore,
        ..VerifyOptions::default()
    };
    assert!(equivalent("28\\%", "28", &ignore));
    assert!(!equivalent("28\\%", "0.28", &ignore));
}

#[test]
fn radicals_constants_and_complex() {
    assert!(eqv("2\\sqrt{3}", "\\sqrt{12}"));
    assert!(eqv("2\\sqrt3", "2 √3"));
    assert!(eqv("\\sqrt{8}", "2\\sqrt{2}"));
    assert!(eqv("\\frac{\\sqrt{3}}{3}", "\\frac{1}{\\sqrt{3}}"));
    assert!(eqv("\\sqrt[3]{27}", "3"));
    assert!(eqv("2\\pi", "2π"));
    assert!(eqv("\\frac{\\pi}{2}", "π/2"));
    assert!(eqv("e^2", "\\mathrm{e}^2"));
    assert!(eqv("3+4i", "4i+3"));
    assert!(eqv("i^2", "-1"));
    assert!(!eqv("3+4i", "3-4i"));
    assert!(!eqv("2\\sqrt{3}", "3\\sqrt{2}"));
}

#[test]
fn units_text_degrees_dollars() {
    assert!(eqv("5 \\text{ cm}", "5"));
    assert!(eqv("15\\mbox{ cm}^2", "15"));
    assert!(eqv("90^\\circ", "90"));
    assert!(eqv("90°", "90"));
    assert!(eqv("\\$18.90", "18.9"));
    assert!(eqv("18.90 dollars", "18.9"));
    assert!(eqv("\\text{Evelyn}", "Evelyn"));
    assert!(!eqv("\\text{Evelyn}", "\\text{Briana}"));
}

#[test]
fn expressions_by_evaluation() {
    assert!(eqv("2x+1", "1+2x"));
    assert!(eqv("(x+1)^2", "x^2+2x+1"));
    assert!(eqv("\\frac{x+2}{7}", "\\frac{x}{7}+\\frac{2}{7}"));
    assert!(eqv("\\tan^2(y)+1", "\\sec^2(y)"));
    assert!(eqv("\\sin^2 x + \\cos^2 x", "1"));
    assert!(!eqv("2x+1", "2x-1"));
    assert!(!eqv("x+2n+1", "x+1"));
    assert!(!eqv("f(x)", "f(y)"));
}

#[test]
fn equations_and_inequalities() {
    assert!(eqv("x = 3", "3"));
    assert!(eqv("3", "x=3"));
    assert!(eqv("y = 2x+1", "2x+1"));
    assert!(!eqv("x^2+y^2=1", "1"));
    assert!(eqv("2x+4y-3=0", "y=-\\frac{1}{2}x+\\frac{3}{4}"));
    assert!(eqv("x \\geq 5", "5 \\le x"));
    assert!(eqv("x < 1", "-x > -1"));
    assert!(!eqv("x < 1", "x > -1"));
    assert!(eqv("x \\ge 2", "[2, \\infty)"));
    assert!(eqv("-2 \\le x \\le 7", "x \\in [-2,7]"));
}

#[test]
fn tuples_intervals_sets_matrices() {
    assert!(eqv("(1, 2)", "(1,2)"));
    assert!(!eqv("(1, 2)", "(2, 1)"));
    assert!(eqv("[0, 1)", "[0,1)"));
    assert!(!eqv("[0, 1)", "(0, 1)"));
    assert!(!eqv("[0, 1]", "[0, 1)"));
    assert!(eqv("(-\\infty, 3) \\cup (4, \\infty)", "(-∞,3)∪(4,∞)"));
    assert!(eqv("\\{1, 2, 3\\}", "\\{3, 1, 2\\}"));
    assert!(eqv("1, 2, 3", "3, 2 and 1"));
    assert!(!eqv("\\{1, 2\\}", "\\{1, 2, 3\\}"));
    assert!(eqv(
        "\\begin{pmatrix} 1 & 2 \\\\ 3 & 4 \\end{pmatrix}",
        "\\begin{bmatrix}1&2\\\\3&4\\end{bmatrix}"
    ));
    assert!(!eqv(
        "\\begin{pmatrix} 1 & 2 \\\\ 3 & 4 \\end{pmatrix}",
        "\\begin{pmatrix} 1 & 2 \\\\ 3 & 5 \\end{pmatrix}"
    ));
    assert!(eqv("\\left( \\frac{1}{2}, 3 \\right)", "(0.5, 3)"));
    let id = "\\begin{pmatrix}1 & 0 \\\\ 0 & 1\\end{pmatrix}";
    assert!(eqv(&format!("{id} {id}"), id));
    assert!(eqv(
        &format!("2{id}"),
        "\\begin{pmatrix}2 & 0 \\\\ 0 & 2\\end{pmatrix}"
    ));
    assert!(!eqv(&format!("{id} + {id}"), id));
}

#[test]
fn plus_minus() {
    assert!(eqv("\\pm 2", "\\{-2, 2\\}"));
    assert!(eqv("1 \\pm \\sqrt{19}", "1+\\sqrt{19}, 1-\\sqrt{19}"));
    assert!(eqv("±3", "3, -3"));
    assert!(!eqv("\\pm 2", "2"));
}

#[test]
fn unicode_math() {
    assert!(eqv("½", "0.5"));
    assert!(eqv("√2", "\\sqrt{2}"));
    assert!(eqv("3×4", "12"));
    assert!(eqv("12÷4", "3"));
    assert!(eqv("−5", "-5"));
    assert!(eqv("x ≤ 3", "x \\le 3"));
    assert!(eqv("45°", "45"));
}

#[test]
fn multiple_choice() {
    assert!(yes("The answer is (B).", "B"));
    assert!(yes(
        "After checking each option, B) 42 is right.\nAnswer: B",
        "B"
    ));
    assert!(!yes("answer: c", "C"));
    assert!(yes(
        "Thus the correct choice is $\\boxed{\\text{(C)}}$.",
        "\\text{C}"
    ));
    assert!(yes("I think (A) is wrong, so the answer is D.", "(D)"));
    assert!(!yes("The answer is (B).", "C"));
}

#[test]
fn full_responses() {
    assert!(yes("Natalia sold 48/2 = 24 clips in May.\n#### 72", "72"));
    assert!(yes("So the total is 72 dollars. The answer is 72.", "72"));
    assert!(yes(
        "<think>Let me think... maybe 5? No.</think>\nThe final answer is $\\boxed{6}$.",
        "6"
    ));
    assert!(!yes(
        "<think>Let me compute 2+3 = 5 and then we need to",
        "5"
    ));
    assert!(yes("We get $x = \\boxed{2\\sqrt{3}}$.", "2\\sqrt{3}"));
    assert!(yes(
        "Final Answer: The final answer is $\\frac{3}{4}$. I hope it is correct.",
        "\\frac{3}{4}"
    ));
    assert!(yes("Thus the answer is 1,234,567.", "1234567"));
    assert!(yes("It is 0.000001, i.e. 1e-6", "1e-6"));
    assert!(!yes("", "1"));
    let truncated = format!(
        "{}and so the remaining amount is",
        "We compute the sum of the first terms step by step. ".repeat(10)
    );
    assert!(!yes(&truncated, "10"));
}

#[test]
fn extract_answer_order() {
    assert_eq!(
        extract_answer("x \\boxed{3} and then The answer is 4."),
        Some("4".to_string())
    );
    assert_eq!(
        extract_answer("The answer is 4. Thus \\boxed{5}"),
        Some("5".to_string())
    );
    assert_eq!(extract_answer("</think>"), None);
}

/// Realistic responses against dataset golds, each with the mathematically right verdict.
#[test]
fn realistic_responses() {
    let o = VerifyOptions::default();
    let cases: &[(&str, &str, bool)] = &[
        ("We get $x = \\boxed{2\\sqrt3}$.", "2\\sqrt{3}", true),
        ("so it's \\boxed{\\sqrt{12}}", "2\\sqrt{3}", true),
        ("The answer is 3.464", "2\\sqrt{3}", false),
        ("**Final Answer:** 42", "42", true),
        ("The answer is: **42**", "42", true),
        ("Answer: $1\\,000\\,000$", "1000000", true),
        ("Thus we need 1 000 000 grains.", "1000000", true),
        ("The final answer is 1\u{202F}000.", "1000", true),
        ("The answer is 1e-6.", "0.000001", true),
        ("The probability is $\\frac{1}{2}$.", "0.5", true),
        (
            "The area is $\\boxed{12\\pi \\text{ cm}^2}$",
            "12\\pi",
            true,
        ),
        ("Therefore the angle is $\\boxed{30^{\\circ}}$.", "30", true),
        ("The angle is 30°.", "30^\\circ", true),
        ("It costs $\\boxed{\\$18.90}$.", "18.90", true),
        (
            "x = 5 or x = -2, so \\boxed{x = -2 \\text{ or } x = 5}",
            "-2, 5",
            true,
        ),
        (
            "\\boxed{(-\\infty, -2) \\cup (3, \\infty)}",
            "(-\\infty,-2)\\cup(3,\\infty)",
            true,
        ),
        (
            "\\boxed{x<-2 \\text{ or } x>3}",
            "(-\\infty,-2)\\cup(3,\\infty)",
            true,
        ),
        ("The answer is (C) 15.", "C", true),
        ("Among the options, the correct one is B.", "B", true),
        ("Answer: D", "(D)", true),
        ("So the answer is ½.", "\\frac12", true),
        (
            "√2/2 is the value, so the answer is √2/2",
            "\\frac{\\sqrt{2}}{2}",
            true,
        ),
        ("The result is 3 × 10^5", "300000", true),
        ("The answer is $6.02 \\times 10^{23}$", "6.02e23", true),
        ("−3", "-3", true),
        ("\\boxed{\\dfrac{3}{4}}", "0.75", true),
        ("\\boxed{0.75}", "\\frac34", true),
        ("\\boxed{0.33}", "\\frac13", false),
        ("\\boxed{5\\%}", "0.05", true),
        (
            "\\boxed{\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}}",
            "\\begin{pmatrix}1\\\\2\\end{pmatrix}",
            true,
        ),
        // A column vector is the tuple of its entries. See: #16
        (
            "\\boxed{(1,2)}",
            "\\begin{pmatrix}1\\\\2\\end{pmatrix}",
            true,
        ),
        ("The answer is 16 and 17", "16, 17", true),
        ("\\boxed{\\{1, 2, 3\\}}", "\\{3, 2, 1\\}", true),
        ("\\boxed{3 + 2i}", "3+2i", true),
        ("\\boxed{y = 2x + 3}", "y=2x+3", true),
        ("\\boxed{f(x) = x^2}", "x^2", true),
        ("\\boxed{\\frac{x^2-1}{x-1}}", "x+1", true),
        (
            "<think>The answer is probably 4 but let me check ... so it's 5</think>\n\nThe answer is $\\boxed{5}$",
            "5",
            true,
        ),
        (
            "<think>I need to compute... 2+2 = 4. Wait, let me reconsider the problem from the start and",
            "4",
            false,
        ),
        (
            "Let me solve. First, 3 + 4 = 7. Then we multiply by 2 to get",
            "14",
            false,
        ),
        (
            "Natalia sold 48 clips in April and 24 in May. 48 + 24 = 72.\n#### 72",
            "72",
            true,
        ),
        ("The answer is $\\boxed{\\text{(B)}}$", "B", true),
        ("\\boxed{B}", "B", true),
        ("\\boxed{12}", "B", false),
        ("The answer is 10%.", "10", true),
        ("The answer is 10%.", "0.1", true),
        (
            "\\boxed{\\frac{\\sqrt{3}}{2}}",
            "\\frac{1}{2}\\sqrt{3}",
            true,
        ),
        ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}", true),
        (
            "\\boxed{\\frac{1+\\sqrt{5}}{2}}",
            "\\frac{\\sqrt5+1}{2}",
            true,
        ),
        ("\\boxed{1.5}", "\\frac{3}{2}", true),
        ("\\boxed{3\\frac{1}{2}}", "\\frac72", true),
        ("\\boxed{\\text{Monday}}", "Monday", true),
        ("\\boxed{\\text{no}}", "\\text{No}", true),
        ("\\boxed{10}", "10.0", true),
        ("The answer is $1,\\!000$.", "1000", true),
        ("\\boxed{[2, 5)}", "2 \\le x < 5", true),
        ("\\boxed{2 \\le x < 5}", "[2,5)", true),
        ("\\boxed{\\pi/2}", "\\frac{\\pi}{2}", true),
        // 90 degrees is π/2 radians. See: #16
        ("\\boxed{90^\\circ}", "\\frac{\\pi}{2}", true),
        ("\\boxed{90^\\circ}", "\\frac{\\pi}{3}", false),
        ("\\boxed{a = 2, b = 3}", "(2,3)", true),
        ("\\boxed{\\$1,234.56}", "1234.56", true),
        ("\\boxed{8 \\text{ apples}}", "8", true),
        ("\\boxed{-\\frac{1}{2}}", "-0.5", true),
        ("\\boxed{\\infty}", "\\infty", true),
        ("\\boxed{2^{10}}", "1024", true),
        ("\\boxed{\\binom{5}{2}}", "10", true),
        ("\\boxed{5!}", "120", true),
        ("\\boxed{\\log_2 8}", "3", true),
        ("\\boxed{e^{i\\pi}}", "-1", true),
        ("\\boxed{4} \\text{ and } \\boxed{5}", "\\{4,5\\}", true),
        ("\\boxed{x \\in (0, 1]}", "(0,1]", true),
        ("\\boxed{\\text{A}}", "A", true),
        ("So $n = \\boxed{7}$.", "n = 7", true),
        ("The answer is 0.5.", "50\\%", true),
        ("\\boxed{1/3}", "0.\\overline{3}", true),
    ];
    let mut misses = Vec::new();
    for (resp, gold, want) in cases {
        let v = verify(resp, gold, &o);
        if v.correct != *want {
            misses.push(format!(
                "want={want} extracted={:?} gold={gold:?} response={resp:?}",
                v.extracted
            ));
        }
    }
    assert!(misses.is_empty(), "misses:\n{}", misses.join("\n"));
}

/// A tiny deterministic generator (xorshift64*) for nasty strings.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

const PIECES: &[&str] = &[
    "\\frac",
    "\\sqrt",
    "{",
    "}",
    "(",
    ")",
    "[",
    "]",
    "\\{",
    "\\}",
    "^",
    "_",
    "\\boxed{",
    "$",
    "$$",
    "\\(",
    "\\)",
    "1",
    "0",
    "9",
    "10",
    "x",
    "y",
    "e",
    "i",
    "\\pi",
    ",",
    ";",
    "=",
    "<",
    "\\le",
    "\\pm",
    "+",
    "-",
    "*",
    "/",
    "!",
    "%",
    "\\%",
    "\\begin{pmatrix}",
    "\\end{pmatrix}",
    "&",
    "\\\\",
    "\\text{",
    "cm",
    " and ",
    "\\sum_{k=1}^{",
    "|",
    "\\left(",
    "\\right)",
    "½",
    "√",
    "π",
    "°",
    "×",
    "−",
    "\u{2009}",
    ".",
    "1e999",
    "10^10^10",
    "\\cup",
    "</think>",
    "<think>",
    "The answer is ",
    "#### ",
    "\\",
    "\\binom",
    "\\lfloor",
    "\\rfloor",
    "\\ln",
    "\\sin",
    ":",
    "(B)",
    "\\infty",
    "\u{0}",
    "é",
    "\\mathrm{",
    "'",
    "0.",
    ".5",
    "99999999999999999999999999999999999999999",
    "\\varnothing",
    "\\setminus",
    "\\mathbb{R}",
    "^\\circ",
    "°",
    "Question: ",
    "\nQ:",
    "twenty-one",
    " hours",
    "\\text{ km/h}",
];

fn random_string(rng: &mut Rng, max_pieces: usize) -> String {
    let n = rng.below(max_pieces) + 1;
    (0..n).map(|_| PIECES[rng.below(PIECES.len())]).collect()
}

fn check_bounded(response: &str, gold: &str) {
    let opts = VerifyOptions::default();
    let start = Instant::now();
    let _ = verify(response, gold, &opts);
    let _ = equivalent(response, gold, &opts);
    let _ = equivalent(gold, response, &opts);
    let took = start.elapsed();
    assert!(
        took < Duration::from_secs(1),
        "took {took:?} on response {:?} gold {:?}",
        short(response),
        short(gold)
    );
}

fn short(s: &str) -> String {
    s.chars().take(120).collect()
}

#[test]
fn never_panics_on_random_strings() {
    let mut rng = Rng(0x1234_5678_9ABC_DEF1);
    for _ in 0..3000 {
        let a = random_string(&mut rng, 24);
        let b = random_string(&mut rng, 12);
        check_bounded(&a, &b);
    }
}

#[test]
fn never_panics_on_deep_and_huge_inputs() {
    let deep_parens = format!("{}1{}", "(".repeat(10_000), ")".repeat(10_000));
    let deep_braces = format!("\\boxed{{{}1{}}}", "{".repeat(10_000), "}".repeat(10_000));
    let deep_frac = format!("{}1{}", "\\frac{1}{".repeat(10_000), "}".repeat(10_000));
    let unbalanced = "{(\\frac{[".repeat(20_000);
    let tower = vec!["10"; 5000].join("^");
    let big_sum = (0..20_000).map(|_| "1").collect::<Vec<_>>().join("+");
    let megabyte = "The answer is 12345. ".repeat(50_000);
    let megabyte_boxes = "\\boxed{".repeat(150_000);
    let dollars = "$".repeat(1_000_000);
    let nested_sums = "\\sum_{k=1}^{1000}".repeat(50) + "k";
    let questions = "so. Question: ".repeat(80_000);
    let colons = ":".repeat(1_000_000);
    for s in [
        &deep_parens,
        &deep_braces,
        &deep_frac,
        &unbalanced,
        &tower,
        &big_sum,
        &megabyte,
        &megabyte_boxes,
        &dollars,
        &nested_sums,
        &questions,
        &colons,
        &"10^{10^{10}}".to_string(),
        &"(10^{10^{10}})!".to_string(),
        &"\\binom{10^{30}}{10^{20}}".to_string(),
        &"99999999999999999999999999999999999999999^99999".to_string(),
    ] {
        check_bounded(s, "1");
        check_bounded(s, s);
        check_bounded("1", s);
    }
    assert!(!eqv("10^{10^{10}}", "10^{10^{11}}"));
    // Answers over `max_answer_chars` are compared as strings only; a long sum under it is exact.
    assert!(!eqv(&big_sum, "20000"));
    let sum = (0..1000).map(|_| "1").collect::<Vec<_>>().join("+");
    assert!(eqv(&sum, "1000"));
}

const RESPONSES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/responses.jsonl");

/// Realistic model responses, one class of issue #16 per `class`: each case states the right
/// verdict (and, when no answer should be extracted, the reason). Prints the agreement per class.
// See: #16
#[test]
fn realistic_corpus_agreement() {
    let text = fs_err::read_to_string(RESPONSES).unwrap_or_else(|e| panic!("{RESPONSES}: {e}"));
    let opts = VerifyOptions::default();
    let mut total: std::collections::BTreeMap<String, (usize, usize)> = Default::default();
    let mut misses = Vec::new();
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{RESPONSES}:{}: {e}", i + 1));
        let s = |k: &str| v[k].as_str().unwrap_or("").to_string();
        let want = v["correct"].as_bool().expect("correct is a bool");
        let finish = v["finish_reason"].as_str();
        let got = verify_finished(&s("response"), &s("gold"), finish, &opts);
        let want_reason = v["reason"].as_str();
        let ok = got.correct == want && got.reason.map(Reason::as_str) == want_reason;
        let entry = total.entry(s("class")).or_default();
        entry.0 += usize::from(ok);
        entry.1 += 1;
        if !ok {
            misses.push(format!(
                "  line {}: want={want} {want_reason:?} got={:?} {:?} gold={:?} response={:?}",
                i + 1,
                got.extracted,
                got.reason,
                s("gold"),
                short(&s("response"))
            ));
        }
    }
    let (agree, all) = total.values().fold((0, 0), |(a, n), (x, y)| (a + x, n + y));
    for (class, (a, n)) in &total {
        println!("{class}: {a}/{n}");
    }
    println!("misses ({}):\n{}", misses.len(), misses.join("\n"));
    println!(
        "realistic agreement {:.2}% on {all} cases",
        100.0 * agree as f64 / all as f64
    );
    assert!(misses.is_empty(), "{} misses", misses.len());
}
