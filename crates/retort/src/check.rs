//! The teacher-signal self-test (`retort check`, DESIGN.md §2): before distilling, compare a
//! teacher and a student on what logit-level distillation silently depends on: vocabulary
//! (padded vocabularies of one family are fine), tokenization of sample text, chat template,
//! EOS ids, and one sequence scored by both.

use serde::Serialize;
use serde_json::json;

use crate::backend::scorer::{ScoreRequest, ScoreWants, TokenScorer};

use crate::error::Result;

/// Outcome of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// The pair agrees.
    Ok,
    /// Works, but worth knowing (e.g. padded vocabularies, different templates).
    Warn,
    /// Token-level distillation between these models would be wrong.
    Error,
}

/// One row of the report.
#[derive(Debug, Clone, Serialize)]
pub struct CheckRow {
    /// What was compared.
    pub check: String,
    /// The verdict.
    pub status: Status,
    /// Numbers and explanation.
    pub detail: String,
}

/// The full report.
#[derive(Debug, Clone, Serialize)]
pub struct CheckReport {
    /// One row per check.
    pub rows: Vec<CheckRow>,
}

impl CheckReport {
    /// True when no check is an error.
    pub fn compatible(&self) -> bool {
        self.rows.iter().all(|r| r.status != Status::Error)
    }
}

/// Sample texts covering math, unicode, code, whitespace and chat markup.
pub const SAMPLE_TEXTS: &[&str] = &[
    "What is 15 + 27? Let's think step by step. 15 + 27 = 42. The answer is \\boxed{42}.",
    "Compute $\\frac{3}{4} + 0.125 = 0.875$, so x² − 2x + 1 = 0 gives x = 1.",
    "def add(a, b):\n    return a + b  # 😀 naïve café",
    "  multiple   spaces\tand\ttabs\n\n12345678901234567890",
    "<think>\nFirst, 3 × 7 = 21.\n</think>\nThe answer is 21.",
];

fn row(check: &str, status: Status, detail: String) -> CheckRow {
    CheckRow {
        check: check.to_string(),
        status,
        detail,
    }
}

/// Compares `teacher` and `student`, each a local model or a server scored through its local
/// tokenizer (a server's output rows are its tokenizer folder's `config.json` `vocab_size`, else
/// the tokenizer's size).
pub fn check_pair(teacher: &dyn TokenScorer, student: &dyn TokenScorer) -> Result<CheckReport> {
    let mut rows = Vec::new();
    let (ttok, stok) = (
        teacher.tokenizer().vocab_size(),
        student.tokenizer().vocab_size(),
    );
    let (tv, sv) = (
        teacher.vocab_rows().unwrap_or(ttok),
        student.vocab_rows().unwrap_or(stok),
    );
    let shared = ttok.min(stok);
    let mismatched_ids = (0..shared as u32)
        .filter(|&id| teacher.tokenizer().id_to_token(id) != student.tokenizer().id_to_token(id))
        .count();
    rows.push(if mismatched_ids > 0 {
        row(
            "vocabulary",
            Status::Error,
            format!("{mismatched_ids} of {shared} token ids map to different tokens: logit KD would compare unrelated tokens"),
        )
    } else if tv != sv || ttok != stok {
        row(
            "vocabulary",
            Status::Warn,
            format!(
                "same tokens for the {shared} ids both tokenizers define; embedding rows {tv} vs {sv} (padded vocabularies of one family): KD uses the first {} logits",
                tv.min(sv)
            ),
        )
    } else {
        row("vocabulary", Status::Ok, format!("identical: {tv} ids"))
    });

    let mut agree = 0;
    let mut first_difference = None;
    for text in SAMPLE_TEXTS {
        let a = teacher.tokenizer().encode(text, false)?;
        let b = student.tokenizer().encode(text, false)?;
        if a == b {
            agree += 1;
        } else if first_difference.is_none() {
            first_difference = Some(format!(
                "first difference on {text:?}: {} vs {} tokens",
                a.len(),
                b.len()
            ));
        }
    }
    rows.push(row(
        "tokenization",
        if agree == SAMPLE_TEXTS.len() {
            Status::Ok
        } else {
            Status::Error
        },
        match first_difference {
            None => format!(
                "{agree}/{} sample texts tokenize identically",
                SAMPLE_TEXTS.len()
            ),
            Some(d) => format!("{agree}/{} sample texts agree; {d}", SAMPLE_TEXTS.len()),
        },
    ));

    let conversation = [json!({"role": "user", "content": "What is 15 + 27?"})];
    let render = |m: &dyn TokenScorer| {
        m.tokenizer()
            .chat_template()
            .map(|_| m.tokenizer().apply_chat_template(&conversation, true))
    };
    rows.push(match (render(teacher), render(student)) {
        (None, None) => row("chat template", Status::Ok, "neither model has one (raw-text prompts)".into()),
        (Some(Ok(a)), Some(Ok(b))) if a == b => row("chat template", Status::Ok, "identical rendering of a sample conversation".into()),
        (Some(Ok(_)), Some(Ok(_))) => row(
            "chat template",
            Status::Warn,
            "templates render a sample conversation differently: the student trains on its own template's prompts".into(),
        ),
        (Some(Err(e)), _) | (_, Some(Err(e))) => row("chat template", Status::Error, format!("a template fails to render: {e}")),
        (Some(_), None) | (None, Some(_)) => row("chat template", Status::Warn, "only one model has a chat template".into()),
    });

    let mut teos = teacher.eos_ids();
    let mut seos = student.eos_ids();
    teos.sort_unstable();
    seos.sort_unstable();
    let student_stops_on_teacher_eos = teos.iter().all(|id| seos.contains(id));
    rows.push(if teos == seos {
        row("eos ids", Status::Ok, format!("{teos:?}"))
    } else if student_stops_on_teacher_eos {
        row("eos ids", Status::Warn, format!("teacher {teos:?}, student {seos:?}: the student also stops on every teacher EOS"))
    } else {
        row(
            "eos ids",
            Status::Error,
            format!("teacher {teos:?}, student {seos:?}: the student never learns to stop where the teacher does (runaway lengths)"),
        )
    });

    let prompt = teacher.tokenizer().encode("What is 15 + 27? ", false)?;
    let completion = teacher
        .tokenizer()
        .encode("15 + 27 = 42. The answer is 42.", false)?;
    let usable = tv.min(sv) as u32;
    if prompt.iter().chain(&completion).all(|&id| id < usable)
        && !prompt.is_empty()
        && mismatched_ids == 0
    {
        let request = [ScoreRequest {
            label: "the sample sequence".into(),
            prompt_ids: prompt,
            completion_ids: completion.clone(),
        }];
        let t = teacher.score_ids(&request, ScoreWants::default())?;
        let s = student.score_ids(&request, ScoreWants::default())?;
        let (t, s) = (
            t.first().map(|x| x.logprobs.clone()).unwrap_or_default(),
            s.first().map(|x| x.logprobs.clone()).unwrap_or_default(),
        );
        let mean = |v: &[f32]| v.iter().map(|&x| f64::from(x)).sum::<f64>() / v.len().max(1) as f64;
        let (tm, sm) = (mean(&t), mean(&s));
        let finite = t.len() == completion.len() && t.iter().chain(&s).all(|x| x.is_finite());
        rows.push(row(
            "scored sequence",
            if finite { Status::Ok } else { Status::Error },
            format!(
                "{} tokens: mean log-prob teacher {tm:.3}, student {sm:.3}",
                completion.len()
            ),
        ));
    } else {
        rows.push(row(
            "scored sequence",
            Status::Error,
            "skipped: the vocabularies disagree".into(),
        ));
    }
    Ok(CheckReport { rows })
}
