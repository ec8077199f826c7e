//! A model's tokenizer and chat template together: prompt text or a conversation in, the
//! token ids the engine computes out.

use std::path::Path;

use crate::config::TokenizerConfig;
use crate::error::{TokenizerError, read_file};
use crate::pieces::{DEFAULT_CACHED_TOKENS, PieceEncoder, encode_into};
use crate::template::{ChatMessage, ChatTemplate};

/// Where a [`PromptTokenizer`] is loaded from: the files a model repository ships.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TokenizerFiles<'a> {
    /// `tokenizer.json` (required).
    pub tokenizer: Option<&'a Path>,
    /// `tokenizer_config.json`: the chat template and the special tokens.
    pub tokenizer_config: Option<&'a Path>,
    /// A Jinja chat template that replaces the config's (vLLM's `--chat-template`, or the
    /// `chat_template.jinja` newer repositories ship beside the config).
    pub chat_template: Option<&'a Path>,
}

/// Tokenizes prompts as the engine does: a completion's text with the tokenizer's special
/// tokens added (vLLM's default for `/v1/completions`), a conversation rendered by the chat
/// template and then tokenized without adding them (the template writes them).
///
/// A conversation's pieces between added tokens (each message, in the common templates) are
/// remembered, bounded, so that the next turn of a conversation tokenizes only what is new.
pub struct PromptTokenizer {
    tokenizer: tokenizers::Tokenizer,
    template: Option<ChatTemplate>,
    pieces: Option<PieceEncoder>,
}

impl std::fmt::Debug for PromptTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PromptTokenizer")
            .field("vocabulary", &self.tokenizer.get_vocab_size(true))
            .field("chat_template", &self.template.is_some())
            .finish()
    }
}

impl PromptTokenizer {
    /// Loads the files of a model repository.
    pub fn from_files(files: &TokenizerFiles<'_>) -> Result<Self, TokenizerError> {
        let Some(tokenizer) = files.tokenizer else {
            return Err(TokenizerError::Tokenizer("no tokenizer.json given".to_owned()));
        };
        let tokenizer_json = read_file(tokenizer)?;
        let config = files
            .tokenizer_config
            .map(|path| TokenizerConfig::from_json(&read_file(path)?))
            .transpose()?
            .unwrap_or_default();
        let template = files.chat_template.map(read_file).transpose()?;
        Self::from_parts(&tokenizer_json, &config, template.as_deref())
    }

    /// Builds from the text of a `tokenizer.json`, a parsed config and an optional template
    /// that replaces the config's.
    pub fn from_parts(
        tokenizer_json: &str,
        config: &TokenizerConfig,
        chat_template: Option<&str>,
    ) -> Result<Self, TokenizerError> {
        let mut tokenizer: tokenizers::Tokenizer = tokenizer_json
            .parse()
            .map_err(|error: tokenizers::Error| TokenizerError::Tokenizer(error.to_string()))?;
        // A tokenizer.json may carry truncation or padding settings; the engine tokenizes
        // prompts whole and unpadded (transformers turns both off unless a call asks).
        tokenizer
            .with_truncation(None)
            .map_err(|error| TokenizerError::Tokenizer(error.to_string()))?;
        tokenizer.with_padding(None);
        let template = chat_template
            .or(config.chat_template.as_deref())
            .map(|source| ChatTemplate::new(source, &config.bos_token, &config.eos_token))
            .transpose()?;
        let pieces = PieceEncoder::new(&tokenizer, DEFAULT_CACHED_TOKENS);
        Ok(Self { tokenizer, template, pieces })
    }

    /// Sets how many tokens of conversation pieces are remembered (default 4 Mi tokens,
    /// 16 MiB); zero tokenizes every conversation whole.
    pub fn with_piece_cache_tokens(mut self, tokens: usize) -> Self {
        self.pieces = if tokens == 0 { None } else { PieceEncoder::new(&self.tokenizer, tokens) };
        self
    }

    /// Whether conversations are tokenized piece by piece with a cache (the tokenizer's added
    /// tokens allow it).
    pub fn caches_pieces(&self) -> bool {
        self.pieces.is_some()
    }

    /// Whether conversations can be rendered.
    pub fn has_chat_template(&self) -> bool {
        self.template.is_some()
    }

    /// The number of token ids the tokenizer knows, added tokens included.
    pub fn vocabulary_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    /// The token ids of a completion prompt, the tokenizer's special tokens added; `out` is
    /// cleared first.
    pub fn encode_text(&self, text: &str, out: &mut Vec<u32>) -> Result<(), TokenizerError> {
        out.clear();
        encode_into(&self.tokenizer, text, true, out)
    }

    /// The token ids of a conversation, rendered by the chat template with the assistant's
    /// turn opened; `out` is cleared first.
    pub fn encode_chat(
        &self,
        messages: &[ChatMessage<'_>],
        out: &mut Vec<u32>,
    ) -> Result<(), TokenizerError> {
        let template = self.template.as_ref().ok_or(TokenizerError::NoChatTemplate)?;
        let text = template.render(messages)?;
        out.clear();
        // The template writes the special tokens: none are added.
        match &self.pieces {
            Some(pieces) => pieces.encode(&self.tokenizer, &text, out),
            None => encode_into(&self.tokenizer, &text, false, out),
        }
    }

    /// The text the chat template renders for `messages` (what [`Self::encode_chat`]
    /// tokenizes).
    pub fn render_chat(&self, messages: &[ChatMessage<'_>]) -> Result<String, TokenizerError> {
        self.template.as_ref().ok_or(TokenizerError::NoChatTemplate)?.render(messages)
    }
}
