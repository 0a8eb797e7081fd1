//! The offline teacher cache: the teacher runs once over the training (and evaluation) data and
//! its top-k log-probs at every completion position are stored, so `kd` trains from them every
//! epoch without loading the teacher ([`TeacherSignal::Sparse`], with the run's missing-mass
//! policy).
//!
//! A cache is a folder: `cache.json` ([`CacheHeader`]: teacher, k, temperature, dtype,
//! vocabulary, a fingerprint of the data) and shards `shard-NNNNN.safetensors` of
//! [`SHARD_EXAMPLES`] examples each, holding `indices` `[positions, k]` u32 and `logprobs`
//! `[positions, k]` (f16 by default, or f32) with the per-example index (key, hash of the token
//! ids, first row, rows) in the file's metadata. Per completion token that is `k * (4 + 2)` bytes
//! in f16. Shards and the header are written atomically (temp file and rename); an interrupted
//! build resumes by keeping the shards already written. Examples are keyed by
//! [`Example::key`] and a hash of their token ids, so a cache built from other data or other
//! tokenisation settings is refused, naming the example.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use retort_model::score::{for_each_logits_chunk, head_chunk_rows};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::distill::config::DistillOptions;
use crate::distill::data::{self, Example, TokenizerView};
use crate::distill::objective::{MicroBatch, hidden_at_targets};
use crate::distill::teacher::{LiveTeacher, MissingMass, TeacherSignal, open_live_teacher};
use crate::error::{Error, Result};

/// File name of the cache header.
pub const CACHE_FILE: &str = "cache.json";
/// Examples per shard file.
pub const SHARD_EXAMPLES: usize = 256;
const FORMAT: &str = "retort-teacher-cache";
const VERSION: u32 = 1;

/// How the log-probs are stored.
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CacheDtype {
    /// Half precision: 2 bytes per log-prob, absolute error below 0.008 for log-probs above -16.
    #[default]
    F16,
    /// Single precision: 4 bytes per log-prob.
    F32,
}

impl CacheDtype {
    fn dtype(self) -> DType {
        match self {
            Self::F16 => DType::F16,
            Self::F32 => DType::F32,
        }
    }
}

/// `cache.json`: what the cache holds and how it was made.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheHeader {
    /// Always `retort-teacher-cache`.
    pub format: String,
    /// Format version (1).
    pub version: u32,
    /// The teacher spec it was computed with.
    pub teacher: String,
    /// Log-probs kept per position.
    pub top_k: usize,
    /// The temperature the log-probs were computed at.
    pub temperature: f64,
    /// Storage dtype of the log-probs.
    pub dtype: CacheDtype,
    /// The teacher's (and student's) vocabulary size.
    pub vocab_size: usize,
    /// Examples per shard.
    pub shard_examples: usize,
    /// Examples in the cache.
    pub examples: usize,
    /// SHA-256 over every example's key and token hash, in order.
    pub data_fingerprint: String,
    /// Completion positions stored (set once complete).
    pub positions: usize,
    /// Whether every shard was written.
    pub complete: bool,
}

/// One example's rows inside a shard.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Entry {
    key: String,
    hash: String,
    offset: usize,
    rows: usize,
}

/// What building a cache did.
#[derive(Debug, Clone, Serialize)]
pub struct CacheSummary {
    /// The cache folder.
    pub dir: PathBuf,
    /// Examples cached.
    pub examples: usize,
    /// Completion positions cached.
    pub positions: usize,
    /// Shard files.
    pub shards: usize,
    /// Shards kept from an earlier, interrupted build.
    pub reused_shards: usize,
    /// Log-probs per position.
    pub top_k: usize,
    /// Storage dtype of the log-probs.
    pub dtype: CacheDtype,
    /// Bytes of the shard files.
    pub bytes: u64,
    /// Shard bytes per cached position (ids, log-probs and index).
    pub bytes_per_position: f64,
    /// Wall time.
    pub wall_seconds: f64,
}

/// The hex SHA-256 (first 16 bytes) of an example's prompt length and token ids.
pub fn example_hash(example: &Example) -> String {
    let mut hasher = Sha256::new();
    hasher.update((example.prompt_len as u64).to_le_bytes());
    for id in &example.ids {
        hasher.update(id.to_le_bytes());
    }
    hex::encode(&hasher.finalize()[..16])
}

fn fingerprint(examples: &[Example]) -> String {
    let mut hasher = Sha256::new();
    for example in examples {
        hasher.update(example.key.as_bytes());
        hasher.update([0]);
        hasher.update(example_hash(example).as_bytes());
    }
    hex::encode(hasher.finalize())
}

fn shard_path(dir: &Path, index: usize) -> PathBuf {
    dir.join(format!("shard-{index:05}.safetensors"))
}

/// Runs the teacher of `options` over its `data` (and `eval-data`), tokenised as the student
/// tokenises them for training, and writes the top-`k` cache to `dir`; calls `progress(done,
/// total)` after each shard. An interrupted build of the same data and settings resumes.
pub fn build_teacher_cache(
    options: &DistillOptions,
    dir: &Path,
    top_k: usize,
    dtype: CacheDtype,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<CacheSummary> {
    let started = std::time::Instant::now();
    let plan = options.resolve_cache()?;
    let data_path = plan.data.as_path();
    let student = retort_model::load(
        &plan.student.local_dir()?.to_string_lossy(),
        &plan.compute.load_options()?,
    )?;
    // The cache's ids index the student's logits; a padded teacher's extra rows never occur.
    let vocab_size = student.config.vocab_size;
    if top_k == 0 || top_k > vocab_size {
        return Err(Error::Invalid(format!(
            "field `top-k`: must lie in 1..={vocab_size} (the vocabulary), got {top_k}"
        )));
    }
    let teacher = open_live_teacher(
        &plan.teacher,
        &student,
        top_k,
        MissingMass::default(),
        plan.compute.precision,
    )?;
    // A server gives log-probs at temperature 1: the cache says so, and training at another
    // temperature then needs `--missing-mass renormalize` (the trainer checks).
    let temperature = match &teacher {
        LiveTeacher::Local(_) => plan.temperature,
        LiveTeacher::Remote(_) => {
            if (plan.temperature - 1.0).abs() > 1e-9 {
                tracing::warn!(
                    "teacher `{}` is served: the cache holds its log-probs at temperature 1, not {}",
                    plan.teacher,
                    plan.temperature
                );
            }
            1.0
        }
    };
    let view = TokenizerView::of(&student)?;
    let mut examples = data::load_examples(data_path, &view, &plan.data_options)?.0;
    if let Some(eval) = &plan.eval_data {
        examples.extend(data::load_examples(eval, &view, &plan.data_options)?.0);
    }
    let mut seen = std::collections::HashSet::new();
    examples.retain(|e| seen.insert((e.key.clone(), example_hash(e))));
    if examples.is_empty() {
        return Err(Error::Invalid(format!(
            "`{}`: no usable example to cache",
            data_path.display()
        )));
    }

    let mut header = CacheHeader {
        format: FORMAT.into(),
        version: VERSION,
        teacher: plan.teacher.to_string(),
        top_k,
        temperature,
        dtype,
        vocab_size,
        shard_examples: SHARD_EXAMPLES,
        examples: examples.len(),
        data_fingerprint: fingerprint(&examples),
        positions: 0,
        complete: false,
    };
    let header_path = dir.join(CACHE_FILE);
    if header_path.is_file() {
        let existing = read_header(dir)?;
        let comparable = CacheHeader {
            positions: 0,
            complete: false,
            ..existing.clone()
        };
        if comparable != header {
            return Err(Error::Invalid(format!(
                "`{}` holds a teacher cache of other data or settings (teacher `{}`, k = {}, \
                 temperature {}, {} examples); choose another folder or delete it",
                dir.display(),
                existing.teacher,
                existing.top_k,
                existing.temperature,
                existing.examples
            )));
        }
    } else {
        fs_err::create_dir_all(dir)?;
        write_header(dir, &header)?;
    }

    let pad_id = student.pad_id();
    let device = match &teacher {
        LiveTeacher::Local(model) => model.model.device().clone(),
        LiveTeacher::Remote(_) => Device::Cpu,
    };
    let micro = options.micro_batch();
    let total_shards = examples.len().div_ceil(SHARD_EXAMPLES);
    let (mut positions, mut reused, mut bytes) = (0usize, 0usize, 0u64);
    for (index, chunk) in examples.chunks(SHARD_EXAMPLES).enumerate() {
        let path = shard_path(dir, index);
        let chunk_positions: usize = chunk.iter().map(Example::target_len).sum();
        if path.is_file() {
            // Shards are renamed into place whole, and the header's fingerprint matched.
            let entries = read_shard(&path)?.0;
            if entries.len() == chunk.len()
                && entries.iter().map(|e| e.rows).sum::<usize>() == chunk_positions
            {
                reused += 1;
                positions += chunk_positions;
                bytes += fs_err::metadata(&path)?.len();
                progress(index + 1, total_shards);
                continue;
            }
        }
        let mut indices = Vec::with_capacity(chunk_positions * top_k);
        let mut logprobs = Vec::with_capacity(chunk_positions * top_k);
        let mut entries = Vec::with_capacity(chunk.len());
        let mut offset = 0;
        for rows in chunk.chunks(micro) {
            let refs: Vec<&Example> = rows.iter().collect();
            match &teacher {
                LiveTeacher::Local(model) => {
                    let batch = MicroBatch::new(&refs, pad_id, &device)?;
                    let hidden = hidden_at_targets(&model.model, &batch)?.detach();
                    let chunk_rows = head_chunk_rows(model.model.config().vocab_size);
                    for_each_logits_chunk(
                        &model.model,
                        &hidden,
                        chunk_rows,
                        |_, logits| -> Result<()> {
                            let logits = logits.affine(1.0 / plan.temperature, 0.0)?;
                            // Padded vocabularies: only the student's rows can be cached.
                            let logits = logits.narrow(1, 0, logits.dim(1)?.min(vocab_size))?;
                            let values = retort_model::train::log_softmax(&logits)?
                                .to_device(&Device::Cpu)?
                                .to_vec2::<f32>()?;
                            for row in &values {
                                top_k_row(row, top_k, &mut indices, &mut logprobs);
                            }
                            Ok(())
                        },
                    )?;
                }
                LiveTeacher::Remote(remote) => {
                    let TeacherSignal::Sparse {
                        indices: ids,
                        logprobs: values,
                        ..
                    } = remote.signal(&refs, &device)?
                    else {
                        return Err(Error::Invalid(
                            "a served teacher gave a dense signal; expected top-k log-probs".into(),
                        ));
                    };
                    indices.extend(ids.flatten_all()?.to_vec1::<u32>()?);
                    logprobs.extend(values.flatten_all()?.to_vec1::<f32>()?);
                }
            }
            for example in rows {
                entries.push(Entry {
                    key: example.key.clone(),
                    hash: example_hash(example),
                    offset,
                    rows: example.target_len(),
                });
                offset += example.target_len();
            }
        }
        let shard_bytes = write_shard(&path, &entries, indices, logprobs, offset, top_k, dtype)?;
        bytes += shard_bytes;
        positions += offset;
        progress(index + 1, total_shards);
    }
    header.positions = positions;
    header.complete = true;
    write_header(dir, &header)?;
    Ok(CacheSummary {
        dir: dir.to_path_buf(),
        examples: examples.len(),
        positions,
        shards: total_shards,
        reused_shards: reused,
        top_k,
        dtype,
        bytes,
        bytes_per_position: bytes as f64 / positions.max(1) as f64,
        wall_seconds: started.elapsed().as_secs_f64(),
    })
}

/// Appends the `k` largest log-probs of `row` (descending) and their ids.
fn top_k_row(row: &[f32], k: usize, indices: &mut Vec<u32>, logprobs: &mut Vec<f32>) {
    let mut order: Vec<u32> = (0..row.len() as u32).collect();
    let descending = |a: &u32, b: &u32| row[*b as usize].total_cmp(&row[*a as usize]);
    if k < order.len() {
        // Partition first, then sort only the k kept.
        order.select_nth_unstable_by(k - 1, descending);
        order.truncate(k);
    }
    order.sort_unstable_by(descending);
    for id in order {
        indices.push(id);
        logprobs.push(row[id as usize]);
    }
}

fn write_header(dir: &Path, header: &CacheHeader) -> Result<()> {
    let mut text = serde_json::to_string_pretty(header)
        .map_err(|e| Error::Invalid(format!("cannot write the cache header: {e}")))?;
    text.push('\n');
    Ok(retort_model::save::write_atomic(
        &dir.join(CACHE_FILE),
        text.as_bytes(),
    )?)
}

fn read_header(dir: &Path) -> Result<CacheHeader> {
    let path = dir.join(CACHE_FILE);
    if !path.is_file() {
        return Err(Error::Invalid(format!(
            "`{}` is not a teacher cache: `{CACHE_FILE}` is missing\nhint: build one with \
             `retort distill --cache-teacher {} --teacher MODEL --student MODEL --data FILE`",
            dir.display(),
            dir.display()
        )));
    }
    let text = fs_err::read_to_string(&path)?;
    let header: CacheHeader = serde_json::from_str(&text).map_err(|e| Error::Input {
        path: path.clone(),
        line: e.line(),
        message: format!("invalid teacher cache header: {e}"),
    })?;
    if header.format != FORMAT || header.version != VERSION {
        return Err(Error::Input {
            path,
            line: 1,
            message: format!(
                "expected format `{FORMAT}` version {VERSION}, got `{}` version {}",
                header.format, header.version
            ),
        });
    }
    Ok(header)
}

fn write_shard(
    path: &Path,
    entries: &[Entry],
    indices: Vec<u32>,
    logprobs: Vec<f32>,
    rows: usize,
    k: usize,
    dtype: CacheDtype,
) -> Result<u64> {
    let indices = Tensor::from_vec(indices, (rows, k), &Device::Cpu)?;
    let logprobs = Tensor::from_vec(logprobs, (rows, k), &Device::Cpu)?.to_dtype(dtype.dtype())?;
    let index = serde_json::to_string(entries)
        .map_err(|e| Error::Invalid(format!("cannot write the shard index: {e}")))?;
    let metadata = HashMap::from([
        ("format".to_string(), "pt".to_string()),
        ("entries".to_string(), index),
    ]);
    let tensors = [("indices", &indices), ("logprobs", &logprobs)];
    let bytes = safetensors::serialize(tensors, Some(metadata)).map_err(|e| {
        Error::Invalid(format!(
            "{}: cannot serialise the shard: {e}",
            path.display()
        ))
    })?;
    retort_model::save::write_atomic(path, &bytes)?;
    Ok(bytes.len() as u64)
}

fn read_shard(path: &Path) -> Result<(Vec<Entry>, Tensor, Tensor)> {
    let bytes = fs_err::read(path)?;
    let bad =
        |what: String| Error::Invalid(format!("teacher cache shard `{}`: {what}", path.display()));
    let (_, metadata) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| bad(format!("not a safetensors file: {e}")))?;
    let index = metadata
        .metadata()
        .as_ref()
        .and_then(|m| m.get("entries"))
        .ok_or_else(|| bad("no `entries` index in its metadata".into()))?;
    let entries: Vec<Entry> =
        serde_json::from_str(index).map_err(|e| bad(format!("invalid `entries` index: {e}")))?;
    let mut tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
        .map_err(|e| bad(format!("unreadable tensors: {e}")))?;
    let indices = tensors
        .remove("indices")
        .ok_or_else(|| bad("missing tensor `indices`".into()))?;
    let logprobs = tensors
        .remove("logprobs")
        .ok_or_else(|| bad("missing tensor `logprobs`".into()))?;
    Ok((entries, indices, logprobs))
}

/// A complete cache, loaded into memory.
#[derive(Debug)]
pub struct TeacherCache {
    dir: PathBuf,
    header: CacheHeader,
    /// `(indices, logprobs)` per shard, `[positions, k]` each.
    shards: Vec<(Tensor, Tensor)>,
    /// Example key -> (token hash, shard, first row, rows).
    index: HashMap<String, Vec<(String, usize, usize, usize)>>,
}

impl TeacherCache {
    /// Opens the cache in `dir`; it must be complete.
    pub fn open(dir: &Path) -> Result<Self> {
        let header = read_header(dir)?;
        if !header.complete {
            return Err(Error::Invalid(format!(
                "the teacher cache `{}` is incomplete (its build was interrupted)\nhint: rerun \
                 the same `retort distill --cache-teacher {}` command to finish it",
                dir.display(),
                dir.display()
            )));
        }
        let count = header.examples.div_ceil(header.shard_examples.max(1));
        let mut shards = Vec::with_capacity(count);
        let mut index: HashMap<String, Vec<(String, usize, usize, usize)>> = HashMap::new();
        for shard in 0..count {
            let path = shard_path(dir, shard);
            let (entries, indices, logprobs) = read_shard(&path)?;
            let rows = indices.dim(0)?;
            if indices.dims() != [rows, header.top_k] || logprobs.dims() != indices.dims() {
                return Err(Error::Invalid(format!(
                    "teacher cache shard `{}`: tensors {:?} and {:?}, expected [positions, {}]",
                    path.display(),
                    indices.dims(),
                    logprobs.dims(),
                    header.top_k
                )));
            }
            for entry in entries {
                if entry.offset + entry.rows > rows {
                    return Err(Error::Invalid(format!(
                        "teacher cache shard `{}`: example `{}` points past its {rows} rows",
                        path.display(),
                        entry.key
                    )));
                }
                index.entry(entry.key).or_default().push((
                    entry.hash,
                    shard,
                    entry.offset,
                    entry.rows,
                ));
            }
            shards.push((indices, logprobs));
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            header,
            shards,
            index,
        })
    }

    /// The header.
    pub fn header(&self) -> &CacheHeader {
        &self.header
    }

    /// The sparse teacher signal `[1, n, k]` for the target positions of `examples` laid out as
    /// [`MicroBatch::new`] lays them out; `source` (the data file) names a mismatch.
    pub fn signal(
        &self,
        examples: &[&Example],
        source: &Path,
        missing_mass: MissingMass,
        device: &Device,
    ) -> Result<TeacherSignal> {
        let mut indices = Vec::with_capacity(examples.len());
        let mut logprobs = Vec::with_capacity(examples.len());
        for example in examples {
            let (shard, offset, rows) = self.locate(example, source)?;
            let (all_indices, all_logprobs) = &self.shards[shard];
            indices.push(all_indices.narrow(0, offset, rows)?);
            logprobs.push(all_logprobs.narrow(0, offset, rows)?);
        }
        let indices = Tensor::cat(&indices, 0)?.unsqueeze(0)?.to_device(device)?;
        let logprobs = Tensor::cat(&logprobs, 0)?
            .to_dtype(DType::F32)?
            .unsqueeze(0)?
            .to_device(device)?;
        Ok(TeacherSignal::Sparse {
            indices,
            logprobs,
            temperature: self.header.temperature,
            missing_mass,
        })
    }

    fn locate(&self, example: &Example, source: &Path) -> Result<(usize, usize, usize)> {
        let err = |message: String| Error::Input {
            path: source.to_path_buf(),
            line: example.line,
            message,
        };
        let hint = format!(
            "\nhint: rebuild the cache from this data with `retort distill --cache-teacher {}`",
            self.dir.display()
        );
        let Some(candidates) = self.index.get(&example.key) else {
            return Err(err(format!(
                "example `{}` is not in the teacher cache `{}`{hint}",
                example.key,
                self.dir.display()
            )));
        };
        let hash = example_hash(example);
        match candidates.iter().find(|(h, ..)| *h == hash) {
            Some(&(_, shard, offset, rows)) if rows == example.target_len() => {
                Ok((shard, offset, rows))
            }
            Some(&(_, _, _, rows)) => Err(err(format!(
                "example `{}`: the teacher cache `{}` holds {rows} positions for it, the data \
                 {}{hint}",
                example.key,
                self.dir.display(),
                example.target_len()
            ))),
            None => Err(err(format!(
                "example `{}`: its {} token ids (hash {hash}) differ from those the teacher cache \
                 `{}` was built from (hash {}): other data, tokenizer or `max-seq-len`{hint}",
                example.key,
                example.ids.len(),
                self.dir.display(),
                candidates[0].0
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_rows_are_sorted_and_complete() {
        let row = [-3.0f32, -0.5, -2.0, -0.1, -7.0];
        let (mut ids, mut values) = (Vec::new(), Vec::new());
        top_k_row(&row, 2, &mut ids, &mut values);
        assert_eq!(
            (ids.clone(), values.clone()),
            (vec![3, 1], vec![-0.1, -0.5])
        );
        ids.clear();
        values.clear();
        top_k_row(&row, 5, &mut ids, &mut values);
        assert_eq!(ids, vec![3, 1, 2, 0, 4]);
    }

    #[test]
    fn hash_covers_prompt_length_and_ids() {
        let example = |ids: Vec<u32>, prompt_len| Example {
            ids,
            prompt_len,
            line: 1,
            key: "k".into(),
            correct: None,
        };
        let a = example_hash(&example(vec![1, 2, 3], 1));
        assert_eq!(a.len(), 32);
        assert_ne!(a, example_hash(&example(vec![1, 2, 3], 2)));
        assert_ne!(a, example_hash(&example(vec![1, 2, 4], 1)));
    }
}
