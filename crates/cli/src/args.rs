//! Raw command-line arguments (clap derive). Doc comments are the help text.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

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
    Generate(GenerateArgs),
    /// Add a `verdict` to every record by checking its response's final answer against the gold.
    Verify(VerifyArgs),
    /// Per-token log-probs of completions given prompts under a local model.
    Score(ScoreArgs),
    /// Select training data: filters, dedup, decontamination, student-ppl, RSR, teacher-guided.
    Select(crate::commands::select::SelectArgs),
    /// Distill into a student (SFT, KD, on-policy, REDI; full or LoRA); checkpoints, --resume.
    Distill(crate::commands::distill::DistillArgs),
    /// Evaluate a model: pass@1 over k samples, pass@k, maj@k, mean tokens, truncation.
    Eval(crate::commands::eval::EvalArgs),
    /// Sentence provenance: teacher / student / shared / boosted per sentence of each response.
    Trace(crate::commands::trace::TraceArgs),
    /// Write a self-contained HTML report of a run folder: accuracy, training curves, provenance.
    Report(crate::commands::report::ReportArgs),
    /// The synthetic demo world: train the bundled teacher and base student.
    World(crate::commands::world::WorldArgs),
    /// Compare a teacher and a student before distilling: vocabulary, tokenizer, chat template, EOS, scores.
    Check(CheckArgs),
    /// Print one JSON line of speed figures (tokens/s, pairs/s), shaped like the PyTorch reference.
    Bench(BenchArgs),
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
    #[arg(long, default_value_t = 1024)]
    pub max_new_tokens: usize,
    /// Seed: the same seed gives the same traces (each (id, sample) draws its own stream).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Extra stop strings (EOS ids always stop). Repeatable.
    #[arg(long = "stop")]
    pub stop: Vec<String>,
}

/// How to reach a model: batching for local models, concurrency and retries for servers.
#[derive(Debug, Args, Clone)]
pub struct BackendArgs {
    /// Rows decoded together by a local model.
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// Requests in flight at once to a remote server.
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
    /// Seconds before a remote request attempt times out.
    #[arg(long, default_value_t = 600.0)]
    pub timeout: f64,
    /// Retries of a failed remote request (429, 5xx, timeouts, resets, malformed bodies).
    #[arg(long, default_value_t = 8)]
    pub max_retries: usize,
    /// Seconds before the first retry; doubles per retry, with jitter (`Retry-After` wins).
    #[arg(long, default_value_t = 1.0)]
    pub backoff_base: f64,
    /// Longest wait between retries in seconds.
    #[arg(long, default_value_t = 60.0)]
    pub backoff_max: f64,
}

/// `retort generate`.
#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// Model: a Hugging Face folder, `hf:ORG/NAME[@REV]`, `openai:URL#MODEL` or `world:teacher`.
    #[arg(long, short)]
    pub model: String,
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
    #[arg(long, value_enum, default_value_t = FormatArg::Auto)]
    pub format: FormatArg,
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
    #[command(flatten)]
    pub sampling: SamplingArgs,
    #[command(flatten)]
    pub backend: BackendArgs,
}

/// Input record shapes.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum FormatArg {
    /// Recognise from the fields present.
    Auto,
    /// `prompt` text.
    Prompt,
    /// `messages` chat.
    Messages,
    /// `conversations` (ShareGPT).
    Sharegpt,
    /// `question` + `answer` with `#### n`.
    Gsm8k,
    /// `problem` + `solution`/`answer`.
    Math,
    /// `prompt_ids`.
    Ids,
}

/// `retort score`.
#[derive(Debug, Args)]
pub struct ScoreArgs {
    /// Model: a Hugging Face folder, `hf:ORG/NAME[@REV]`, or `openai:URL#MODEL` (vLLM `prompt_logprobs`).
    #[arg(long, short)]
    pub model: String,
    /// Input: `prompt`/`messages` + `completion`, or `prompt_ids` + `completion_ids`.
    #[arg(long, short)]
    pub input: PathBuf,
    /// Output JSONL with `token_logprobs`, `logprob`, `num_tokens`; reruns resume.
    #[arg(long, short)]
    pub output: PathBuf,
    /// Records per forward pass.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// With a server (`openai:URL#MODEL`): also keep the top-k alternatives of each token.
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
}

/// `retort bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Only these figures (comma separated: train, lora, lora_bf16, score, generate_b1,
    /// generate_b8, kd, verify).
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
    /// Only these configs (bench-tiny, bench-small).
    #[arg(long, value_delimiter = ',')]
    pub config: Vec<String>,
    /// Seconds per figure (longer is steadier).
    #[arg(long, default_value_t = 3.0)]
    pub seconds: f64,
    /// A reference run to compare with (`torch_bench.py`'s JSON output from the same machine):
    /// prints each figure's ratio and adds them to the JSON as `compare`.
    #[arg(long, value_name = "JSON")]
    pub compare: Option<std::path::PathBuf>,
}

/// `retort verify`.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// Input records (JSONL or a JSON array).
    #[arg(long, short)]
    pub input: PathBuf,
    /// Output JSONL: the input records with `verdict` added.
    #[arg(long, short)]
    pub output: PathBuf,
    /// Field holding the gold answer.
    #[arg(long, default_value = "answer")]
    pub gold_field: String,
    /// Field holding the model response.
    #[arg(long, default_value = "response")]
    pub response_field: String,
    /// Percent policy: `either` (28% = 28 = 0.28), `strict` (28% = 0.28 only), `ignore` (28% = 28 only).
    #[arg(long, value_enum, default_value_t = PercentArg::Either)]
    pub percent: PercentArg,
    /// Accept numbers within this relative tolerance of the gold (default: exact, so 1.414 is not √2).
    #[arg(long)]
    pub tolerance: Option<f64>,
    /// Keep units after values (`5 cm` vs `5`) instead of stripping them.
    #[arg(long)]
    pub keep_units: bool,
}

/// Percent handling in answers.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum PercentArg {
    /// `28%` equals `28` and `0.28`.
    Either,
    /// `28%` equals `0.28` only.
    Strict,
    /// `%` is ignored: `28%` equals `28` only.
    Ignore,
}

/// `retort check`.
#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Teacher model (folder, `hf:ORG/NAME[@REV]` or `world:teacher`).
    #[arg(long)]
    pub teacher: String,
    /// Student model.
    #[arg(long)]
    pub student: String,
    /// Also print the report as one JSON line on stdout.
    #[arg(long)]
    pub json: bool,
}
