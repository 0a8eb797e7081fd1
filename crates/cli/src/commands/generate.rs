//! `retort generate`.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use retort::backend::SamplingParams;
use retort::backend::open::{BackendOptions, open_backend, resolve_local_spec};
use retort::generate::{GenerateOptions, generate};
use retort::manifest::Manifest;

use crate::args::{BackendArgs, FormatArg, GenerateArgs, SamplingArgs};
use crate::ui;

pub fn sampling_params(args: &SamplingArgs) -> SamplingParams {
    SamplingParams {
        temperature: args.temperature,
        top_p: args.top_p,
        top_k: args.top_k,
        max_new_tokens: args.max_new_tokens,
        seed: Some(args.seed),
        stop: args.stop.clone(),
        logprobs: 0,
    }
}

pub fn backend_options(args: &BackendArgs) -> BackendOptions {
    BackendOptions {
        batch_size: args.batch_size,
        concurrency: args.concurrency,
        timeout: Duration::from_secs_f64(args.timeout),
        max_retries: args.max_retries,
        backoff_base: Duration::from_secs_f64(args.backoff_base),
        backoff_max: Duration::from_secs_f64(args.backoff_max),
    }
}

pub fn format(arg: FormatArg) -> retort::records::InputFormat {
    use retort::records::InputFormat as F;
    match arg {
        FormatArg::Auto => F::Auto,
        FormatArg::Prompt => F::Prompt,
        FormatArg::Messages => F::Messages,
        FormatArg::Sharegpt => F::Sharegpt,
        FormatArg::Gsm8k => F::Gsm8k,
        FormatArg::Math => F::Math,
        FormatArg::Ids => F::Ids,
    }
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

pub fn run(args: GenerateArgs) -> anyhow::Result<ExitCode> {
    let start = Instant::now();
    let shard = args.shard.as_deref().map(parse_shard).transpose()?;
    let options = GenerateOptions {
        input: args.input.clone(),
        output: args.output.clone(),
        samples: args.samples,
        format: format(args.format),
        sampling: sampling_params(&args.sampling),
        shard,
        chunk_size: 4096,
        verify: args.verify.then(retort_verify::VerifyOptions::default),
        until_correct: args.until_correct.zip(args.max_samples),
    };
    // Read the input before loading the model so bad input fails fast and leaves no output.
    retort::generate::read_problems(&options.input, options.format)?;
    let backend = open_backend(&args.model, &backend_options(&args.backend))
        .with_context(|| format!("cannot open model `{}`", args.model))?;
    let bar = ui::progress(Some(0), "generate");
    let summary = generate(backend.as_ref(), &options, &mut |done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    })
    .with_context(|| format!("generation into `{}` stopped", args.output.display()))?;
    bar.finish_and_clear();
    let mut manifest = Manifest::new(serde_json::json!({
        "sampling": options.sampling,
        "samples": options.samples,
        "shard": args.shard,
    }));
    manifest.add_input(&args.input)?;
    let local_dir = (!args.model.starts_with("openai:")).then(|| resolve_local_spec(&args.model));
    manifest.add_model(
        &args.model,
        local_dir
            .as_deref()
            .map(std::path::Path::new)
            .filter(|p| p.is_dir()),
    )?;
    manifest.counts = serde_json::to_value(&summary)?;
    manifest.wall_seconds = start.elapsed().as_secs_f64();
    manifest.write_beside(&args.output)?;
    let seconds = start.elapsed().as_secs_f64().max(1e-9);
    ui::table(
        "generate",
        &[
            ("problems", summary.problems.to_string()),
            ("traces requested", summary.requested.to_string()),
            ("already done", summary.already_done.to_string()),
            ("generated now", summary.generated.to_string()),
            ("failed", summary.failed.to_string()),
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
            ("prompt tokens", summary.prompt_tokens.to_string()),
            ("completion tokens", summary.completion_tokens.to_string()),
            (
                "tokens/s",
                format!("{:.1}", summary.completion_tokens as f64 / seconds),
            ),
            ("output", args.output.display().to_string()),
        ],
    );
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
