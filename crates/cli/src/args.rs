//! The command line (clap derive; doc comments are the help text): the top-level parser, the
//! options every command takes, and the argument groups several commands share. Each command's
//! own arguments live beside it in `commands/`. Defaults that the library also has come from the
//! library, so the two never disagree.

use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use retort::backend::SamplingParams;
use retort::backend::open::BackendOptions;
use retort::backend::openai::ApiKey;
use retort::backend::openai::score::ScoreProtocol;
use retort::backend::scorer::ScorerOptions;
use retort::compute::{Compute, DeviceChoice, Precision};

/// retort: reasoning distillation from teacher traces to a small student, in one binary.
#[derive(Debug, Parser)]
#[command(name = "retort", version, max_term_width = 100)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

/// Options every command takes.
#[derive(Debug, Args)]
pub struct GlobalArgs {
    /// More log output (repeat for more).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// No progress bars or tables.
    #[arg(short, long, global = true)]
    pub quiet: bool,
    /// CPU threads for tensor work (default: all cores; also `RAYON_NUM_THREADS`).
    #[arg(long, global = true, env = "RETORT_THREADS", value_name = "N")]
    pub threads: Option<usize>,
}

/// The pipeline's commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the whole pipeline on the bundled synthetic world (the main job; minutes on a CPU).
    Demo(crate::commands::demo::DemoArgs),
    /// Sample reasoning traces from a model (local or OpenAI-compatible); resumable, exactly once.
    Generate(crate::commands::generate::GenerateArgs),
    /// Add a `verdict` to every record by checking its response's final answer against the gold.
    Verify(crate::commands::verify::VerifyArgs),
    /// Per-token log-probs of completions given prompts under a local model.
    Score(crate::commands::score::ScoreArgs),
    /// Select training data: filters, dedup, decontamination, student-ppl, RSR, teacher-guided.
    Select(crate::commands::select::SelectArgs),
    /// Distill into a student (SFT, KD, on-policy, REDI; full or LoRA); checkpoints, --resume.
    Distill(crate::commands::distill::DistillArgs),
    /// Evaluate a model: pass@1 over k samples, pass@k, maj@k, mean tokens, truncation.
    Eval(crate::commands::eval::EvalArgs),
    /// Sentence provenance: teacher / student / shared / boosted per sentence of each response.
    Trace(crate::commands::trace::TraceArgs),
    /// Print the exact prompt text (and token count) each record becomes for a local model.
    Render(crate::commands::render::RenderArgs),
    /// Write a self-contained HTML report of a run folder: accuracy, training curves, provenance.
    Report(crate::commands::report::ReportArgs),
    /// The synthetic demo world: train the bundled teacher and base student.
    World(crate::commands::world::WorldArgs),
    /// Compare a teacher and a student before distilling: vocabulary, tokenizer, chat template, EOS, scores.
    Check(crate::commands::check::CheckArgs),
    /// Check a device and dtype against the PyTorch fixtures and the CPU's training step.
    DeviceCheck(crate::commands::device_check::DeviceCheckArgs),
    /// Print one JSON line of speed figures (tokens/s, pairs/s), shaped like the PyTorch reference.
    Bench(crate::commands::bench::BenchArgs),
}

/// Sampling flags shared by commands that generate.
#[derive(Debug, Args, Clone)]
pub struct SamplingArgs {
    /// Softmax temperature; 0 is greedy decoding.
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f64,
    /// Nucleus sampling mass (1 disables).
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    /// Keep only the k most likely tokens.
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Maximum new tokens per trace.
    #[arg(long, default_value_t = SamplingParams::default().max_new_tokens)]
    pub max_new_tokens: usize,
    /// Seed: the same seed gives the same traces (each (id, sample) draws its own stream).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Extra stop strings (EOS ids always stop). Repeatable.
    #[arg(long = "stop")]
    pub stop: Vec<String>,
}

impl SamplingArgs {
    /// The library's sampling settings.
    pub fn params(&self) -> SamplingParams {
        SamplingParams {
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            max_new_tokens: self.max_new_tokens,
            seed: Some(self.seed),
            stop: self.stop.clone(),
            logprobs: 0,
        }
    }
}

/// Where local models run and in which precision.
#[derive(Debug, Args, Clone)]
pub struct ComputeArgs {
    /// Device of local models: `cpu`, `cuda` or `cuda:N` (a CUDA build: `scripts/cuda-build.sh`).
    #[arg(
        long,
        env = "RETORT_DEVICE",
        default_value = "cpu",
        value_name = "DEVICE"
    )]
    pub device: DeviceChoice,
    /// Precision of local models. Inference: `auto` is f32 on the CPU and the checkpoint's dtype
    /// on CUDA; bf16/f16 on the CPU store the linear layers' weights in that type and compute in
    /// f32. Training keeps f32 weights and optimizer state; bf16/f16 runs its matrix multiplies in
    /// that type (autocast), and `auto` is f32 on the CPU and bf16 autocast on CUDA.
    #[arg(long, value_enum, default_value_t = Precision::Auto)]
    pub dtype: Precision,
}

impl ComputeArgs {
    /// The library's compute settings.
    pub fn compute(&self) -> Compute {
        Compute {
            device: self.device,
            precision: self.dtype,
        }
    }
}

/// How to reach a model: batching for local models, concurrency and retries for servers.
#[derive(Debug, Args, Clone)]
pub struct BackendArgs {
    #[command(flatten)]
    pub compute: ComputeArgs,
    /// Sequences in flight for a local model (0: auto, 256 within a 4 GiB key/value budget).
    #[arg(long, default_value_t = BackendOptions::default().batch_size)]
    pub batch_size: usize,
    /// Requests in flight at once to a remote server.
    #[arg(long, default_value_t = BackendOptions::default().concurrency)]
    pub concurrency: usize,
    /// Seconds before a remote request attempt times out.
    #[arg(long, default_value_t = BackendOptions::default().timeout.as_secs_f64())]
    pub timeout: f64,
    /// Retries of a failed remote request (429, 5xx, timeouts, resets, malformed bodies).
    #[arg(long, default_value_t = BackendOptions::default().max_retries)]
    pub max_retries: usize,
    /// Seconds before the first retry; doubles per retry, with jitter (`Retry-After` wins).
    #[arg(long, default_value_t = BackendOptions::default().backoff_base.as_secs_f64())]
    pub backoff_base: f64,
    /// Longest wait between retries in seconds.
    #[arg(long, default_value_t = BackendOptions::default().backoff_max.as_secs_f64())]
    pub backoff_max: f64,
    /// API key of the server (prefer `RETORT_API_KEY`: a flag's value is visible to other
    /// processes). Never written to manifests.
    #[arg(long, value_name = "KEY")]
    pub api_key: Option<String>,
    /// Stop the run when every request to the server has failed for this many seconds (and at
    /// least twice the concurrency in a row): a dead server ends the run with a message instead of
    /// being retried for many minutes. 0 never stops early.
    #[arg(long, value_name = "SECONDS",
        default_value_t = BackendOptions::default().dead_after.map_or(0.0, |d| d.as_secs_f64()))]
    pub dead_after: f64,
    /// Chat-template variables as a JSON object, e.g. `'{"enable_thinking": true}'`: sent to a
    /// server as `chat_template_kwargs` and given to a local model's template.
    #[arg(long, value_name = "JSON", value_parser = json_object)]
    pub chat_template_kwargs: Option<JsonObject>,
    /// Extra fields for every server request body as a JSON object (they override retort's own),
    /// e.g. `'{"min_p": 0.05, "repetition_penalty": 1.05}'`.
    #[arg(long, value_name = "JSON", value_parser = json_object)]
    pub extra_body: Option<JsonObject>,
}

/// A JSON object given on the command line.
pub type JsonObject = serde_json::Map<String, serde_json::Value>;

/// Parses a JSON object argument.
pub fn json_object(text: &str) -> Result<JsonObject, String> {
    match serde_json::from_str(text) {
        Ok(serde_json::Value::Object(map)) => Ok(map),
        Ok(_) => Err("expected a JSON object, e.g. `{\"enable_thinking\": true}`".to_owned()),
        Err(e) => Err(format!("not valid JSON: {e}")),
    }
}

impl BackendArgs {
    /// The library's backend settings.
    pub fn options(&self) -> BackendOptions {
        BackendOptions {
            batch_size: self.batch_size,
            concurrency: self.concurrency,
            timeout: Duration::from_secs_f64(self.timeout),
            max_retries: self.max_retries,
            backoff_base: Duration::from_secs_f64(self.backoff_base),
            backoff_max: Duration::from_secs_f64(self.backoff_max),
            dead_after: (self.dead_after > 0.0).then(|| Duration::from_secs_f64(self.dead_after)),
            chat_template_kwargs: self.chat_template_kwargs.clone().unwrap_or_default(),
            extra_body: self.extra_body.clone().unwrap_or_default(),
            api_key: self.api_key.clone().map(ApiKey::new),
            compute: self.compute.compute(),
        }
    }
}

/// How models given as servers (`openai:URL[,URL...]#MODEL`) score, for the commands that score
/// with a teacher or student (`select`, `trace`, `check`).
#[derive(Debug, Clone, Args)]
pub struct ServerScoreArgs {
    #[command(flatten)]
    pub compute: ComputeArgs,
    /// Scoring requests in flight at once to a server (all its replicas together).
    #[arg(long, default_value_t = BackendOptions::default().concurrency)]
    pub concurrency: usize,
    /// How a server is asked for log-probs: vLLM `prompt-logprobs` (falling back to `echo`
    /// under `auto`), `echo` + `logprobs`, or SGLang's native `/generate`.
    #[arg(long, value_enum, default_value_t = ScoreProtocol::Auto)]
    pub score_protocol: ScoreProtocol,
}

impl ServerScoreArgs {
    /// Scorer settings; `batch_size` is the local batch, `fallback_tokenizer` the folder whose
    /// tokenizer a server model uses when its served name is not a local model.
    pub fn options(
        &self,
        batch_size: usize,
        fallback_tokenizer: Option<std::path::PathBuf>,
    ) -> ScorerOptions {
        ScorerOptions {
            backend: BackendOptions {
                batch_size,
                concurrency: self.concurrency,
                compute: self.compute.compute(),
                ..BackendOptions::default()
            },
            protocol: self.score_protocol,
            fallback_tokenizer,
        }
    }
}
