//! `retort world train`: rebuilds the bundled world's tokenizer, teacher and base student
//! (DESIGN.md §6, docs/world.md) and writes them as Hugging Face folders.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use retort::world::train::{DEFAULT_SEED, WorldEvent, WorldModel, WorldTrainOptions, train_world};

use crate::ui;

/// `retort world`: the synthetic world behind `retort demo`.
#[derive(Debug, clap::Args)]
pub struct WorldArgs {
    #[command(subcommand)]
    pub command: WorldCommand,
}

/// The world's subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum WorldCommand {
    /// Train the world's tokenizer, teacher and base student from scratch (about half an hour on
    /// 2 cores) and write them to `--out` (`teacher/`, `student/`).
    Train(WorldTrainArgs),
    /// Write world problems as a JSONL file: `prompt` records (as the demo uses), or GSM8K-shaped
    /// (`question`, `answer` ending in `#### n`) to try the "your own data" commands on.
    Problems(WorldProblemsArgs),
}

/// Flags of `retort world problems`.
#[derive(Debug, clap::Args)]
pub struct WorldProblemsArgs {
    /// Output JSONL.
    #[arg(long, short)]
    pub output: PathBuf,
    /// Problems per level.
    #[arg(long, default_value_t = 25)]
    pub per_level: usize,
    /// Levels (operations per problem), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,2,3,4")]
    pub levels: Vec<usize>,
    /// Seed of the problems (another seed, other problems).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Write GSM8K-shaped records (`question`, `answer` with the teacher's solution and `#### n`).
    #[arg(long)]
    pub gsm8k: bool,
}

/// Flags of `retort world train`.
#[derive(Debug, clap::Args)]
pub struct WorldTrainArgs {
    /// Output folder: the models go to `DIR/teacher` and `DIR/student`.
    #[arg(long, value_name = "DIR", default_value = "assets/world")]
    pub out: PathBuf,
    /// Seed of the problems, tokenizer corpus, initial weights and batch order.
    #[arg(long, default_value_t = DEFAULT_SEED)]
    pub seed: u64,
    /// Teacher optimizer steps (the cosine schedule spans them).
    #[arg(long)]
    pub teacher_steps: Option<usize>,
    /// Base student optimizer steps.
    #[arg(long)]
    pub student_steps: Option<usize>,
    /// Examples per optimizer step (both models).
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Training problems per level (1 to 4).
    #[arg(long)]
    pub train_per_level: Option<usize>,
    /// Held-out problems per level (1 to 5) evaluated after training; 0 skips the evaluation.
    #[arg(long)]
    pub eval_per_level: Option<usize>,
    /// Peak learning rate of both models [default: 2e-3].
    #[arg(long)]
    pub lr: Option<f64>,
    /// Continue training from the models in DIR (`DIR/teacher`, `DIR/student`) instead of a
    /// fresh initialisation.
    #[arg(long, value_name = "DIR")]
    pub init: Option<std::path::PathBuf>,
    /// Train only this model (the tokenizer is rebuilt either way; it is deterministic).
    #[arg(long, value_enum)]
    pub only: Option<WorldModel>,
    /// Print a progress line every N steps (when stderr is not a terminal).
    #[arg(long, default_value_t = 50)]
    pub log_every: usize,
}

/// Runs `retort world ...`.
pub fn run(args: WorldArgs) -> anyhow::Result<ExitCode> {
    match args.command {
        WorldCommand::Train(args) => train(args),
        WorldCommand::Problems(args) => problems(args),
    }
}

fn options(args: &WorldTrainArgs) -> WorldTrainOptions {
    let mut options = WorldTrainOptions::new(args.out.clone(), args.seed);
    if let Some(steps) = args.teacher_steps {
        options.teacher.steps = steps;
    }
    if let Some(steps) = args.student_steps {
        options.student.steps = steps;
    }
    if let Some(batch_size) = args.batch_size {
        options.teacher.batch_size = batch_size;
        options.student.batch_size = batch_size;
    }
    if let Some(n) = args.train_per_level {
        options.train_per_level = n;
    }
    if let Some(n) = args.eval_per_level {
        options.eval_per_level = n;
    }
    options.init.clone_from(&args.init);
    if let Some(lr) = args.lr {
        options.teacher.lr = lr;
        options.student.lr = lr;
    }
    options.models = match args.only {
        None => vec![WorldModel::Teacher, WorldModel::Student],
        Some(model) => vec![model],
    };
    options
}

fn problems(args: WorldProblemsArgs) -> anyhow::Result<ExitCode> {
    if args.per_level == 0 || args.levels.iter().any(|&l| !(1..=5).contains(&l)) {
        anyhow::bail!("`--per-level` must be at least 1 and `--levels` lie in 1..=5");
    }
    let prefix = format!("world-{}", args.seed);
    let problems = retort::world::generate_problems(
        args.seed.wrapping_mul(104_729).wrapping_add(11),
        &args.levels,
        args.per_level,
        &prefix,
        &Default::default(),
    );
    let mut file = retort::io::AtomicFile::create(&args.output)?;
    for problem in &problems {
        let record = if args.gsm8k {
            serde_json::json!({
                "id": problem.id,
                "question": problem.question,
                "answer": format!(
                    "{}\n#### {}",
                    retort::world::teacher_solution(problem).trim(),
                    problem.answer
                ),
                "level": problem.level(),
            })
        } else {
            problem.to_record()
        };
        std::io::Write::write_all(&mut file, format!("{record}\n").as_bytes())?;
    }
    file.commit()?;
    ui::table(
        "world problems",
        &[
            ("problems", problems.len().to_string()),
            ("output", args.output.display().to_string()),
        ],
    );
    Ok(ExitCode::SUCCESS)
}

fn train(args: WorldTrainArgs) -> anyhow::Result<ExitCode> {
    let options = options(&args);
    let start = Instant::now();
    let mut bar = ui::progress(None, "tokenizer");
    let log_every = args.log_every.max(1);
    let summary = train_world(&options, &mut |event| match event {
        WorldEvent::Stage(name) => {
            bar.finish_and_clear();
            let total = match name {
                "teacher" => Some(options.teacher.steps as u64),
                "student" => Some(options.student.steps as u64),
                _ => None,
            };
            bar = ui::progress(total, name);
            tracing::info!("{name} ({:.0} s so far)", start.elapsed().as_secs_f64());
        }
        WorldEvent::Step(model, stats, tokens, seconds) => {
            bar.set_position(stats.step as u64);
            bar.set_prefix(format!("loss {:.3}", stats.loss));
            if bar.is_hidden() && (stats.step % log_every == 0 || stats.step == 1) {
                eprintln!(
                    "{} step {} loss {:.4} lr {:.2e} tokens/s {:.0}",
                    model.name(),
                    stats.step,
                    stats.loss,
                    stats.lr,
                    tokens as f64 / seconds.max(1e-9)
                );
            }
        }
    })
    .with_context(|| {
        format!(
            "cannot train the world models into `{}`",
            args.out.display()
        )
    })?;
    bar.finish_and_clear();
    let mut rows = vec![("tokenizer ids", summary.vocab_size.to_string())];
    for model in &summary.models {
        let name = model.model.name();
        rows.push((name, model.dir.display().to_string()));
        rows.push(("  parameters", model.parameters.to_string()));
        rows.push(("  steps", model.train.steps.to_string()));
        rows.push(("  final loss", format!("{:.4}", model.train.final_loss)));
        rows.push(("  minutes", format!("{:.1}", model.train.seconds / 60.0)));
        rows.push((
            "  tokens/s",
            format!("{:.0}", model.train.tokens_per_second),
        ));
        if let Some(eval) = &model.eval {
            rows.push(("  accuracy, levels 1-4", format!("{:.3}", eval.accuracy)));
            let per_level: Vec<String> = eval
                .levels
                .iter()
                .map(|l| format!("L{} {:.2}", l.level, l.accuracy))
                .collect();
            rows.push(("  per level", per_level.join(" ")));
        }
    }
    rows.push((
        "wall seconds",
        format!("{:.0}", start.elapsed().as_secs_f64()),
    ));
    ui::table("world train", &rows);
    Ok(ExitCode::SUCCESS)
}
