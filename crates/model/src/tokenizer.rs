//! The model's tokenizer: [`Tokenizer`] wraps `tokenizers` (from `tokenizer.json`) together with
//! the special tokens of `tokenizer_config.json` and the [`ChatTemplate`].

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::chat_template::ChatTemplate;
use crate::error::{Error, Result};

/// A tokenizer with its special tokens and chat template.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
    bos_token: Option<String>,
    eos_token: Option<String>,
    pad_token: Option<String>,
    unk_token: Option<String>,
    chat_template: Option<ChatTemplate>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("path", &self.path)
            .field("vocab_size", &self.vocab_size())
            .field("eos_token", &self.eos_token)
            .field("has_chat_template", &self.chat_template.is_some())
            .finish()
    }
}

impl Tokenizer {
    /// Loads `dir/tokenizer.json`, `dir/tokenizer_config.json` (optional) and the chat template
    /// (`chat_template` in `tokenizer_config.json`, else `dir/chat_template.jinja`).
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            return Err(Error::Tokenizer(format!(
                "missing `tokenizer.json` in `{}`",
                dir.display()
            )));
        }
        let mut tok = Self::from_file(&path)?;
        let config_path = dir.join("tokenizer_config.json");
        let config = if config_path.is_file() {
            let text = fs_err::read_to_string(&config_path)?;
            serde_json::from_str::<Value>(&text).map_err(|e| {
                Error::Tokenizer(format!(
                    "`{}`:{}:{}: invalid JSON: {e}",
                    config_path.display(),
                    e.line(),
                    e.column()
                ))
            })?
        } else {
            Value::Null
        };
        tok.bos_token = special_token(&config, "bos_token");
        tok.eos_token = special_token(&config, "eos_token");
        tok.pad_token = special_token(&config, "pad_token");
        tok.unk_token = special_token(&config, "unk_token");
        let source = match ChatTemplate::source_from_config(&config, &config_path)? {
            Some(s) => Some(s),
            None => {
                let jinja = dir.join("chat_template.jinja");
                if jinja.is_file() {
                    Some(fs_err::read_to_string(&jinja)?)
                } else {
                    None
                }
            }
        };
        if let Some(source) = source {
            tok.chat_template = Some(ChatTemplate::new(
                source,
                tok.bos_token.clone(),
                tok.eos_token.clone(),
            )?);
        }
        Ok(tok)
    }

    /// Loads a bare `tokenizer.json` (no special-token names, no chat template).
    pub fn from_file(path: &Path) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_file(path).map_err(|e| {
            Error::Tokenizer(format!("cannot load tokenizer `{}`: {e}", path.display()))
        })?;
        Ok(Self {
            inner,
            path: path.to_path_buf(),
            bos_token: None,
            eos_token: None,
            pad_token: None,
            unk_token: None,
            chat_template: None,
        })
    }

    /// Token ids of `text`; `add_special` applies the post-processor (BOS etc. where configured).
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, add_special)
            .map_err(|e| Error::Tokenizer(format!("cannot encode text: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Token strings of `text` (as the BPE vocabulary spells them).
    pub fn tokenize(&self, text: &str, add_special: bool) -> Result<Vec<String>> {
        let enc = self
            .inner
            .encode(text, add_special)
            .map_err(|e| Error::Tokenizer(format!("cannot encode text: {e}")))?;
        Ok(enc.get_tokens().to_vec())
    }

    /// Text of `ids`; `skip_special` drops special tokens (EOS, chat markers).
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| Error::Tokenizer(format!("cannot decode ids: {e}")))
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Id of a token string (including added tokens).
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Token string of an id.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// `bos_token` from `tokenizer_config.json`.
    pub fn bos_token(&self) -> Option<&str> {
        self.bos_token.as_deref()
    }

    /// `eos_token` from `tokenizer_config.json`.
    pub fn eos_token(&self) -> Option<&str> {
        self.eos_token.as_deref()
    }

    /// `pad_token` from `tokenizer_config.json`.
    pub fn pad_token(&self) -> Option<&str> {
        self.pad_token.as_deref()
    }

    /// `unk_token` from `tokenizer_config.json`.
    pub fn unk_token(&self) -> Option<&str> {
        self.unk_token.as_deref()
    }

    /// Id of `eos_token`.
    pub fn eos_token_id(&self) -> Option<u32> {
        self.eos_token.as_deref().and_then(|t| self.token_to_id(t))
    }

    /// Id of `pad_token`.
    pub fn pad_token_id(&self) -> Option<u32> {
        self.pad_token.as_deref().and_then(|t| self.token_to_id(t))
    }

    /// Id of `bos_token`.
    pub fn bos_token_id(&self) -> Option<u32> {
        self.bos_token.as_deref().and_then(|t| self.token_to_id(t))
    }

    /// The chat template, when the folder has one.
    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.chat_template.as_ref()
    }

    /// Replaces the chat template (e.g. from a user-supplied file).
    pub fn set_chat_template(&mut self, source: String) -> Result<()> {
        self.chat_template = Some(ChatTemplate::new(
            source,
            self.bos_token.clone(),
            self.eos_token.clone(),
        )?);
        Ok(())
    }

    /// Renders `messages` (`{"role", "content", ...}` objects) with the chat template.
    pub fn apply_chat_template(
        &self,
        messages: &[Value],
        add_generation_prompt: bool,
    ) -> Result<String> {
        self.template()?.render(messages, add_generation_prompt)
    }

    /// Renders `messages` with extra template variables (`enable_thinking`, `tools`, ...), as
    /// transformers' `apply_chat_template(..., **kwargs)` does.
    pub fn apply_chat_template_with(
        &self,
        messages: &[Value],
        add_generation_prompt: bool,
        kwargs: &serde_json::Map<String, Value>,
    ) -> Result<String> {
        self.template()?
            .render_with(messages, add_generation_prompt, kwargs)
    }

    /// Renders `messages` and encodes the result without adding special tokens (the template
    /// writes BOS itself where the model wants one), as transformers'
    /// `apply_chat_template(tokenize=True)` does.
    pub fn encode_chat(&self, messages: &[Value], add_generation_prompt: bool) -> Result<Vec<u32>> {
        let text = self.apply_chat_template(messages, add_generation_prompt)?;
        self.encode(&text, false)
    }

    /// Renders `(role, content)` pairs with the chat template.
    pub fn apply_chat_template_pairs(
        &self,
        messages: &[(&str, &str)],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let messages: Vec<Value> = messages
            .iter()
            .map(|(role, content)| serde_json::json!({"role": role, "content": content}))
            .collect();
        self.apply_chat_template(&messages, add_generation_prompt)
    }

    /// The underlying `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// The `tokenizer.json` it was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn template(&self) -> Result<&ChatTemplate> {
        self.chat_template.as_ref().ok_or_else(|| {
            Error::Template(format!(
                "no chat template: neither `chat_template` in `tokenizer_config.json` nor `chat_template.jinja` next to `{}`",
                self.path.display()
            ))
        })
    }
}

/// A special token from `tokenizer_config.json`: a string or an `AddedToken` object.
fn special_token(config: &Value, key: &str) -> Option<String> {
    match config.get(key)? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}
