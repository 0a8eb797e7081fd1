//! Model and generation configuration read from a Hugging Face folder.
//!
//! [`ModelConfig`] is parsed from `config.json` in both the transformers 4.x layout (top-level
//! `rope_theta`, `rope_scaling`, `torch_dtype`) and the 5.x layout (`rope_parameters`, `dtype`).
//! [`GenerationConfig`] comes from `generation_config.json` (EOS as an int or a list) with the
//! model config as fallback. Errors name the file and the field.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{Error, Result};

/// The decoder architectures this crate implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Architecture {
    /// `Qwen2ForCausalLM` (Qwen2, Qwen2.5, DeepSeek-R1-Distill-Qwen).
    Qwen2,
    /// `Qwen3ForCausalLM`.
    Qwen3,
    /// `LlamaForCausalLM` (Llama 2/3, DeepSeek-R1-Distill-Llama).
    Llama,
}

impl Architecture {
    /// The `architectures` names accepted in `config.json`.
    pub const SUPPORTED: &'static [&'static str] =
        &["Qwen2ForCausalLM", "Qwen3ForCausalLM", "LlamaForCausalLM"];

    /// Maps an `architectures` entry to an [`Architecture`].
    pub fn from_hf_name(name: &str) -> Option<Self> {
        match name {
            "Qwen2ForCausalLM" => Some(Self::Qwen2),
            "Qwen3ForCausalLM" => Some(Self::Qwen3),
            "LlamaForCausalLM" => Some(Self::Llama),
            _ => None,
        }
    }

    /// Maps a `model_type` to an [`Architecture`] (used when `architectures` is absent).
    pub fn from_model_type(model_type: &str) -> Option<Self> {
        match model_type {
            "qwen2" => Some(Self::Qwen2),
            "qwen3" => Some(Self::Qwen3),
            "llama" => Some(Self::Llama),
            _ => None,
        }
    }

    /// The transformers class name, as written in `architectures`.
    pub fn hf_name(self) -> &'static str {
        match self {
            Self::Qwen2 => "Qwen2ForCausalLM",
            Self::Qwen3 => "Qwen3ForCausalLM",
            Self::Llama => "LlamaForCausalLM",
        }
    }
}

impl std::fmt::Display for Architecture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.hf_name())
    }
}

/// RoPE frequency scaling (`rope_scaling` / `rope_parameters.rope_type`).
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE: `inv_freq[i] = theta^(-2i/head_dim)`.
    Default,
    /// Positions divided by `factor` (equivalently, frequencies divided by it).
    Linear {
        /// The scaling factor.
        factor: f64,
    },
    /// Llama 3.x frequency-dependent scaling.
    Llama3 {
        /// Overall factor for low frequencies.
        factor: f64,
        /// Wavelength boundary parameter for low frequencies.
        low_freq_factor: f64,
        /// Wavelength boundary parameter for high frequencies.
        high_freq_factor: f64,
        /// Context length the model was pretrained with.
        original_max_position_embeddings: usize,
    },
}

/// A decoder-only causal LM's configuration, from `config.json`.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    /// Which model file implements it.
    pub architecture: Architecture,
    /// Rows of the embedding and of `lm_head` (may exceed the tokenizer's size).
    pub vocab_size: usize,
    /// Residual stream width.
    pub hidden_size: usize,
    /// MLP inner width.
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (GQA when fewer than query heads).
    pub num_key_value_heads: usize,
    /// Per-head width (explicit `head_dim`, else `hidden_size / num_attention_heads`).
    pub head_dim: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base.
    pub rope_theta: f64,
    /// RoPE frequency scaling.
    pub rope_scaling: RopeScaling,
    /// Whether `lm_head` shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Biases on the attention projections (Qwen2: q/k/v always; Llama/Qwen3: q/k/v/o when set).
    pub attention_bias: bool,
    /// Biases on the MLP projections (Llama `mlp_bias`).
    pub mlp_bias: bool,
    /// Activation of the gated MLP (`silu`).
    pub hidden_act: String,
    /// Longest context the model was configured for.
    pub max_position_embeddings: usize,
    /// `bos_token_id`.
    pub bos_token_id: Option<u32>,
    /// First `eos_token_id` (see [`ModelConfig::eos_token_ids`] for all).
    pub eos_token_id: Option<u32>,
    /// Every `eos_token_id` (the field may be an int or a list).
    pub eos_token_ids: Vec<u32>,
    /// `pad_token_id`.
    pub pad_token_id: Option<u32>,
    /// `torch_dtype` (4.x) or `dtype` (5.x), e.g. `bfloat16`.
    pub torch_dtype: Option<String>,
    /// The original `config.json`, saved back as is.
    pub raw: Value,
}

impl ModelConfig {
    /// Reads and parses `config.json`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = fs_err::read_to_string(path).map_err(|e| {
            Error::model(format!(
                "cannot read model config `{}`: {e}",
                path.display()
            ))
        })?;
        let value: Value = serde_json::from_str(&text).map_err(|e| {
            Error::model(format!(
                "`{}`:{}:{}: invalid JSON: {e}",
                path.display(),
                e.line(),
                e.column()
            ))
        })?;
        Self::from_json(&value, path)
    }

    /// Parses a `config.json` value; `path` only labels errors.
    pub fn from_json(v: &Value, path: impl AsRef<Path>) -> Result<Self> {
        let f = Fields {
            v,
            path: path.as_ref(),
        };
        let obj = v
            .as_object()
            .ok_or_else(|| f.err("", "expected a JSON object"))?;
        let architecture = parse_architecture(&f)?;
        let hidden_size = f.req_usize("hidden_size")?;
        let num_attention_heads = f.req_usize("num_attention_heads")?;
        let num_key_value_heads = f
            .opt_usize("num_key_value_heads")?
            .unwrap_or(num_attention_heads);
        let head_dim = match f.opt_usize("head_dim")? {
            Some(d) => d,
            None => {
                if hidden_size % num_attention_heads != 0 {
                    return Err(f.err(
                        "hidden_size",
                        &format!(
                            "`hidden_size` {hidden_size} is not divisible by `num_attention_heads` {num_attention_heads} and no `head_dim` is given"
                        ),
                    ));
                }
                hidden_size / num_attention_heads
            }
        };
        if num_key_value_heads == 0 || num_attention_heads % num_key_value_heads != 0 {
            return Err(f.err(
                "num_key_value_heads",
                &format!(
                    "expected a divisor of `num_attention_heads` ({num_attention_heads}), got {num_key_value_heads}"
                ),
            ));
        }
        if head_dim % 2 != 0 {
            return Err(f.err(
                "head_dim",
                &format!("expected an even number, got {head_dim}"),
            ));
        }
        let rope_params = obj.get("rope_parameters").filter(|p| p.is_object());
        let rope_theta = match f.opt_f64("rope_theta")? {
            Some(t) => t,
            None => match rope_params.and_then(|p| p.get("rope_theta")) {
                Some(t) => t
                    .as_f64()
                    .ok_or_else(|| f.err("rope_parameters.rope_theta", "expected a number"))?,
                None => 10_000.0,
            },
        };
        let scaling_value = obj
            .get("rope_scaling")
            .filter(|s| !s.is_null())
            .map(|s| ("rope_scaling", s))
            .or_else(|| rope_params.map(|p| ("rope_parameters", p)));
        let rope_scaling = match scaling_value {
            None => RopeScaling::Default,
            Some((field, s)) => parse_rope_scaling(&f, field, s)?,
        };
        let hidden_act = match obj
            .get("hidden_act")
            .or_else(|| obj.get("hidden_activation"))
        {
            None | Some(Value::Null) => "silu".to_string(),
            Some(Value::String(s)) => s.clone(),
            Some(_) => return Err(f.err("hidden_act", "expected a string")),
        };
        if hidden_act != "silu" && hidden_act != "swish" {
            return Err(f.err(
                "hidden_act",
                &format!("unsupported activation `{hidden_act}` (supported: `silu`)"),
            ));
        }
        if f.opt_bool("use_sliding_window")? == Some(true) {
            return Err(f.err(
                "use_sliding_window",
                "sliding-window attention is not supported; set it to false for contexts up to `sliding_window`",
            ));
        }
        if let Some(types) = obj.get("layer_types").and_then(Value::as_array)
            && let Some(other) = types.iter().find(|t| t.as_str() != Some("full_attention"))
        {
            return Err(f.err(
                "layer_types",
                &format!("only `full_attention` layers are supported, found {other}"),
            ));
        }
        let eos_token_ids = f.id_list("eos_token_id")?;
        let default_max_pos = match architecture {
            Architecture::Llama => 2048,
            Architecture::Qwen2 | Architecture::Qwen3 => 32768,
        };
        Ok(Self {
            architecture,
            vocab_size: f.req_usize("vocab_size")?,
            hidden_size,
            intermediate_size: f.req_usize("intermediate_size")?,
            num_hidden_layers: f.req_usize("num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: f.opt_f64("rms_norm_eps")?.unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            // transformers' defaults for all three classes are untied.
            tie_word_embeddings: f.opt_bool("tie_word_embeddings")?.unwrap_or(false),
            attention_bias: match architecture {
                Architecture::Qwen2 => true,
                Architecture::Qwen3 | Architecture::Llama => {
                    f.opt_bool("attention_bias")?.unwrap_or(false)
                }
            },
            mlp_bias: f.opt_bool("mlp_bias")?.unwrap_or(false),
            hidden_act,
            max_position_embeddings: f
                .opt_usize("max_position_embeddings")?
                .unwrap_or(default_max_pos),
            bos_token_id: f.id_list("bos_token_id")?.first().copied(),
            eos_token_id: eos_token_ids.first().copied(),
            eos_token_ids,
            pad_token_id: f.id_list("pad_token_id")?.first().copied(),
            torch_dtype: obj
                .get("dtype")
                .or_else(|| obj.get("torch_dtype"))
                .and_then(Value::as_str)
                .map(str::to_string),
            raw: v.clone(),
        })
    }

    /// Number of query heads sharing one key/value head.
    pub fn kv_groups(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads
    }
}

fn parse_architecture(f: &Fields<'_>) -> Result<Architecture> {
    let supported = Architecture::SUPPORTED.join("`, `");
    match f.v.get("architectures") {
        Some(Value::Array(names)) => {
            let names: Vec<&str> = names.iter().filter_map(Value::as_str).collect();
            names
                .iter()
                .find_map(|n| Architecture::from_hf_name(n))
                .ok_or_else(|| {
                    f.err(
                        "architectures",
                        &format!(
                            "unsupported architecture `{}`; supported: `{supported}`",
                            names.join("`, `")
                        ),
                    )
                })
        }
        Some(Value::Null) | None => {
            let model_type = f.v.get("model_type").and_then(Value::as_str).unwrap_or("");
            Architecture::from_model_type(model_type).ok_or_else(|| {
                f.err(
                    "architectures",
                    &format!(
                        "missing, and `model_type` `{model_type}` is not supported; supported: `{supported}`"
                    ),
                )
            })
        }
        Some(_) => Err(f.err("architectures", "expected a list of strings")),
    }
}

fn parse_rope_scaling(f: &Fields<'_>, field: &str, s: &Value) -> Result<RopeScaling> {
    let kind = s
        .get("rope_type")
        .or_else(|| s.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let num = |key: &str| -> Result<f64> {
        s.get(key)
            .and_then(Value::as_f64)
            .ok_or_else(|| f.err(&format!("{field}.{key}"), "expected a number"))
    };
    match kind {
        "default" => Ok(RopeScaling::Default),
        "linear" => Ok(RopeScaling::Linear {
            factor: num("factor")?,
        }),
        "llama3" => Ok(RopeScaling::Llama3 {
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_max_position_embeddings: num("original_max_position_embeddings")? as usize,
        }),
        other => Err(f.err(
            &format!("{field}.rope_type"),
            &format!(
                "unsupported RoPE scaling `{other}` (supported: `default`, `linear`, `llama3`)"
            ),
        )),
    }
}

/// Typed field access with errors naming the file and field.
struct Fields<'a> {
    v: &'a Value,
    path: &'a Path,
}

impl Fields<'_> {
    fn err(&self, field: &str, msg: &str) -> Error {
        if field.is_empty() {
            Error::model(format!("`{}`: {msg}", self.path.display()))
        } else {
            Error::model(format!("`{}`: field `{field}`: {msg}", self.path.display()))
        }
    }

    fn get(&self, key: &str) -> Option<&Value> {
        self.v.get(key).filter(|x| !x.is_null())
    }

    fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        match self.get(key) {
            None => Ok(None),
            Some(x) => x
                .as_u64()
                .map(|n| Some(n as usize))
                .ok_or_else(|| self.err(key, &format!("expected a non-negative integer, got {x}"))),
        }
    }

    fn req_usize(&self, key: &str) -> Result<usize> {
        match self.opt_usize(key)? {
            Some(0) => Err(self.err(key, "expected a positive integer, got 0")),
            Some(n) => Ok(n),
            None => Err(self.err(key, "missing (expected a positive integer)")),
        }
    }

    fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(x) => x
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.err(key, &format!("expected a number, got {x}"))),
        }
    }

    fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(x) => x
                .as_bool()
                .map(Some)
                .ok_or_else(|| self.err(key, &format!("expected true or false, got {x}"))),
        }
    }

    /// A token id field that may be an int or a list of ints.
    fn id_list(&self, key: &str) -> Result<Vec<u32>> {
        id_list(self.get(key))
            .ok_or_else(|| self.err(key, "expected a token id or a list of token ids"))
    }
}

fn id_list(v: Option<&Value>) -> Option<Vec<u32>> {
    match v {
        None | Some(Value::Null) => Some(Vec::new()),
        Some(Value::Number(n)) => n
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .map(|n| vec![n]),
        Some(Value::Array(xs)) => xs
            .iter()
            .map(|x| x.as_u64().and_then(|n| u32::try_from(n).ok()))
            .collect(),
        Some(_) => None,
    }
}

/// Decoding defaults from `generation_config.json`.
#[derive(Debug, Clone, Default)]
pub struct GenerationConfig {
    /// Every id that ends a generation (from `generation_config.json`, else `config.json`).
    pub eos_token_ids: Vec<u32>,
    /// `bos_token_id`.
    pub bos_token_id: Option<u32>,
    /// `pad_token_id` (from `generation_config.json`, else `config.json`).
    pub pad_token_id: Option<u32>,
    /// `do_sample`.
    pub do_sample: bool,
    /// `temperature` when sampling.
    pub temperature: Option<f64>,
    /// `top_p` when sampling.
    pub top_p: Option<f64>,
    /// `top_k` when sampling.
    pub top_k: Option<usize>,
    /// `max_new_tokens`, when the file sets it.
    pub max_new_tokens: Option<usize>,
    /// The file it came from, when there was one.
    pub path: Option<PathBuf>,
}

impl GenerationConfig {
    /// Reads `dir/generation_config.json` if present, falling back to `config`'s ids.
    pub fn from_dir(dir: &Path, config: &ModelConfig) -> Result<Self> {
        let path = dir.join("generation_config.json");
        let mut out = Self {
            eos_token_ids: config.eos_token_ids.clone(),
            bos_token_id: config.bos_token_id,
            pad_token_id: config.pad_token_id,
            ..Self::default()
        };
        if !path.is_file() {
            return Ok(out);
        }
        let text = fs_err::read_to_string(&path)?;
        let v: Value = serde_json::from_str(&text).map_err(|e| {
            Error::model(format!(
                "`{}`:{}:{}: invalid JSON: {e}",
                path.display(),
                e.line(),
                e.column()
            ))
        })?;
        let f = Fields { v: &v, path: &path };
        let eos = f.id_list("eos_token_id")?;
        if !eos.is_empty() {
            out.eos_token_ids = eos;
        }
        if let Some(b) = f.id_list("bos_token_id")?.first() {
            out.bos_token_id = Some(*b);
        }
        if let Some(p) = f.id_list("pad_token_id")?.first() {
            out.pad_token_id = Some(*p);
        }
        out.do_sample = f.opt_bool("do_sample")?.unwrap_or(false);
        out.temperature = f.opt_f64("temperature")?;
        out.top_p = f.opt_f64("top_p")?;
        out.top_k = f.opt_usize("top_k")?;
        out.max_new_tokens = f.opt_usize("max_new_tokens")?;
        out.path = Some(path);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn base() -> Value {
        json!({"architectures": ["LlamaForCausalLM"], "vocab_size": 32, "hidden_size": 16,
               "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4})
    }

    #[test]
    fn defaults_and_layouts() {
        let c = ModelConfig::from_json(&base(), "c.json").expect("parses");
        assert_eq!(c.head_dim, 4);
        assert_eq!(c.num_key_value_heads, 4);
        assert!((c.rope_theta - 10_000.0).abs() < 1e-9);
        assert!(!c.tie_word_embeddings);
        let mut v = base();
        v["rope_parameters"] = json!({"rope_theta": 5e5, "rope_type": "default"});
        v["eos_token_id"] = json!([3, 4]);
        let c = ModelConfig::from_json(&v, "c.json").expect("parses");
        assert!((c.rope_theta - 5e5).abs() < 1e-9);
        assert_eq!(c.eos_token_ids, vec![3, 4]);
        assert_eq!(c.eos_token_id, Some(3));
    }

    #[test]
    fn errors_name_file_and_field() {
        let mut v = base();
        v["architectures"] = json!(["GPT2LMHeadModel"]);
        let e = ModelConfig::from_json(&v, "dir/config.json")
            .expect_err("unsupported")
            .to_string();
        assert!(
            e.contains("GPT2LMHeadModel") && e.contains("Qwen2ForCausalLM"),
            "{e}"
        );
        assert!(e.contains("dir/config.json"), "{e}");
        let mut v = base();
        v["hidden_size"] = json!("big");
        let e = ModelConfig::from_json(&v, "c.json")
            .expect_err("bad")
            .to_string();
        assert!(e.contains("`hidden_size`"), "{e}");
        let mut v = base();
        v["rope_scaling"] = json!({"rope_type": "yarn", "factor": 4.0});
        let e = ModelConfig::from_json(&v, "c.json")
            .expect_err("yarn")
            .to_string();
        assert!(e.contains("yarn"), "{e}");
    }
}
