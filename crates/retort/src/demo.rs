//! `retort demo`: the whole distillation pipeline on the bundled synthetic world, in minutes on a
//! laptop CPU. Problems → the teacher samples traces → verify → select (correct, then
//! teacher-guided) → distill the base student (SFT, then on-policy distillation: the student
//! samples, the teacher scores its tokens, per-token reverse KL as the reward) → evaluate
//! teacher, base and distilled students on held-out problems (including level 5, harder than any
//! training problem) → trace the provenance of the base and distilled students' sentences →
//! `report.html` and `summary.json`. Every stage reads and writes plain files in the run folder,
//! so each can be inspected (and rerun) on its own.

use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;
use serde_json::{Value, json};

use crate::backend::SamplingParams;
use crate::backend::open::open_local;
use crate::compute::Compute;
use crate::distill::config::{DistillOptions, Objective, OnPolicyLoss};
use crate::error::{Error, Result};
use crate::eval::{EvalOptions, EvalSummary};
use crate::generate::{GenerateOptions, generate};
use crate::io::AtomicFile;
use crate::manifest::Manifest;
use crate::model_spec::ModelSpec;
use crate::provenance::{TraceOptions, trace};
use crate::select::scoring::LocalScorer;
use crate::select::{SelectOptions, Strategy, select_file};
use crate::world::WorldProblem;
use crate::world::eval::held_out_problems;
use crate::world::problems::generate_problems;
use crate::world::train::{DEFAULT_SEED, TRAIN_PER_LEVEL};

/// How big a demo run is.
#[derive(Debug, Clone, Serialize)]
pub struct DemoOptions {
    /// Run folder.
    pub out: PathBuf,
    /// Seed of problems, sampling and training order.
    pub seed: u64,
    /// Teacher model.
    pub teacher: ModelSpec,
    /// Base student model.
    pub student: ModelSpec,
    /// Training problems (spread over levels 1-4).
    pub train_problems: usize,
    /// Teacher samples per training problem.
    pub samples: usize,
    /// Traces kept by teacher-guided selection (None: all correct ones).
    pub budget: Option<usize>,
    /// Held-out problems per level (levels 1-5).
    pub eval_per_level: usize,
    /// SFT steps.
    pub sft_steps: usize,
    /// On-policy distillation steps after SFT (0 skips the stage).
    pub on_policy_steps: usize,
    /// Student samples per on-policy step.
    pub on_policy_batch: usize,
    /// Sequences per optimizer step.
    pub batch_size: usize,
    /// Responses traced per model for provenance.
    pub trace_records: usize,
    /// Rows generated together.
    pub generation_batch: usize,
}

impl DemoOptions {
    /// The full demo into `out`.
    pub fn full(out: PathBuf, seed: u64) -> Self {
        Self {
            out,
            seed,
            teacher: ModelSpec::World("teacher".into()),
            student: ModelSpec::World("student".into()),
            train_problems: 1024,
            samples: 1,
            budget: Some(900),
            eval_per_level: 60,
            sft_steps: 640,
            on_policy_steps: 20,
            on_policy_batch: 16,
            batch_size: 32,
            trace_records: 120,
            generation_batch: 64,
        }
    }

    /// A reduced demo (seconds): the same stages on a few problems and steps, for tests.
    pub fn reduced(out: PathBuf, seed: u64) -> Self {
        Self {
            train_problems: 48,
            budget: Some(40),
            eval_per_level: 4,
            sft_steps: 6,
            on_policy_steps: 2,
            on_policy_batch: 4,
            batch_size: 8,
            trace_records: 8,
            ..Self::full(out, seed)
        }
    }
}

/// What the caller's display sees.
#[derive(Debug, Clone)]
pub enum DemoEvent {
    /// A stage begins.
    Stage(&'static str),
    /// Progress inside the stage.
    Progress {
        /// Units done.
        done: usize,
        /// Units in total.
        total: usize,
    },
    /// The stage ended after `seconds`.
    StageDone(&'static str, f64),
}

/// The demo's result, also written to `summary.json`.
#[derive(Debug, Clone, Serialize)]
pub struct DemoSummary {
    /// Teacher held-out accuracy on the training levels (1-4, equally many problems each).
    pub teacher_accuracy: f64,
    /// Base student held-out accuracy (levels 1-4).
    pub base_accuracy: f64,
    /// Distilled student held-out accuracy (levels 1-4).
    pub distilled_accuracy: f64,
    /// Accuracy on level 5, harder than any training problem, per model.
    pub harder_level_accuracy: BTreeMap<String, f64>,
    /// Accuracy per level for each model.
    pub by_level: BTreeMap<String, BTreeMap<String, f64>>,
    /// Shares of sentence categories in the base and distilled students' responses.
    pub provenance: BTreeMap<String, BTreeMap<String, f64>>,
    /// Teacher traces generated, verified correct and selected.
    pub traces: BTreeMap<String, usize>,
    /// Training loss at the first and last step of each distillation stage.
    pub training: BTreeMap<String, Value>,
    /// Seconds per stage.
    pub stage_seconds: BTreeMap<String, f64>,
    /// Total wall time.
    pub wall_seconds: f64,
    /// The run settings.
    pub options: DemoOptions,
}

struct Clock<'a> {
    seconds: BTreeMap<String, f64>,
    events: &'a mut dyn FnMut(DemoEvent),
}

impl Clock<'_> {
    fn stage<T>(
        &mut self,
        name: &'static str,
        work: impl FnOnce(&mut dyn FnMut(usize, usize)) -> Result<T>,
    ) -> Result<T> {
        (self.events)(DemoEvent::Stage(name));
        let start = Instant::now();
        let events = &mut *self.events;
        let result = work(&mut |done, total| events(DemoEvent::Progress { done, total }))?;
        let seconds = start.elapsed().as_secs_f64();
        *self.seconds.entry(name.to_string()).or_default() += seconds;
        (self.events)(DemoEvent::StageDone(name, seconds));
        Ok(result)
    }
}

fn write_problems(path: &Path, problems: &[WorldProblem]) -> Result<()> {
    let mut file = AtomicFile::create(path)?;
    for problem in problems {
        writeln!(file, "{}", problem.to_record())?;
    }
    file.commit()
}

fn write_json(path: &Path, value: &impl Serialize) -> Result<()> {
    let bytes = serde_json::to_vec_pretty(value).map_err(|e| Error::Invalid(e.to_string()))?;
    AtomicFile::write_all(path, &bytes)
}

fn greedy(max_new_tokens: usize, seed: u64) -> SamplingParams {
    SamplingParams {
        temperature: 0.0,
        top_p: 1.0,
        top_k: None,
        max_new_tokens,
        seed: Some(seed),
        stop: Vec::new(),
        logprobs: 0,
    }
}

/// The levels the world's training problems come from.
const TRAIN_LEVELS: [usize; 4] = [1, 2, 3, 4];

fn level_accuracies(summary: &EvalSummary) -> BTreeMap<String, f64> {
    summary
        .by
        .iter()
        .map(|(level, m)| (format!("level_{level}"), m.accuracy))
        .collect()
}

/// Runs the demo; `events` drives the display.
pub fn run_demo(options: &DemoOptions, events: &mut dyn FnMut(DemoEvent)) -> Result<DemoSummary> {
    let started = Instant::now();
    let out = &options.out;
    fs_err::create_dir_all(out)?;
    for spec in [&options.teacher, &options.student] {
        let dir = spec.local_path().unwrap_or_default();
        if !dir.join("config.json").exists() {
            return Err(Error::Invalid(format!(
                "the demo model `{spec}` is missing at `{}`; run `retort world train` or set `RETORT_WORLD_DIR`",
                dir.display()
            )));
        }
    }
    let mut clock = Clock {
        seconds: BTreeMap::new(),
        events,
    };

    // Problems: held-out ones never share a question with the world's or the demo's training sets.
    let problems_path = out.join("problems.jsonl");
    let eval_path = out.join("eval_problems.jsonl");
    clock.stage("problems", |_| {
        let held_out = held_out_problems(DEFAULT_SEED, TRAIN_PER_LEVEL, options.eval_per_level);
        let exclude: HashSet<String> = held_out.iter().map(|p| p.question.clone()).collect();
        let per_level = options.train_problems.div_ceil(4);
        let train = generate_problems(
            options.seed.wrapping_mul(7919).wrapping_add(17),
            &[1, 2, 3, 4],
            per_level,
            "demo",
            &exclude,
        );
        write_problems(&problems_path, &train)?;
        write_problems(&eval_path, &held_out)
    })?;

    let teacher = open_local(&options.teacher, options.generation_batch, Compute::cpu())?;
    let base = open_local(&options.student, options.generation_batch, Compute::cpu())?;

    // The teacher samples traces at temperature 1, verified inline.
    let traces_path = out.join("traces.jsonl");
    let generation = clock.stage("generate", |progress| {
        let generate_options = GenerateOptions {
            input: problems_path.clone(),
            output: traces_path.clone(),
            samples: options.samples,
            sampling: SamplingParams {
                temperature: 1.0,
                max_new_tokens: 160,
                seed: Some(options.seed),
                ..SamplingParams::default()
            },
            chunk_size: 4096,
            verify: Some(Default::default()),
            ..GenerateOptions::default()
        };
        let started = Instant::now();
        let summary = generate(&teacher, &generate_options, progress)?;
        let mut manifest = Manifest::new(
            json!({"sampling": generate_options.sampling, "samples": options.samples}),
        );
        manifest.add_input(&problems_path)?;
        manifest.add_model(&options.teacher)?;
        manifest.counts =
            serde_json::to_value(&summary).map_err(|e| Error::Invalid(e.to_string()))?;
        manifest.wall_seconds = started.elapsed().as_secs_f64();
        manifest.write_beside(&traces_path)?;
        Ok(summary)
    })?;

    // Correct traces, ranked by how much the teacher prefers their sentences over the student.
    let selected_path = out.join("selected.jsonl");
    let selection = clock.stage("select", |_| {
        let scorer = LocalScorer {
            student: Some(&base),
            teacher: Some(&teacher),
            batch_size: 32,
        };
        let select_options = SelectOptions {
            strategies: vec![Strategy::Correct, Strategy::TeacherGuidedMean],
            budget: options.budget,
            seed: options.seed,
            ..SelectOptions::default()
        };
        select_file(
            &traces_path,
            &selected_path,
            &select_options,
            Some(&scorer),
            &[&options.teacher, &options.student],
        )
    })?;

    // SFT on the selected traces, then on-policy distillation on the same prompts.
    let sft_dir = out.join("student-sft");
    let distill_base = DistillOptions {
        student: Some(ModelSpec::folder(options.student.local_dir()?)),
        data: Some(selected_path.clone()),
        batch_size: options.batch_size,
        seed: options.seed,
        max_seq_len: 256,
        ..DistillOptions::default()
    };
    let mut training = BTreeMap::new();
    let sft = clock.stage("distill-sft", |progress| {
        let sft_options = DistillOptions {
            output: Some(sft_dir.clone()),
            objective: Objective::Sft,
            max_steps: Some(options.sft_steps),
            lr: 1e-3,
            warmup_steps: (options.sft_steps / 10).max(1),
            min_lr_ratio: 0.0,
            ..distill_base.clone()
        };
        crate::distill::trainer::distill(&sft_options, &mut |stats| {
            progress(stats.step, options.sft_steps)
        })
    })?;
    training.insert("sft".to_string(), json!({"first_loss": sft.first_loss, "final_loss": sft.final_loss, "steps": sft.steps, "tokens_per_s": sft.tokens_per_s}));
    let distilled_dir = if options.on_policy_steps > 0 {
        let on_policy_dir = out.join("student-distilled");
        let on_policy = clock.stage("distill-on-policy", |progress| {
            let on_policy_options = DistillOptions {
                student: Some(ModelSpec::folder(&sft_dir)),
                teacher: Some(ModelSpec::folder(options.teacher.local_dir()?)),
                output: Some(on_policy_dir.clone()),
                objective: Objective::OnPolicy,
                on_policy_loss: OnPolicyLoss::Reward,
                lambda: 1.0,
                max_new_tokens: 80,
                sample_temperature: 1.0,
                batch_size: options.on_policy_batch,
                max_steps: Some(options.on_policy_steps),
                lr: 1e-4,
                warmup_steps: 1,
                ..distill_base.clone()
            };
            crate::distill::trainer::distill(&on_policy_options, &mut |stats| {
                progress(stats.step, options.on_policy_steps)
            })
        })?;
        training.insert("on_policy".to_string(), json!({"first_loss": on_policy.first_loss, "final_loss": on_policy.final_loss, "steps": on_policy.steps, "tokens_per_s": on_policy.tokens_per_s}));
        on_policy_dir
    } else {
        sft_dir.clone()
    };
    let distilled = open_local(
        &ModelSpec::folder(&distilled_dir),
        options.generation_batch,
        Compute::cpu(),
    )?;

    // Held-out evaluation, greedy, per level.
    let mut summaries = BTreeMap::new();
    for (name, backend) in [
        ("teacher", &teacher),
        ("base", &base),
        ("distilled", &distilled),
    ] {
        let summary = clock.stage("eval", |progress| {
            let mut eval_options = EvalOptions::new(&eval_path);
            eval_options.output = Some(out.join(format!("eval_{name}.jsonl")));
            eval_options.sampling = greedy(160, options.seed);
            eval_options.by = Some("level".into());
            crate::eval::run(backend, &eval_options, progress)
        })?;
        write_json(&out.join(format!("eval_{name}.json")), &summary)?;
        summaries.insert(name, summary);
    }

    // Provenance of the base and distilled students' held-out responses.
    let mut provenance = BTreeMap::new();
    for name in ["base", "distilled"] {
        let input = out.join(format!("trace_input_{name}.jsonl"));
        let records = crate::io::read_records(&out.join(format!("eval_{name}.jsonl")))?;
        let mut file = AtomicFile::create(&input)?;
        for (_, record) in records.iter().take(options.trace_records) {
            writeln!(file, "{}", Value::Object(record.clone()))?;
        }
        file.commit()?;
        let summary = clock.stage("trace", |progress| {
            let trace_options =
                TraceOptions::new(&input, out.join(format!("provenance_{name}.jsonl")));
            trace(&teacher, &base, &distilled, &trace_options, progress)
        })?;
        write_json(&out.join(format!("provenance_{name}.json")), &summary)?;
        provenance.insert(name.to_string(), summary.shares.clone());
    }

    // Headline accuracies cover the training levels; level 5 (longer chains than any training
    // problem) is reported on its own.
    let level = |name: &str, level: &str| {
        summaries
            .get(name)
            .and_then(|s| s.by.get(level))
            .map_or(0.0, |m| m.accuracy)
    };
    let accuracy = |name: &str| {
        TRAIN_LEVELS
            .iter()
            .map(|l| level(name, &l.to_string()))
            .sum::<f64>()
            / TRAIN_LEVELS.len() as f64
    };
    let harder_level_accuracy = ["teacher", "base", "distilled"]
        .into_iter()
        .map(|name| (name.to_string(), level(name, "5")))
        .collect();
    let mut by_level = BTreeMap::new();
    for (name, summary) in &summaries {
        by_level.insert((*name).to_string(), level_accuracies(summary));
    }
    let mut traces = BTreeMap::new();
    traces.insert(
        "generated".into(),
        generation.generated + generation.already_done,
    );
    traces.insert("correct".into(), generation.correct);
    traces.insert("selected".into(), selection.kept);
    let mut summary = DemoSummary {
        teacher_accuracy: accuracy("teacher"),
        base_accuracy: accuracy("base"),
        distilled_accuracy: accuracy("distilled"),
        harder_level_accuracy,
        by_level,
        provenance,
        traces,
        training,
        stage_seconds: BTreeMap::new(),
        wall_seconds: 0.0,
        options: options.clone(),
    };
    clock.stage("report", |_| {
        write_json(&out.join("summary.json"), &summary)?;
        crate::report::write_report(out, &out.join("report.html")).map(|_| ())
    })?;
    summary.stage_seconds = clock.seconds;
    summary.wall_seconds = started.elapsed().as_secs_f64();
    write_json(&out.join("summary.json"), &summary)?;
    Ok(summary)
}
