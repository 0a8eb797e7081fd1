//! `retort demo`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use indicatif::ProgressBar;
use retort::ModelSpec;
use retort::demo::{DemoEvent, DemoOptions, run_demo};

use crate::ui;

/// Run the whole pipeline on the bundled synthetic world: generate, verify, select, distill,
/// eval, trace, report.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Run folder: traces, selection, students, eval files, provenance, `report.html`, `summary.json`.
    #[arg(long, default_value = "demo-out")]
    pub out: PathBuf,
    /// Seed of problems, sampling and training order (the same seed gives the same run).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// A reduced run (a few problems and steps) that checks the whole pipeline in seconds.
    #[arg(long)]
    pub quick: bool,
    /// Teacher model (default: the bundled world teacher).
    #[arg(long, default_value = "world:teacher")]
    pub teacher: ModelSpec,
    /// Base student model (default: the bundled world student).
    #[arg(long, default_value = "world:student")]
    pub student: ModelSpec,
}

/// Runs `retort demo`.
pub fn run(args: DemoArgs) -> anyhow::Result<ExitCode> {
    let mut options = if args.quick {
        DemoOptions::reduced(args.out.clone(), args.seed)
    } else {
        DemoOptions::full(args.out.clone(), args.seed)
    };
    options.teacher = args.teacher;
    options.student = args.student;
    let mut bar: Option<ProgressBar> = None;
    let mut stages: Vec<(String, f64)> = Vec::new();
    let summary = run_demo(&options, &mut |event| match event {
        DemoEvent::Stage(name) => bar = Some(ui::progress(Some(0), name)),
        DemoEvent::Progress { done, total } => {
            if let Some(bar) = &bar {
                bar.set_length(total as u64);
                bar.set_position(done as u64);
            }
        }
        DemoEvent::StageDone(name, seconds) => {
            if let Some(bar) = bar.take() {
                bar.finish_and_clear();
            }
            stages.push((name.to_string(), seconds));
        }
    })
    .with_context(|| {
        format!(
            "the demo stopped; its files so far are in `{}`",
            args.out.display()
        )
    })?;
    let harder = |model: &str| {
        summary
            .harder_level_accuracy
            .get(model)
            .map_or("-".to_string(), |v| format!("{v:.3}"))
    };
    let mut rows: Vec<(&str, String)> = vec![
        (
            "teacher accuracy (levels 1-4 | level 5)",
            format!("{:.3} | {}", summary.teacher_accuracy, harder("teacher")),
        ),
        (
            "base student accuracy",
            format!("{:.3} | {}", summary.base_accuracy, harder("base")),
        ),
        (
            "distilled student accuracy",
            format!(
                "{:.3} | {}",
                summary.distilled_accuracy,
                harder("distilled")
            ),
        ),
    ];
    let share = |model: &str, category: &str| {
        summary
            .provenance
            .get(model)
            .and_then(|m| m.get(category))
            .map_or("-".to_string(), |v| format!("{v:.3}"))
    };
    let provenance_rows: Vec<(String, String)> =
        ["teacher", "student", "shared", "boosted", "unattributed"]
            .iter()
            .map(|c| {
                (
                    format!("{c} sentences (base → distilled)"),
                    format!("{} → {}", share("base", c), share("distilled", c)),
                )
            })
            .collect();
    for (k, v) in &provenance_rows {
        rows.push((k.as_str(), v.clone()));
    }
    let mut per_stage: BTreeMap<String, f64> = BTreeMap::new();
    for (name, seconds) in &stages {
        *per_stage.entry(name.clone()).or_default() += seconds;
    }
    let stage_rows: Vec<(String, String)> = per_stage
        .iter()
        .map(|(k, v)| (format!("{k} seconds"), format!("{v:.1}")))
        .collect();
    for (k, v) in &stage_rows {
        rows.push((k.as_str(), v.clone()));
    }
    rows.push(("wall seconds", format!("{:.1}", summary.wall_seconds)));
    let report = args.out.join("report.html");
    rows.push(("report", report.display().to_string()));
    ui::table("demo: reasoning distillation on the synthetic world", &rows);
    Ok(ExitCode::SUCCESS)
}
