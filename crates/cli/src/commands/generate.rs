//! `retort generate`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, bail};
use retort::ModelSpec;
use retort::backend::open::open_backend;
use retort::generate::{GenerateOptions, generate_problems, read_problems};
use retort::reasoning::{ReasoningMode, ThinkTags};
use retort::records::InputFormat;

use retort::identity::{Identity, RunStatus, SameRun};

use crate::args::{BackendArgs, SamplingArgs};
use crate::{run, ui};

/// `retort generate`.
#[derive(Debug, clap::Args)]
pub struct GenerateArgs {
    /// Model: a Hugging Face folder, `hf:ORG/NAME[@REV]`, `openai:URL#MODEL` or `world:teacher`.
    #[arg(long, short)]
    pub model: ModelSpec,
    /// Input problems: JSONL or a JSON array (prompt, messages, GSM8K, MATH, ShareGPT, prompt_ids).
    #[arg(long, short)]
    pub input: PathBuf,
    /// Output traces (JSONL); rerunning resumes, skipping (id, sample) pairs already present.
    #[arg(long, short)]
    pub output: PathBuf,
    /// Traces per problem.
    #[arg(long, default_value_t = 1)]
    pub samples: usize,
    /// Input shape.
    #[arg(long, value_enum, default_value_t = InputFormat::Auto, visible_alias = "input-format")]
    pub format: InputFormat,
    /// Work on shard i of n (records whose position modulo n is i), e.g. `--shard 0/4`.
    #[arg(long)]
    pub shard: Option<String>,
    /// Verify each trace against the record's gold answer and add `verdict`.
    #[arg(long)]
    pub verify: bool,
    /// Rejection sampling: resample each problem until K traces verify correct (implies --verify).
    #[arg(long, value_name = "K", requires = "max_samples")]
    pub until_correct: Option<usize>,
    /// With --until-correct: at most this many samples per problem.
    #[arg(long, value_name = "M")]
    pub max_samples: Option<usize>,
    /// Replace an existing output (and its manifest) made by another run instead of refusing.
    #[arg(long)]
    pub overwrite: bool,
    /// Reasoning a server returns separately (`reasoning_content`, from a reasoning parser):
    /// `keep` joins it into `response` as `<think>\n...\n</think>\n\n` + answer, the teacher's
    /// native form, so verify, select, distill and trace all see it; `drop` discards it;
    /// `separate` stores it in a `reasoning` field.
    #[arg(long, value_enum, default_value_t = ReasoningMode::Keep)]
    pub reasoning: ReasoningMode,
    /// The tags reasoning is joined with (default `<think>` `</think>`), e.g.
    /// `--think-tags '<seed:think>' '</seed:think>'`; verification reads the answer after the second.
    #[arg(long, num_args = 2, value_names = ["OPEN", "CLOSE"])]
    pub think_tags: Option<Vec<String>>,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    #[command(flatten)]
    pub backend: BackendArgs,
}

fn parse_shard(text: &str) -> anyhow::Result<(usize, usize)> {
    let parsed = text
        .split_once('/')
        .and_then(|(i, n)| Some((i.trim().parse().ok()?, n.trim().parse().ok()?)));
    match parsed {
        Some((i, n)) if n > 0 && i < n => Ok((i, n)),
        _ => bail!("invalid `--shard {text}`: expected `i/n` with 0 <= i < n, e.g. `0/4`"),
    }
}

fn generate_traces(
    args: &GenerateArgs,
    options: &GenerateOptions,
    problems: Vec<(
        serde_json::Map<String, serde_json::Value>,
        retort::records::Problem,
    )>,
) -> anyhow::Result<retort::generate::GenerateSummary> {
    let backend = open_backend(&args.model, &args.backend.options())
        .with_context(|| format!("cannot open model `{}`", args.model))?;
    let bar = ui::progress(Some(0), "generate");
    let summary = generate_problems(backend.as_ref(), problems, options, &mut |done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    })
    .with_context(|| format!("generation into `{}` stopped", args.output.display()))?;
    bar.finish_and_clear();
    Ok(summary)
}

/// The `--think-tags OPEN CLOSE` pair, `<think>` `</think>` when absent.
pub fn think_tags(tags: Option<&[String]>) -> anyhow::Result<ThinkTags> {
    Ok(match tags {
        Some([open, close]) => ThinkTags::new(open, close)?,
        _ => ThinkTags::default(),
    })
}

/// Runs `retort generate`.
pub fn run(args: GenerateArgs) -> anyhow::Result<ExitCode> {
    let start = Instant::now();
    let shard = args.shard.as_deref().map(parse_shard).transpose()?;
    let options = GenerateOptions {
        input: args.input.clone(),
        output: args.output.clone(),
        samples: args.samples,
        format: args.format,
        sampling: args.sampling.params(),
        shard,
        chunk_size: 4096,
        verify: args.verify.then(retort_verify::VerifyOptions::default),
        until_correct: args.until_correct.zip(args.max_samples),
        reasoning: args.reasoning,
        think_tags: think_tags(args.think_tags.as_deref())?,
    };
    // Read the input before loading the model so bad input fails fast and leaves no output.
    let problems = read_problems(&options.input, options.format)?;
    options.sampling.validate()?;
    // What determines the traces; `--samples`, batching and concurrency only say how many and
    // how fast, so raising them extends an existing output.
    let identity = Identity::new("generate")
        .with_model("model", &args.model)?
        .with("input", std::path::absolute(&args.input)?)
        .with("format", options.format)
        .with_fields(&options.sampling, &[])
        .with("shard", &args.shard)
        .with("verify", args.verify)
        .with("until_correct", options.until_correct)
        .with("reasoning", options.reasoning)
        .with("think_tags", &options.think_tags)
        .with("chat_template_kwargs", &args.backend.chat_template_kwargs)
        .with("extra_body", &args.backend.extra_body)
        .with_compute(args.backend.compute.compute());
    let settings = serde_json::json!({
        "sampling": options.sampling,
        "samples": options.samples,
        "shard": args.shard,
        "reasoning": options.reasoning,
        "think_tags": options.think_tags,
    });
    let mut manifest = run::start(
        &args.output,
        identity,
        settings,
        SameRun::Continue,
        args.overwrite,
    )?;
    let result = generate_traces(&args, &options, problems);
    let summary = run::fail_on_error(&mut manifest, &args.output, result)?;
    manifest.add_input(&args.input)?;
    manifest.add_model(&args.model)?;
    manifest.skipped = summary.skipped_ids.clone();
    manifest.counts = serde_json::to_value(&summary)?;
    manifest.wall_seconds = start.elapsed().as_secs_f64();
    let status = if summary.interrupted {
        RunStatus::Interrupted
    } else if summary.failed > 0 {
        RunStatus::Failed
    } else {
        RunStatus::Complete
    };
    manifest.finish(&args.output, status)?;
    let seconds = start.elapsed().as_secs_f64().max(1e-9);
    ui::table(
        "generate",
        &[
            ("problems", summary.problems.to_string()),
            ("traces requested", summary.requested.to_string()),
            ("already done", summary.already_done.to_string()),
            ("generated now", summary.generated.to_string()),
            ("failed", summary.failed.to_string()),
            ("skipped (unusable records)", summary.skipped.to_string()),
            (
                "verified correct",
                if options.verify.is_some() || options.until_correct.is_some() {
                    summary.correct.to_string()
                } else {
                    "-".into()
                },
            ),
            (
                "problems with K correct",
                summary.satisfied.map_or("-".into(), |n| n.to_string()),
            ),
            ("truncated (length)", summary.truncated.to_string()),
            (
                "reasoning from the server",
                match (summary.separate_reasoning, options.reasoning) {
                    (0, _) => "none".into(),
                    (n, ReasoningMode::Keep) => format!("{n}, joined into `response`"),
                    (n, ReasoningMode::Drop) => format!("{n}, dropped"),
                    (n, ReasoningMode::Separate) => format!("{n}, in `reasoning`"),
                },
            ),
            ("prompt tokens", summary.prompt_tokens.to_string()),
            ("completion tokens", summary.completion_tokens.to_string()),
            (
                "tokens/s",
                format!("{:.1}", summary.completion_tokens as f64 / seconds),
            ),
            ("output", args.output.display().to_string()),
        ],
    );
    if summary.skipped > 0 {
        eprintln!(
            "warning: {} record(s) skipped because they cannot work with this model (listed \
             under `skipped` in the manifest); the first: {}",
            summary.skipped,
            summary.skipped_ids.first().map_or("", String::as_str)
        );
    }
    if summary.interrupted {
        let done = summary.already_done + summary.generated;
        return Ok(run::interrupted(
            &format!(
                "{done} of {} traces are in `{}`",
                summary.planned,
                args.output.display()
            ),
            &[],
        ));
    }
    if summary.failed > 0 {
        for failure in &summary.failures {
            eprintln!("  failed: {failure}");
        }
        eprintln!(
            "error: {} of {} traces failed for good; the {} that succeeded are in `{}`; rerun the same command to retry the rest",
            summary.failed,
            summary.requested,
            summary.already_done + summary.generated,
            args.output.display()
        );
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}
