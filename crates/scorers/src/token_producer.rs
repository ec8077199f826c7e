//! `token-producer` (llm-d's name; `tokenizer` is its older alias): the request's prompt as
//! the engine's token ids, for the plugins that key on tokens (the precise prefix producer).
//!
//! With `tokenizerFile` (the model's `tokenizer.json`) and this crate's `tokenizers` cargo
//! feature, prompts are tokenized in process by `epp-tokenizer`: a chat request is rendered by
//! the model's chat template (`tokenizerConfigFile`'s `chat_template`, or `chatTemplateFile`)
//! and tokenized as vLLM does it; a completion's text is tokenized with the tokenizer's special
//! tokens. A prompt that came pre-tokenized keeps its ids. Requests of the other APIs
//! (responses, conversations, embeddings) and requests with images or audio are not
//! tokenized, since the engine builds their prompts in ways not reproduced here.
//!
//! llm-d's other backends are accepted so that its configs load, and documented as what they
//! become here: `vllm` (a render call to a vLLM server per request) and `udsTokenizerConfig`
//! (a tokenizer sidecar) are not called; `estimate` (llm-d's default) invents token ids
//! that no engine reports. In all three cases no ids are produced, and the consumers use
//! their documented approximation (the precise producer matches text requests against its
//! approximate index), which is what those ids would have been worth to the precise index.
//!
//! When a request cannot be tokenized (a template that refuses the conversation, a chat
//! request and no template), the same fallback applies and the failure is counted.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

#[cfg(feature = "tokenizers")]
use scheduler_core::ApiKind;
use scheduler_core::{
    CycleState, DataProducer, InferenceRequest, Plugin, PluginError, PluginSpec, PoolSnapshot,
};
use serde::Deserialize;
use serde::de::IgnoredAny;

/// llm-d type name.
pub const TYPE_NAME: &str = "token-producer";
/// llm-d's older alias.
pub const LEGACY_TYPE_NAME: &str = "tokenizer";

/// What a build without the `tokenizers` feature says about `tokenizerFile`.
pub const FEATURE_MISSING: &str = "in-process tokenization (tokenizerFile) is not built into \
     this binary: rebuild epp with `--features tokenizers`";

/// Parameters, with llm-d's names and this project's `tokenizerFile`, `tokenizerConfigFile`
/// and `chatTemplateFile`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TokenProducerParameters {
    /// The model whose tokenizer this is (llm-d's render requests name it).
    #[serde(default)]
    pub model_name: Option<String>,
    /// The model's `tokenizer.json`.
    #[serde(default)]
    pub tokenizer_file: Option<String>,
    /// The model's `tokenizer_config.json` (its chat template and special tokens).
    #[serde(default)]
    pub tokenizer_config_file: Option<String>,
    /// A Jinja chat template replacing the config's (vLLM's `--chat-template`).
    #[serde(default)]
    pub chat_template_file: Option<String>,
    /// llm-d's vLLM render backend (`url`, `timeout`, `mmTimeout`): accepted, not called.
    #[serde(default)]
    pub vllm: Option<IgnoredAny>,
    /// llm-d's deprecated tokenizer sidecar: accepted, not called.
    #[serde(default)]
    pub uds_tokenizer_config: Option<IgnoredAny>,
    /// llm-d's estimating backend's tuning: accepted; no ids are invented.
    #[serde(default)]
    pub estimate: Option<IgnoredAny>,
}

/// The token ids a [`TokenProducer`] made for the current decision, kept in its scratch.
#[derive(Debug, Default)]
pub struct TokenizedPrompt {
    /// The decision `tokens` belong to, when they were made.
    decision: Option<u64>,
    /// Whether the prompt could be tokenized.
    ok: bool,
    tokens: Vec<u32>,
}

impl TokenizedPrompt {
    /// The ids made for this decision, if the prompt was tokenized.
    pub fn of_decision(state: &mut CycleState) -> Option<&[u32]> {
        let stamp = state.decision_stamp();
        let slot = state.scratch::<TokenizedPrompt>();
        (slot.decision == Some(stamp) && slot.ok).then_some(slot.tokens.as_slice())
    }
}

/// The request's prompt length in tokens: the count the config's `token-producer` made for
/// this decision when it tokenized the prompt, else the estimate from its characters
/// ([`InferenceRequest::estimated_prompt_tokens`]).
pub fn prompt_tokens(state: &mut CycleState, request: &InferenceRequest) -> u64 {
    match TokenizedPrompt::of_decision(state) {
        Some(tokens) => tokens.len() as u64,
        None => request.estimated_prompt_tokens(),
    }
}

/// Counts of what the producer did, for the metrics page.
#[derive(Debug, Default)]
pub struct TokenProducerStats {
    /// Prompts tokenized (pre-tokenized ones included).
    pub tokenized: AtomicU64,
    /// Prompts that could not be: the consumers used their approximation.
    pub failed: AtomicU64,
}

/// How prompts become ids.
enum Backend {
    /// No ids: consumers use their approximation.
    None,
    /// The model's tokenizer, in process.
    #[cfg(feature = "tokenizers")]
    Local(Box<tokenizer::PromptTokenizer>),
}

/// `token-producer`: tokenizes each request once per decision.
pub struct TokenProducer {
    backend: Backend,
    stats: TokenProducerStats,
}

impl std::fmt::Debug for TokenProducer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let backend = match &self.backend {
            Backend::None => "none",
            #[cfg(feature = "tokenizers")]
            Backend::Local(_) => "tokenizer.json",
        };
        f.debug_struct("TokenProducer").field("backend", &backend).finish()
    }
}

impl TokenProducer {
    /// A producer that makes no ids (llm-d's `estimate`, `vllm` and sidecar backends here).
    pub fn without_tokenizer() -> Self {
        Self { backend: Backend::None, stats: TokenProducerStats::default() }
    }

    /// A producer over a loaded tokenizer.
    #[cfg(feature = "tokenizers")]
    pub fn with_tokenizer(tokenizer: tokenizer::PromptTokenizer) -> Self {
        Self { backend: Backend::Local(Box::new(tokenizer)), stats: TokenProducerStats::default() }
    }

    /// Builds the producer `parameters` describe (loading the tokenizer files).
    pub fn from_parameters(parameters: &TokenProducerParameters) -> Result<Self, PluginError> {
        let wants_files = parameters.tokenizer_file.is_some()
            || parameters.tokenizer_config_file.is_some()
            || parameters.chat_template_file.is_some();
        if !wants_files {
            if parameters.vllm.is_some() || parameters.uds_tokenizer_config.is_some() {
                tracing::warn!(
                    "token-producer: the vllm render and tokenizer-sidecar backends are not \
                     called by this EPP; give tokenizerFile (and tokenizerConfigFile) to \
                     tokenize in process. Until then text requests are matched approximately"
                );
            }
            return Ok(Self::without_tokenizer());
        }
        if parameters.tokenizer_file.is_none() {
            return Err(PluginError::InvalidParameters(
                "tokenizerConfigFile and chatTemplateFile need tokenizerFile".to_owned(),
            ));
        }
        Self::load(parameters)
    }

    #[cfg(feature = "tokenizers")]
    fn load(parameters: &TokenProducerParameters) -> Result<Self, PluginError> {
        use std::path::Path;
        let files = tokenizer::TokenizerFiles {
            tokenizer: parameters.tokenizer_file.as_deref().map(Path::new),
            tokenizer_config: parameters.tokenizer_config_file.as_deref().map(Path::new),
            chat_template: parameters.chat_template_file.as_deref().map(Path::new),
        };
        let tokenizer = tokenizer::PromptTokenizer::from_files(&files)
            .map_err(|error| PluginError::InvalidParameters(error.to_string()))?;
        if !tokenizer.has_chat_template() {
            tracing::warn!(
                "token-producer: no chat template (give tokenizerConfigFile or \
                 chatTemplateFile); chat requests are matched approximately"
            );
        }
        Ok(Self::with_tokenizer(tokenizer))
    }

    #[cfg(not(feature = "tokenizers"))]
    fn load(_: &TokenProducerParameters) -> Result<Self, PluginError> {
        Err(PluginError::Unavailable(FEATURE_MISSING.to_owned()))
    }

    /// Whether this producer makes ids for text prompts.
    pub fn tokenizes_text(&self) -> bool {
        !matches!(self.backend, Backend::None)
    }

    /// What the producer has done so far.
    pub fn stats(&self) -> &TokenProducerStats {
        &self.stats
    }

    /// Tokenizes `request` for this decision unless that is done already, and gives the ids
    /// (none when the backend makes none or the prompt could not be tokenized).
    pub fn tokens<'s>(
        &self,
        state: &'s mut CycleState,
        request: &InferenceRequest,
    ) -> Option<&'s [u32]> {
        let stamp = state.decision_stamp();
        let slot = state.scratch::<TokenizedPrompt>();
        if slot.decision != Some(stamp) {
            slot.decision = Some(stamp);
            slot.ok = self.tokenize(request, &mut slot.tokens);
            let counter = if slot.ok { &self.stats.tokenized } else { &self.stats.failed };
            if slot.ok || self.tokenizes_text() {
                counter.fetch_add(1, Ordering::Relaxed);
            }
        }
        slot.ok.then_some(slot.tokens.as_slice())
    }

    /// Without the feature, only the backend that makes no ids exists.
    #[cfg(not(feature = "tokenizers"))]
    fn tokenize(&self, _: &InferenceRequest, _: &mut [u32]) -> bool {
        false
    }

    #[cfg(feature = "tokenizers")]
    fn tokenize(&self, request: &InferenceRequest, out: &mut Vec<u32>) -> bool {
        match &self.backend {
            Backend::None => false,
            Backend::Local(tokenizer) => {
                if token_ids_of(&request.prompt, out) {
                    return true;
                }
                // The engine renders images and audio into tokens of its own, and builds the
                // prompts of the other APIs (responses, conversations, embeddings) in ways not
                // reproduced here: such prompts' ids are not known.
                let chat = match request.api {
                    _ if request.multimodal => return false,
                    ApiKind::Completions => false,
                    ApiKind::ChatCompletions | ApiKind::AnthropicMessages => true,
                    _ => return false,
                };
                let mut encode = || {
                    if !chat {
                        return tokenizer.encode_text(&request.prompt, out);
                    }
                    let messages: Vec<tokenizer::ChatMessage<'_>> = request
                        .chat_messages()
                        .map(|(role, content)| tokenizer::ChatMessage { role, content })
                        .collect();
                    if messages.is_empty() || messages.len() != request.message_ends.len() {
                        return Err(tokenizer::TokenizerError::Render(
                            "the conversation could not be read back".to_owned(),
                        ));
                    }
                    tokenizer.encode_chat(&messages, out)
                };
                let result = if request.prompt.len() >= LONG_PROMPT_BYTES {
                    off_the_runtime(encode)
                } else {
                    encode()
                };
                match result {
                    Ok(()) => !out.is_empty(),
                    Err(error) => {
                        tracing::debug!(request_id = %request.request_id.escape_debug(), %error, "token-producer: not tokenized");
                        false
                    }
                }
            }
        }
    }
}

/// Prompts at least this long (about 4,000 tokens, milliseconds to tokenize when no piece of
/// them was seen before) are tokenized off the async runtime's worker.
#[cfg(feature = "tokenizers")]
const LONG_PROMPT_BYTES: usize = 16 * 1024;

/// Runs `work`, telling a multi-threaded tokio runtime first that this worker will block for a
/// while (`block_in_place`), so that the other requests queued on it move to another thread
/// instead of waiting for this tokenization; on any other thread it just runs.
///
/// At most one such tokenization per core runs this way at a time: each hands its worker's
/// other tasks to a new thread, and past the cores that would only add threads, not capacity.
/// The ones beyond run in place.
#[cfg(feature = "tokenizers")]
fn off_the_runtime<T>(work: impl FnOnce() -> T) -> T {
    use std::sync::LazyLock;
    use tokio::runtime::{Handle, RuntimeFlavor};
    static IN_PLACE: AtomicU64 = AtomicU64::new(0);
    static CORES: LazyLock<u64> =
        LazyLock::new(|| std::thread::available_parallelism().map_or(1, |n| n.get() as u64));
    let multi_threaded = Handle::try_current()
        .is_ok_and(|handle| handle.runtime_flavor() == RuntimeFlavor::MultiThread);
    if !multi_threaded {
        return work();
    }
    if IN_PLACE.fetch_add(1, Ordering::AcqRel) >= *CORES {
        IN_PLACE.fetch_sub(1, Ordering::AcqRel);
        return work();
    }
    /// Gives the slot back even if the work panics.
    struct Slot;
    impl Drop for Slot {
        fn drop(&mut self) {
            IN_PLACE.fetch_sub(1, Ordering::AcqRel);
        }
    }
    let _slot = Slot;
    tokio::task::block_in_place(work)
}

impl DataProducer for TokenProducer {
    fn produce(&self, state: &mut CycleState, request: &InferenceRequest, _: &PoolSnapshot) {
        let _ = self.tokens(state, request);
    }
}

/// The token producer among a config's plugins, for a consumer to bind to.
pub fn find(plugins: &scheduler_core::ConstructedPlugins) -> Option<Arc<TokenProducer>> {
    plugins
        .iter()
        .find_map(|constructed| constructed.plugin.shared.clone()?.downcast::<TokenProducer>().ok())
}

/// `token-producer` / `tokenizer`.
pub(crate) fn construct(spec: &PluginSpec<'_>) -> Result<Plugin, PluginError> {
    let parameters: TokenProducerParameters = spec.parameters()?;
    let producer = Arc::new(TokenProducer::from_parameters(&parameters)?);
    Ok(Plugin {
        data_producer: Some(producer.clone()),
        shared: Some(producer),
        ..Plugin::default()
    })
}

/// The token ids of a pre-tokenized prompt: the request parser writes each token id of a
/// `token_ids`/`input_ids`/token-array prompt as its decimal form and a space, so a prompt
/// made only of such words is read back as token ids. Clears `out`; false for any other
/// prompt (or a token id beyond `u32`).
pub fn token_ids_of(prompt: &str, out: &mut Vec<u32>) -> bool {
    out.clear();
    if prompt.is_empty() || !prompt.ends_with(' ') {
        return false;
    }
    for word in prompt[..prompt.len() - 1].split(' ') {
        if word.is_empty() || !word.bytes().all(|b| b.is_ascii_digit()) {
            return false;
        }
        match word.parse::<u32>() {
            Ok(token) => out.push(token),
            Err(_) => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec_of(value: &serde_json::Value) -> Result<Plugin, PluginError> {
        construct(&PluginSpec { parameters: Some(value), ..PluginSpec::of_type(TYPE_NAME) })
    }

    #[test]
    fn llm_d_backends_load_and_make_no_ids() {
        for parameters in [
            serde_json::json!({"modelName": "m", "vllm": {"url": "http://localhost:8000", "timeout": "5s"}}),
            serde_json::json!({"modelName": "m", "udsTokenizerConfig": {"socketFile": "/tmp/t.sock"}}),
            serde_json::json!({"estimate": {"image": {"mode": "static"}}}),
            serde_json::json!(null),
        ] {
            let plugin = spec_of(&parameters).unwrap();
            let producer = plugin.shared.clone().unwrap().downcast::<TokenProducer>().unwrap();
            assert!(!producer.tokenizes_text(), "{parameters}");
            let mut state = CycleState::new(std::time::Instant::now(), 1);
            let request = InferenceRequest::new("m", "some text");
            assert_eq!(producer.tokens(&mut state, &request), None);
            assert_eq!(producer.stats().failed.load(Ordering::Relaxed), 0);
        }
    }

    #[test]
    fn bad_parameters_are_named() {
        let error = spec_of(&serde_json::json!({"tokenizerFlie": "x"})).unwrap_err();
        assert!(error.to_string().contains("tokenizerFlie"), "{error}");
        let error = spec_of(&serde_json::json!({"tokenizerConfigFile": "c.json"})).unwrap_err();
        assert!(error.to_string().contains("need tokenizerFile"), "{error}");
    }

    #[cfg(not(feature = "tokenizers"))]
    #[test]
    fn a_tokenizer_file_needs_the_feature() {
        let error = spec_of(&serde_json::json!({"tokenizerFile": "tokenizer.json"})).unwrap_err();
        assert_eq!(error, PluginError::Unavailable(FEATURE_MISSING.to_owned()));
    }

    #[cfg(feature = "tokenizers")]
    #[test]
    fn long_prompts_are_tokenized_on_any_runtime_and_off_one() {
        let fixtures = concat!(env!("CARGO_MANIFEST_DIR"), "/../tokenizer/fixtures");
        let plugin = spec_of(&serde_json::json!({
            "tokenizerFile": format!("{fixtures}/tokenizer.json"),
            "tokenizerConfigFile": format!("{fixtures}/chatml.json"),
        }))
        .unwrap();
        let producer = plugin.shared.clone().unwrap().downcast::<TokenProducer>().unwrap();
        let prompt = "a long prompt about prefix caches, ".repeat(LONG_PROMPT_BYTES / 30);
        assert!(prompt.len() >= LONG_PROMPT_BYTES);
        let request = InferenceRequest::new("m", prompt);
        let tokenize = |seed: u64| {
            let mut state = CycleState::new(std::time::Instant::now(), seed);
            producer.tokens(&mut state, &request).map(<[u32]>::len)
        };
        let plain = tokenize(1).expect("tokenized");
        let multi = tokio::runtime::Builder::new_multi_thread().worker_threads(2).build().unwrap();
        assert_eq!(multi.block_on(async { tokenize(2) }), Some(plain));
        let current = tokio::runtime::Builder::new_current_thread().build().unwrap();
        assert_eq!(current.block_on(async { tokenize(3) }), Some(plain));
    }

    #[cfg(feature = "tokenizers")]
    #[test]
    fn a_missing_tokenizer_file_is_named() {
        let error =
            spec_of(&serde_json::json!({"tokenizerFile": "/no/such/tokenizer.json"})).unwrap_err();
        assert!(error.to_string().contains("/no/such/tokenizer.json"), "{error}");
    }

    #[test]
    fn pre_tokenized_prompts_are_read_back() {
        let mut ids = Vec::new();
        assert!(token_ids_of("1 22 333 ", &mut ids));
        assert_eq!(ids, [1, 22, 333]);
        for text in ["", "1 2", "1  2 ", "a 2 ", "99999999999 "] {
            assert!(!token_ids_of(text, &mut ids), "{text:?}");
        }
    }
}
