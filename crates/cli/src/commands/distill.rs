//! `retort distill`: flags (or `--config FILE`, TOML with the same keys; flags win) →
//! [`retort::distill::DistillOptions`] → [`retort::distill::distill`], with a progress bar
//! (loss, tokens/s) and a summary table on stderr.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use retort::ModelSpec;
use retort::distill::cache::CacheDtype;
use retort::distill::teacher::MissingMass;
use retort::distill::{DistillOptions, DivergenceKind, Objective, OnPolicyLoss};
use retort::identity::{Identity, RunStatus, SameRun, refuse_inside};
use retort::manifest::{Manifest, manifest_path};
use retort::records::InputFormat;

use crate::{run, ui};

/// Train a student: SFT, token-level KD or on-policy KD from a local teacher, or REDI;
/// resumable, Hugging Face output.
#[derive(Debug, clap::Args)]
pub struct DistillArgs {
    /// TOML file with the same keys as these flags (`max-steps = 100`); flags override it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// The student: a model folder, `hf:ORG/NAME[@REV]` or `world:student`.
    #[arg(long)]
    pub student: Option<ModelSpec>,
    /// Training records (JSONL or JSON array): `prompt`/`messages`/`prompt_ids` with `response`,
    /// `completion` or `completion_ids`.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Output folder: the final model, `checkpoint-N/`, `metrics.jsonl`, `config.toml`.
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// The teacher for `kd` (same vocabulary as the student).
    #[arg(long)]
    pub teacher: Option<ModelSpec>,
    /// Training objective.
    #[arg(long, value_enum)]
    pub objective: Option<Objective>,
    /// KD divergence.
    #[arg(long, value_enum)]
    pub divergence: Option<DivergenceKind>,
    /// β of `jsd`: the teacher's weight in the mixture (TRL's semantics).
    #[arg(long)]
    pub beta: Option<f64>,
    /// α of `skl`/`srkl` (DistiLLM's skew).
    #[arg(long)]
    pub alpha: Option<f64>,
    /// KD temperature [default: 1].
    #[arg(long)]
    pub temperature: Option<f64>,
    /// Weight w of KD: per token `(1 - w) * sft + w * kd` [default: 1].
    #[arg(long)]
    pub kd_weight: Option<f64>,
    /// On-policy: probability that a step trains on student samples (GKD's λ) [default: 0.5].
    #[arg(long)]
    pub lambda: Option<f64>,
    /// On-policy: the loss on the student's samples [default: reward].
    #[arg(long, value_enum)]
    pub on_policy_loss: Option<OnPolicyLoss>,
    /// On-policy: most new tokens per student sample [default: 128].
    #[arg(long)]
    pub max_new_tokens: Option<usize>,
    /// On-policy: the student's sampling temperature [default: 1].
    #[arg(long)]
    pub sample_temperature: Option<f64>,
    /// REDI's α: weight of the negative traces [default: 0.8].
    #[arg(long)]
    pub redi_alpha: Option<f64>,
    /// Optimizer steps (wins over `--epochs`).
    #[arg(long)]
    pub max_steps: Option<usize>,
    /// Passes over the data when `--max-steps` is not given [default: 1].
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Sequences per optimizer step [default: 8].
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Sequences per forward/backward (gradient accumulation) [default: the batch size].
    #[arg(long)]
    pub micro_batch_size: Option<usize>,
    /// Peak learning rate [default: 1e-5].
    #[arg(long)]
    pub lr: Option<f64>,
    /// Linear warmup steps [default: 0].
    #[arg(long)]
    pub warmup_steps: Option<usize>,
    /// Cosine floor as a fraction of the peak learning rate [default: 0.1].
    #[arg(long)]
    pub min_lr_ratio: Option<f64>,
    /// AdamW weight decay [default: 0].
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// Gradient clipping norm, 0 for none [default: 1].
    #[arg(long)]
    pub max_grad_norm: Option<f64>,
    /// Seed of the data order [default: 0].
    #[arg(long)]
    pub seed: Option<u64>,
    /// Longest sequence in tokens; longer ones are cut (counted in the summary) [default: 4096].
    #[arg(long)]
    pub max_seq_len: Option<usize>,
    /// Train only on records whose `verdict.correct` is true.
    #[arg(long)]
    pub only_correct: bool,
    /// Prompt shape of the records [default: auto].
    #[arg(long, value_enum, visible_alias = "format")]
    pub input_format: Option<InputFormat>,
    /// Held-out records for the evaluation loss.
    #[arg(long)]
    pub eval_data: Option<PathBuf>,
    /// Evaluate every N steps (and at the end).
    #[arg(long)]
    pub eval_every: Option<usize>,
    /// Write `OUTPUT/checkpoint-N` every N steps.
    #[arg(long)]
    pub checkpoint_every: Option<usize>,
    /// Continue from the latest checkpoint in the output folder.
    #[arg(long)]
    pub resume: bool,
    /// Replace an output folder that holds another run (never a model's own folder).
    #[arg(long)]
    pub overwrite: bool,
    /// Device of the student and a local teacher: `cpu`, `cuda` or `cuda:N` (a CUDA build).
    #[arg(long, env = "RETORT_DEVICE", value_name = "DEVICE")]
    pub device: Option<retort::compute::DeviceChoice>,
    /// Training precision: weights and AdamW state stay f32; `bf16`/`f16` run the matrix
    /// multiplies of forward and backward in that type (autocast), the loss in f32. `auto`: f32
    /// on the CPU, bf16 autocast on CUDA. A local teacher runs in the autocast dtype.
    #[arg(long, value_enum)]
    pub dtype: Option<retort::compute::Precision>,
    /// The offline teacher cache.
    #[command(flatten, next_help_heading = "Teacher cache")]
    pub cache: Box<CacheArgs>,
    /// LoRA.
    #[command(flatten, next_help_heading = "LoRA")]
    pub lora: Box<LoraArgs>,
}

/// Flags of the offline teacher cache (boxed: they keep the subcommand enum small).
#[derive(Debug, clap::Args)]
pub struct CacheArgs {
    /// Build an offline teacher cache in DIR and exit: the teacher's top-k log-probs at every
    /// completion token of `--data` (and `--eval-data`), tokenised as the student trains on
    /// them. Rerunning an interrupted build resumes it.
    #[arg(long, value_name = "DIR")]
    pub cache_teacher: Option<PathBuf>,
    /// With `--cache-teacher`: log-probs kept per position [default: 20].
    #[arg(long, default_value_t = 20)]
    pub top_k: usize,
    /// With `--cache-teacher`: storage of the log-probs (f16: 6 bytes per id and log-prob pair,
    /// f32: 8).
    #[arg(long, value_enum, default_value_t = CacheDtype::F16)]
    pub cache_dtype: CacheDtype,
    /// Train `kd` from the teacher cache in DIR instead of a live `--teacher`.
    #[arg(long, value_name = "DIR")]
    pub teacher_cache: Option<PathBuf>,
    /// Sparse teacher signals: the probability outside the top-k set [default: tail].
    #[arg(long, value_enum)]
    pub missing_mass: Option<MissingMass>,
    /// A served `--teacher` (`openai:URL[,URL...]#MODEL`) during `kd` and `on-policy`: log-probs
    /// asked per position, at most the server's `--max-logprobs` [default: 20].
    #[arg(long)]
    pub teacher_top_k: Option<usize>,
}

/// LoRA flags.
#[derive(Debug, clap::Args)]
pub struct LoraArgs {
    /// Train LoRA adapters of this rank (base weights frozen); the output is a PEFT adapter
    /// folder (`adapter_config.json`, `adapter_model.safetensors`).
    #[arg(long)]
    pub lora_rank: Option<usize>,
    /// LoRA alpha: the update is scaled by alpha / rank [default: 2 * rank].
    #[arg(long)]
    pub lora_alpha: Option<f64>,
    /// Comma-separated module names to adapt
    /// [default: q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj].
    #[arg(long, value_delimiter = ',')]
    pub lora_targets: Option<Vec<String>>,
    /// With LoRA, also write the merged model as a Hugging Face folder in `OUTPUT/merged`.
    #[arg(long)]
    pub merge_lora: bool,
    /// LoRA dropout on the adapter input while training, as PEFT's `lora_dropout` [default: 0].
    #[arg(long)]
    pub lora_dropout: Option<f64>,
    /// With LoRA, hold the frozen base's linear weights in this dtype (`bf16`: half the memory;
    /// compute stays f32) [default: f32].
    #[arg(long, value_enum)]
    pub lora_base_dtype: Option<retort::distill::lora::LoraBaseDtype>,
}

/// The options from `--config` (if any) with every given flag applied on top.
pub fn options(args: &DistillArgs) -> anyhow::Result<DistillOptions> {
    let mut o = match &args.config {
        Some(path) => DistillOptions::from_toml_file(path)
            .with_context(|| format!("cannot read the config `{}`", path.display()))?,
        None => DistillOptions::default(),
    };
    macro_rules! set {
        ($($field:ident),*) => {$(
            if let Some(value) = &args.$field {
                o.$field = value.clone().into();
            }
        )*};
    }
    set!(
        student,
        data,
        output,
        teacher,
        beta,
        alpha,
        max_steps,
        micro_batch_size,
        eval_data
    );
    set!(eval_every, checkpoint_every, max_grad_norm);
    set!(
        temperature,
        kd_weight,
        epochs,
        batch_size,
        lr,
        warmup_steps,
        min_lr_ratio
    );
    set!(weight_decay, seed, max_seq_len, redi_alpha);
    set!(lambda, max_new_tokens, sample_temperature);
    set!(objective, divergence, on_policy_loss, input_format);
    set!(device, dtype);
    if let Some(dir) = &args.cache.teacher_cache {
        o.teacher_cache = Some(dir.clone());
    }
    if let Some(policy) = args.cache.missing_mass {
        o.missing_mass = policy;
    }
    if let Some(k) = args.cache.teacher_top_k {
        o.teacher_top_k = Some(k);
    }
    macro_rules! set_lora {
        ($($field:ident),*) => {$(
            if let Some(value) = &args.lora.$field {
                o.$field = value.clone().into();
            }
        )*};
    }
    set_lora!(
        lora_rank,
        lora_alpha,
        lora_targets,
        lora_dropout,
        lora_base_dtype
    );
    o.only_correct |= args.only_correct;
    o.resume |= args.resume;
    o.merge_lora |= args.lora.merge_lora;
    Ok(o)
}

/// Settings that say how long or how often, not what: changing them extends a run.
const EXTENT: &[&str] = &[
    "student",
    "teacher",
    "output",
    "resume",
    "max-steps",
    "epochs",
    "eval-every",
    "checkpoint-every",
];

/// Refuses (even with `--overwrite`) an output that is, or lies inside, the student's or the
/// teacher's folder or the Hugging Face cache.
fn refuse_model_folders(plan: &retort::distill::DistillPlan) -> anyhow::Result<()> {
    let mut protected = Vec::new();
    for (role, spec) in [
        ("student", Some(&plan.student)),
        ("teacher", plan.live_teacher()),
    ] {
        if let Some(dir) = spec.and_then(ModelSpec::local_path) {
            protected.push((role, dir));
        }
    }
    if let Some(cache) = retort_model::hub::default_cache_dir() {
        protected.push(("Hugging Face cache", cache));
    }
    Ok(refuse_inside(&plan.output, &protected)?)
}

/// Runs `retort distill`.
pub fn run(args: DistillArgs) -> anyhow::Result<ExitCode> {
    let start = Instant::now();
    let options = options(&args)?;
    if let Some(dir) = &args.cache.cache_teacher {
        return cache_teacher(&options, dir, &args.cache);
    }
    let plan = options.resolve()?;
    let output = plan.output.clone();
    refuse_model_folders(&plan)?;
    let previous = Manifest::read(&manifest_path(&output)).ok();
    let identity = Identity::new("distill")
        .with_model("student", &plan.student)?
        .with_fields(&plan.saved, EXTENT);
    let identity = match &options.teacher {
        Some(teacher) => identity.with_model("teacher", teacher)?,
        None => identity,
    };
    let mut manifest = run::start(
        &output,
        identity,
        serde_json::to_value(&options)?,
        SameRun::NeedsResume(options.resume),
        args.overwrite,
    )?;
    if let Some(previous) = previous.filter(|p| p.status == RunStatus::Complete && !args.overwrite)
        && previous.settings.get("max-steps") == manifest.settings.get("max-steps")
        && previous.settings.get("epochs") == manifest.settings.get("epochs")
    {
        // A finished run asked to resume with nothing more to do.
        manifest = previous;
        manifest.write_beside(&output)?;
        eprintln!(
            "`{}` already holds this run, complete; nothing to do (raise `--max-steps` to \
             train further from its last checkpoint)",
            output.display()
        );
        return Ok(ExitCode::SUCCESS);
    }
    let bar = ui::progress(options.max_steps.map(|n| n as u64), "distill");
    let mut last = Instant::now();
    let mut on_step = |stats: &retort_model::train::StepStats| {
        let seconds = last.elapsed().as_secs_f64().max(1e-9);
        last = Instant::now();
        bar.set_position(stats.step as u64);
        bar.set_prefix(format!(
            "loss {:.4}  lr {:.2e}  {:.0} target tok/s",
            stats.loss,
            stats.lr,
            stats.tokens as f64 / seconds
        ));
    };
    let result = retort::distill::distill(&options, &mut on_step).context("distillation failed");
    let summary = run::fail_on_error(&mut manifest, &output, result)?;
    bar.finish_and_clear();

    if let Some(data) = &options.data {
        manifest.add_input(data)?;
    }
    if let Some(eval) = &options.eval_data {
        manifest.add_input(eval)?;
    }
    if let Some(cache) = &options.teacher_cache {
        manifest.add_input(&cache.join(retort::distill::cache::CACHE_FILE))?;
    }
    for spec in [&options.student, &options.teacher].into_iter().flatten() {
        manifest.add_model(spec)?;
    }
    manifest.counts = serde_json::to_value(&summary)?;
    manifest.wall_seconds = start.elapsed().as_secs_f64();
    let status = if summary.interrupted {
        RunStatus::Interrupted
    } else {
        RunStatus::Complete
    };
    manifest.finish(&output, status)?;
    if summary.interrupted {
        return Ok(run::interrupted(
            &format!(
                "{} of {} steps done, checkpoint `{}`",
                summary.steps,
                plan.schedule
                    .max_steps
                    .map_or("?".into(), |n| n.to_string()),
                summary
                    .checkpoints
                    .last()
                    .map_or_else(String::new, |c| c.display().to_string())
            ),
            &["--resume"],
        ));
    }

    let fmt = |v: Option<f64>| v.map_or_else(|| "-".to_string(), |v| format!("{v:.4}"));
    let resumed = summary
        .resumed_from
        .map_or_else(|| "-".to_string(), |s| format!("step {s}"));
    ui::table(
        "distill",
        &[
            ("objective", options.objective.name().to_string()),
            ("examples", summary.data.examples.to_string()),
            (
                "skipped (only-correct)",
                summary.data.skipped_incorrect.to_string(),
            ),
            ("truncated", summary.data.truncated.to_string()),
            ("dropped", summary.data.dropped.to_string()),
            ("resumed from", resumed),
            ("steps", summary.steps.to_string()),
            ("first loss", fmt(summary.first_loss)),
            ("final loss", fmt(summary.final_loss)),
            ("eval loss", fmt(summary.eval_loss)),
            ("target tokens", summary.target_tokens.to_string()),
            ("tokens/s", format!("{:.0}", summary.tokens_per_s)),
            ("wall time", format!("{:.1} s", summary.wall_seconds)),
            ("output", output.display().to_string()),
        ],
    );
    Ok(ExitCode::SUCCESS)
}

/// `retort distill --cache-teacher DIR`: builds the cache and prints its size.
fn cache_teacher(
    options: &DistillOptions,
    dir: &std::path::Path,
    args: &CacheArgs,
) -> anyhow::Result<ExitCode> {
    let dtype = args.cache_dtype;
    let bar = ui::progress(None, "cache-teacher");
    let mut on_shard = |done: usize, total: usize| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    };
    let summary =
        retort::distill::cache::build_teacher_cache(options, dir, args.top_k, dtype, &mut on_shard)
            .with_context(|| format!("cannot build the teacher cache `{}`", dir.display()))?;
    bar.finish_and_clear();
    ui::table(
        "cache-teacher",
        &[
            ("examples", summary.examples.to_string()),
            ("positions", summary.positions.to_string()),
            ("top-k", summary.top_k.to_string()),
            ("dtype", format!("{:?}", summary.dtype).to_lowercase()),
            (
                "shards (reused)",
                format!("{} ({})", summary.shards, summary.reused_shards),
            ),
            ("bytes", summary.bytes.to_string()),
            (
                "bytes per position",
                format!("{:.1}", summary.bytes_per_position),
            ),
            ("wall time", format!("{:.1} s", summary.wall_seconds)),
            ("cache", summary.dir.display().to_string()),
        ],
    );
    Ok(ExitCode::SUCCESS)
}
