//! `retort render`: the exact prompt text (and its token count) each record becomes for a local
//! model, as `generate` builds it: a user's check of the chat template, its variables and the
//! input shape before spending a run on them.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use retort::ModelSpec;
use retort::backend::local::render_prompt;
use retort::generate::read_problems;
use retort::records::InputFormat;
use retort_model::Tokenizer;

use crate::args::{JsonObject, json_object};

/// `retort render`.
#[derive(Debug, clap::Args)]
pub struct RenderArgs {
    /// Model whose tokenizer and chat template render the prompts: a Hugging Face folder,
    /// `hf:ORG/NAME[@REV]` or `world:teacher` (a server renders its own template).
    #[arg(long, short)]
    pub model: ModelSpec,
    /// Input problems: JSONL or a JSON array (prompt, messages, GSM8K, MATH, ShareGPT, prompt_ids).
    #[arg(long, short)]
    pub input: PathBuf,
    /// Input shape.
    #[arg(long, value_enum, default_value_t = InputFormat::Auto, visible_alias = "input-format")]
    pub format: InputFormat,
    /// Chat-template variables as a JSON object, e.g. `'{"enable_thinking": false}'`.
    #[arg(long, value_name = "JSON", value_parser = json_object)]
    pub chat_template_kwargs: Option<JsonObject>,
    /// Use this Jinja file as the chat template instead of the model's.
    #[arg(long, value_name = "FILE")]
    pub chat_template: Option<PathBuf>,
    /// Render only the first N records.
    #[arg(long, value_name = "N")]
    pub limit: Option<usize>,
    /// Print one JSON object per record (`id`, `text`, `num_tokens`) instead of text blocks.
    #[arg(long)]
    pub json: bool,
}

/// Runs `retort render`.
pub fn run(args: RenderArgs) -> anyhow::Result<ExitCode> {
    if args.model.server().is_some() {
        bail!(
            "`retort render` needs a local model folder: a server (`{}`) renders prompts with its own \
             chat template; render with the same model's folder or `hf:` spec instead",
            args.model
        );
    }
    let dir = args.model.local_dir()?;
    let mut tokenizer = Tokenizer::from_dir(&dir)
        .with_context(|| format!("cannot load the tokenizer of `{}`", args.model))?;
    if let Some(path) = &args.chat_template {
        let source = fs_err::read_to_string(path)?;
        tokenizer
            .set_chat_template(source)
            .with_context(|| format!("chat template `{}`", path.display()))?;
    }
    let kwargs = args.chat_template_kwargs.unwrap_or_default();
    let problems = read_problems(&args.input, args.format)?;
    let mut out = std::io::stdout().lock();
    for (_, problem) in problems.iter().take(args.limit.unwrap_or(usize::MAX)) {
        let (text, ids) = render_prompt(&tokenizer, &problem.prompt, &kwargs)
            .with_context(|| format!("record `{}`", problem.id))?;
        if args.json {
            serde_json::to_writer(
                &mut out,
                &serde_json::json!({"id": problem.id, "text": text, "num_tokens": ids.len()}),
            )?;
            writeln!(out)?;
        } else {
            writeln!(out, "### {} ({} tokens)", problem.id, ids.len())?;
            writeln!(out, "{text}")?;
        }
    }
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}
