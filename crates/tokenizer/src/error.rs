//! What can go wrong loading a tokenizer or tokenizing a prompt.

/// Why a tokenizer, a template or a prompt could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenizerError {
    /// A file could not be read.
    #[error("cannot read {path}: {reason}")]
    Read {
        /// The file.
        path: String,
        /// The operating system's reason.
        reason: String,
    },
    /// `tokenizer.json` is not a tokenizer this build can load.
    #[error("not a usable tokenizer.json: {0}")]
    Tokenizer(String),
    /// `tokenizer_config.json` is not JSON of the expected shape.
    #[error("not a usable tokenizer_config.json: {0}")]
    Config(String),
    /// The chat template does not compile.
    #[error("the chat template does not compile: {0}")]
    Template(String),
    /// The chat template refused or failed to render a conversation.
    #[error("the chat template failed on this conversation: {0}")]
    Render(String),
    /// The tokenizer failed on a text.
    #[error("tokenization failed: {0}")]
    Encode(String),
    /// A chat request came in and no chat template is known for the model.
    #[error("no chat template: give tokenizerConfigFile (with chat_template) or chatTemplateFile")]
    NoChatTemplate,
}

/// Reads a file to a string, naming it in the error.
pub(crate) fn read_file(path: &std::path::Path) -> Result<String, TokenizerError> {
    std::fs::read_to_string(path).map_err(|error| TokenizerError::Read {
        path: path.display().to_string(),
        reason: error.to_string(),
    })
}
