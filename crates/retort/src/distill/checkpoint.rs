//! Checkpoints and the final model (DESIGN.md §3 "Checkpoint").
//!
//! `OUTPUT/checkpoint-N/` is a Hugging Face folder plus `optimizer.safetensors` (AdamW moments and
//! step) and `trainer_state.json` ([`TrainerState`]: step, data position, RNG, resolved config).
//! It is written into a temp folder and renamed, so it exists whole or not at all; the latest one
//! is found by [`latest_checkpoint`]. The final model goes into `OUTPUT` itself, beside
//! `checkpoint-N/` and `metrics.jsonl`: it is staged in a temp folder and its files are renamed
//! in one by one, `trainer_state.json` last.
//!
//! A LoRA run saves PEFT adapter folders instead (`adapter_config.json`,
//! `adapter_model.safetensors`, see [`super::lora`]) in the checkpoints and the output; the
//! optimizer state then holds the adapters' moments only.

use std::path::{Path, PathBuf};

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::distill::config::DistillOptions;
use crate::distill::lora::{self, LoraModel};
use crate::error::{Error, Result};

/// File name of the optimizer state inside a checkpoint.
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// File name of the trainer state.
pub const TRAINER_STATE_FILE: &str = "trainer_state.json";
/// File name of the resolved config in the output folder.
pub const CONFIG_FILE: &str = "config.toml";

/// Where the run stands: everything besides weights and optimizer moments needed to resume.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps taken.
    pub step: usize,
    /// Steps the run plans in total.
    pub total_steps: usize,
    /// Epoch of the next batch (0-based).
    pub epoch: usize,
    /// Index of the next batch within its epoch.
    pub batch_in_epoch: usize,
    /// Batches per epoch.
    pub batches_per_epoch: usize,
    /// Training examples.
    pub examples: usize,
    /// The data-order RNG: the order of epoch `e` is drawn from ChaCha8 seeded with `seed`,
    /// stream `e`, so the seed and the epoch restore it exactly.
    pub rng: RngState,
    /// Completion tokens trained on so far.
    pub tokens_seen: usize,
    /// The optimizer state file (relative to this file), absent in the final output.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub optimizer_state: Option<String>,
    /// Mean loss of the last step.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub last_loss: Option<f64>,
    /// The resolved options of the run.
    pub config: DistillOptions,
    /// The retort version that wrote it.
    pub retort_version: String,
}

/// The RNG of the data order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RngState {
    /// Always `chacha8`.
    pub algorithm: String,
    /// The seed.
    pub seed: u64,
    /// The stream (the epoch) in use.
    pub stream: u64,
}

impl TrainerState {
    /// Reads `trainer_state.json`.
    pub fn read(path: &Path) -> Result<Self> {
        let text = fs_err::read_to_string(path)?;
        serde_json::from_str(&text).map_err(|e| Error::Input {
            path: path.to_path_buf(),
            line: e.line(),
            message: format!("invalid trainer state: {e}"),
        })
    }

    fn to_json(&self) -> Result<String> {
        let mut text = serde_json::to_string_pretty(self)
            .map_err(|e| Error::Invalid(format!("cannot write trainer state: {e}")))?;
        text.push('\n');
        Ok(text)
    }
}

/// What a save needs from the model.
pub struct ModelFiles<'a> {
    /// Named weights (Hugging Face names).
    pub tensors: &'a [(String, Tensor)],
    /// The raw `config.json`.
    pub raw_config: &'a serde_json::Value,
    /// Whether `lm_head` is tied to the embeddings.
    pub tie_word_embeddings: bool,
    /// A folder holding the tokenizer files to copy.
    pub source_dir: &'a Path,
}

/// `OUTPUT/checkpoint-N`.
pub fn checkpoint_dir(output: &Path, step: usize) -> PathBuf {
    output.join(format!("checkpoint-{step}"))
}

/// Writes `checkpoint-<step>` atomically: the HF folder, the optimizer state and the trainer
/// state.
pub fn save_checkpoint(
    output: &Path,
    model: &ModelFiles<'_>,
    optimizer: &retort_model::train::AdamW,
    state: &TrainerState,
) -> Result<PathBuf> {
    let dir = checkpoint_dir(output, state.step);
    let json = state.to_json()?;
    retort_model::save::save_hf_folder_with(
        &dir,
        model.tensors,
        model.raw_config,
        model.tie_word_embeddings,
        model.source_dir,
        |tmp| {
            optimizer.save_state(&tmp.join(OPTIMIZER_FILE))?;
            fs_err::write(tmp.join(TRAINER_STATE_FILE), &json)?;
            Ok(())
        },
    )?;
    Ok(dir)
}

/// The checkpoint with the highest step in `output` that holds a trainer state.
pub fn latest_checkpoint(output: &Path) -> Result<Option<(usize, PathBuf)>> {
    if !output.is_dir() {
        return Ok(None);
    }
    let mut best: Option<(usize, PathBuf)> = None;
    for entry in fs_err::read_dir(output)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(step) = name
            .to_str()
            .and_then(|n| n.strip_prefix("checkpoint-"))
            .and_then(|n| n.parse::<usize>().ok())
        else {
            continue;
        };
        let path = entry.path();
        if !path.join(TRAINER_STATE_FILE).is_file() {
            continue;
        }
        if best.as_ref().is_none_or(|(s, _)| step > *s) {
            best = Some((step, path));
        }
    }
    Ok(best)
}

/// Writes the final model into `output` (beside checkpoints and metrics): the HF folder files,
/// `config.toml` and `trainer_state.json` (renamed in last).
pub fn save_final(output: &Path, model: &ModelFiles<'_>, state: &TrainerState) -> Result<()> {
    stage_final(output, state, |staging, extra| {
        Ok(retort_model::save::save_hf_folder_with(
            staging,
            model.tensors,
            model.raw_config,
            model.tie_word_embeddings,
            model.source_dir,
            extra,
        )?)
    })
}

/// Writes `checkpoint-<step>` of a LoRA run atomically: the PEFT adapter folder
/// ([`lora::write_adapter`]), the optimizer state (adapter moments only) and the trainer state.
pub fn save_adapter_checkpoint(
    output: &Path,
    adapter: &LoraModel,
    source_dir: &Path,
    optimizer: &retort_model::train::AdamW,
    state: &TrainerState,
) -> Result<PathBuf> {
    let dir = checkpoint_dir(output, state.step);
    let json = state.to_json()?;
    retort_model::save::write_dir_atomic(&dir, |tmp| {
        lora::write_adapter(tmp, adapter, source_dir).map_err(model_error)?;
        optimizer.save_state(&tmp.join(OPTIMIZER_FILE))?;
        fs_err::write(tmp.join(TRAINER_STATE_FILE), &json)?;
        Ok(())
    })?;
    Ok(dir)
}

/// Writes the final adapter of a LoRA run into `output` (PEFT files, tokenizer files,
/// `config.toml`, `trainer_state.json` last).
pub fn save_final_adapter(
    output: &Path,
    adapter: &LoraModel,
    source_dir: &Path,
    state: &TrainerState,
) -> Result<()> {
    stage_final(output, state, |staging, extra| {
        Ok(retort_model::save::write_dir_atomic(staging, |tmp| {
            lora::write_adapter(tmp, adapter, source_dir).map_err(model_error)?;
            extra(tmp)
        })?)
    })
}

type Extra<'a> = Box<dyn FnOnce(&Path) -> retort_model::Result<()> + 'a>;

/// Builds the final files in `output/.final.staging` with `write` (which must call the extra
/// writer it is given inside its temp folder), then renames them into `output` one by one,
/// `trainer_state.json` last: its presence marks a complete final model.
fn stage_final(
    output: &Path,
    state: &TrainerState,
    write: impl FnOnce(&Path, Extra<'_>) -> Result<()>,
) -> Result<()> {
    fs_err::create_dir_all(output)?;
    let staging = output.join(".final.staging");
    if staging.exists() {
        fs_err::remove_dir_all(&staging)?;
    }
    let json = state.to_json()?;
    let toml = state.config.to_toml()?;
    write(
        &staging,
        Box::new(move |tmp: &Path| {
            fs_err::write(tmp.join(CONFIG_FILE), &toml)?;
            fs_err::write(tmp.join(TRAINER_STATE_FILE), &json)?;
            Ok(())
        }),
    )?;
    let mut names: Vec<std::ffi::OsString> = fs_err::read_dir(&staging)?
        .map(|entry| entry.map(|e| e.file_name()))
        .collect::<std::io::Result<_>>()?;
    names.sort_by_key(|name| (name == TRAINER_STATE_FILE, name.clone()));
    let stale = output.join(TRAINER_STATE_FILE);
    if stale.exists() {
        fs_err::remove_file(&stale)?;
    }
    for name in names {
        fs_err::rename(staging.join(&name), output.join(&name))?;
    }
    fs_err::remove_dir(&staging)?;
    Ok(())
}

/// Carries a retort error through retort-model's atomic-folder writer.
fn model_error(e: Error) -> retort_model::Error {
    match e {
        Error::Model(inner) => inner,
        other => retort_model::Error::Model(other.to_string()),
    }
}
