//! The inference request as the scheduler sees it.

pub(crate) mod body;
mod grpc_body;
pub mod model_field;
pub(crate) mod parser;
mod sglang_body;

use std::collections::HashMap;
use std::net::SocketAddr;

use crate::request::body::{ApiKind, BodyError, ParsedBody};

use crate::protocol::{
    FAIRNESS_ID_HEADER, LLM_D_FAIRNESS_ID_HEADER, LLM_D_MODEL_REWRITE_HEADER,
    LLM_D_OBJECTIVE_HEADER, MODEL_REWRITE_HEADER, OBJECTIVE_HEADER, REQUEST_ID_HEADER,
};

/// Characters per token assumed wherever the picker needs a token count without a tokenizer
/// (the common rule of thumb for English text with BPE tokenizers).
pub const CHARACTERS_PER_TOKEN: usize = 4;

/// One inference request, parsed once and read by every plugin.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct InferenceRequest {
    /// Request id (from `x-request-id` when present), for logs and hooks.
    pub request_id: String,
    /// The model named in the request body, before any rewrite (for metrics and logs).
    pub model: String,
    /// The model the request targets: a base model or a LoRA adapter name (the body's model,
    /// or the gateway's rewrite of it).
    pub target_model: String,
    /// Prompt text as prefix hashing sees it: the completion prompt, or the chat messages
    /// flattened in order.
    pub prompt: String,
    /// For a chat request (`messages`), where each message's `role: text\n` line ends in
    /// `prompt`, so that [`Self::chat_messages`] can give the conversation back to a chat
    /// template; empty for other requests.
    pub message_ends: Vec<u32>,
    /// Which OpenAI API the body was written for.
    pub api: ApiKind,
    /// Whether the client asked for a streamed response.
    pub stream: bool,
    /// Request headers, names lower-cased.
    pub headers: HashMap<String, String>,
    /// The InferenceObjective named by the request, if any.
    pub objective: Option<String>,
    /// Priority: higher is more important; below zero is sheddable.
    pub priority: i32,
    /// Flow id for fairness between tenants.
    pub fairness_id: Option<String>,
    /// The model rewrite (its `InferenceModelRewrite`'s name) that chose `target_model`, when
    /// one did.
    pub model_rewrite: Option<std::sync::Arc<str>>,
    /// When the proxy restricts the request to some endpoints (Envoy's subset hint), their
    /// addresses; `None` means the whole pool.
    pub endpoint_subset: Option<Vec<SocketAddr>>,
    /// Whether the body carries image, audio or video inputs (OpenAI content parts
    /// `image_url`, `input_audio`, `video_url`), which an encoder may process apart.
    pub multimodal: bool,
}

impl InferenceRequest {
    /// The prompt's length in tokens, estimated at [`CHARACTERS_PER_TOKEN`] (no tokenizer on
    /// the decision path).
    pub fn estimated_prompt_tokens(&self) -> u64 {
        self.prompt.len().div_ceil(CHARACTERS_PER_TOKEN) as u64
    }

    /// A request for `target_model` with `prompt` and no headers.
    pub fn new(target_model: impl Into<String>, prompt: impl Into<String>) -> Self {
        let target_model = target_model.into();
        Self { model: target_model.clone(), target_model, prompt: prompt.into(), ..Self::default() }
    }

    /// Builds a request from an OpenAI-style JSON body and the request headers.
    ///
    /// `path` (for example `/v1/chat/completions`) disambiguates the API when given. Header names
    /// are matched case-insensitively; the objective, fairness id, request id and model rewrite
    /// headers are read from them.
    pub fn from_openai<'h>(
        path: Option<&str>,
        headers: impl IntoIterator<Item = (&'h str, &'h str)>,
        body: &[u8],
    ) -> Result<Self, BodyError> {
        Self::from_body(path.and_then(ApiKind::from_path), headers, body)
    }

    /// Builds a request from a body written for `api` (as a [`ParserTable`] resolved it; an
    /// [`ApiKind::Unparsed`] body is not read) and the request headers. Without an API, the
    /// body's fields decide between the OpenAI APIs.
    ///
    /// [`ParserTable`]: crate::ParserTable
    pub fn from_body<'h>(
        api: Option<ApiKind>,
        headers: impl IntoIterator<Item = (&'h str, &'h str)>,
        body: &[u8],
    ) -> Result<Self, BodyError> {
        let parsed = ParsedBody::parse_as(api, body)?;
        let headers: HashMap<String, String> = headers
            .into_iter()
            .map(|(name, value)| (name.to_ascii_lowercase(), value.to_owned()))
            .collect();
        let rewrite = [LLM_D_MODEL_REWRITE_HEADER, MODEL_REWRITE_HEADER]
            .iter()
            .find_map(|name| headers.get(*name).filter(|value| !value.is_empty()));
        let target_model = rewrite.unwrap_or(&parsed.model).clone();
        Ok(Self {
            request_id: headers.get(REQUEST_ID_HEADER).cloned().unwrap_or_default(),
            model: parsed.model,
            target_model,
            prompt: parsed.prompt,
            message_ends: parsed.message_ends,
            api: parsed.api,
            stream: parsed.stream,
            objective: non_empty_header(&headers, LLM_D_OBJECTIVE_HEADER, OBJECTIVE_HEADER),
            fairness_id: non_empty_header(&headers, LLM_D_FAIRNESS_ID_HEADER, FAIRNESS_ID_HEADER),
            headers,
            priority: 0,
            model_rewrite: None,
            endpoint_subset: None,
            multimodal: has_multimodal_parts(body),
        })
    }

    /// The messages of a chat request as `(role, text)`, in order; none for other requests
    /// (or when [`Self::message_ends`] does not fit the prompt).
    pub fn chat_messages(&self) -> impl Iterator<Item = (&str, &str)> + '_ {
        let mut start = 0usize;
        self.message_ends.iter().map_while(move |&end| {
            let line = self.prompt.get(start..(end as usize))?;
            start = end as usize;
            let line = line.strip_suffix('\n')?;
            Some(match line.split_once(": ") {
                Some((role, text)) => (role, text),
                None => (line, ""),
            })
        })
    }

    /// Sets the priority.
    pub fn with_priority(mut self, priority: i32) -> Self {
        self.priority = priority;
        self
    }

    /// Sets the request id.
    pub fn with_request_id(mut self, id: impl Into<String>) -> Self {
        self.request_id = id.into();
        self
    }

    /// Adds a header (name lower-cased).
    pub fn with_header(mut self, name: &str, value: impl Into<String>) -> Self {
        self.headers.insert(name.to_ascii_lowercase(), value.into());
        self
    }

    /// Whether the request may be shed when the pool is saturated.
    pub fn is_sheddable(&self) -> bool {
        self.priority < 0
    }

    /// A header value by (case-insensitive) name.
    pub fn header(&self, name: &str) -> Option<&str> {
        match self.headers.get(name) {
            Some(value) => Some(value),
            None => self.headers.get(&name.to_ascii_lowercase()).map(String::as_str),
        }
    }
}

/// The value of header `name`, or else of its older name `alias`; empty values count as absent.
fn non_empty_header(headers: &HashMap<String, String>, name: &str, alias: &str) -> Option<String> {
    [name, alias]
        .into_iter()
        .find_map(|name| headers.get(name).filter(|value| !value.is_empty()))
        .cloned()
}

/// The keys of OpenAI's multimodal content parts, quoted as they stand in JSON.
const MULTIMODAL_PART_KEYS: [&[u8]; 3] = [b"\"image_url\"", b"\"input_audio\"", b"\"video_url\""];

/// Whether `body` names a multimodal content part: a key found (by a vectorised substring
/// search, as this runs on every request) whose opening quote is unescaped. Inside a JSON
/// string a quote is escaped, so `"image_url"` with an unescaped quote is a key (or a whole
/// string value), never text of the prompt. A quote is unescaped when an even number of
/// backslashes precedes it.
fn has_multimodal_parts(body: &[u8]) -> bool {
    MULTIMODAL_PART_KEYS.iter().any(|key| {
        memchr::memmem::find_iter(body, key).any(|at| {
            let backslashes = body[..at].iter().rev().take_while(|&&byte| byte == b'\\').count();
            backslashes % 2 == 0
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_fill_the_request_fields() {
        let body = br#"{"model":"llama","prompt":"hi"}"#;
        let request = InferenceRequest::from_openai(
            Some("/v1/completions"),
            [
                ("X-Gateway-Inference-Objective", "premium"),
                ("x-gateway-inference-fairness-id", "tenant-a"),
                ("X-Request-Id", "r1"),
            ],
            body,
        )
        .unwrap();
        assert_eq!(request.target_model, "llama");
        assert_eq!(request.objective.as_deref(), Some("premium"));
        assert_eq!(request.fairness_id.as_deref(), Some("tenant-a"));
        assert_eq!(request.request_id, "r1");
        assert_eq!(request.header("X-REQUEST-ID"), Some("r1"));
        assert!(!request.is_sheddable());
    }

    #[test]
    fn llm_d_header_names_win_over_their_gateway_aliases() {
        let body = br#"{"model":"llama","prompt":"hi"}"#;
        let both = InferenceRequest::from_openai(
            None,
            [
                ("x-gateway-inference-objective", "old"),
                ("X-LLM-D-Inference-Objective", "new"),
                ("x-gateway-inference-fairness-id", "old-tenant"),
                ("x-llm-d-inference-fairness-id", "new-tenant"),
            ],
            body,
        )
        .unwrap();
        assert_eq!(both.objective.as_deref(), Some("new"));
        assert_eq!(both.fairness_id.as_deref(), Some("new-tenant"));
        let new_only = InferenceRequest::from_openai(
            None,
            [(LLM_D_OBJECTIVE_HEADER, "premium"), (LLM_D_FAIRNESS_ID_HEADER, "tenant-b")],
            body,
        )
        .unwrap();
        assert_eq!(new_only.objective.as_deref(), Some("premium"));
        assert_eq!(new_only.fairness_id.as_deref(), Some("tenant-b"));
        let empty_new = InferenceRequest::from_openai(
            None,
            [(LLM_D_OBJECTIVE_HEADER, ""), (OBJECTIVE_HEADER, "batch")],
            body,
        )
        .unwrap();
        assert_eq!(empty_new.objective.as_deref(), Some("batch"), "an empty value is absent");
        assert_eq!(empty_new.fairness_id, None);
    }

    #[test]
    fn model_rewrite_header_wins_over_the_body() {
        let body = br#"{"model":"llama","prompt":"hi"}"#;
        let request =
            InferenceRequest::from_openai(None, [(LLM_D_MODEL_REWRITE_HEADER, "llama-v2")], body)
                .unwrap();
        assert_eq!(request.target_model, "llama-v2");
        assert_eq!(request.model, "llama", "the body's model is kept for metrics");
    }

    #[test]
    fn the_current_rewrite_header_wins_over_its_old_name() {
        let body = br#"{"model":"llama","prompt":"hi"}"#;
        let old_only =
            InferenceRequest::from_openai(None, [(MODEL_REWRITE_HEADER, "old")], body).unwrap();
        assert_eq!(old_only.target_model, "old");
        let both = InferenceRequest::from_openai(
            None,
            [(MODEL_REWRITE_HEADER, "old"), ("X-LLM-D-Model-Name-Rewrite", "new")],
            body,
        )
        .unwrap();
        assert_eq!(both.target_model, "new");
    }

    #[test]
    fn multimodal_parts_are_seen_and_prompt_text_is_not_mistaken_for_them() {
        let image = br#"{"model":"m","messages":[{"role":"user","content":[
            {"type":"text","text":"what is this?"},{"type":"image_url","image_url":{"url":"x"}}]}]}"#;
        let request = InferenceRequest::from_openai(Some("/v1/chat/completions"), [], image);
        assert!(request.unwrap().multimodal);
        let quoted =
            br#"{"model":"m","messages":[{"role":"user","content":"say \"image_url\" \\"}]}"#;
        let request = InferenceRequest::from_openai(Some("/v1/chat/completions"), [], quoted);
        let request = request.unwrap();
        assert!(request.prompt.contains("\"image_url\""), "{}", request.prompt);
        assert!(!request.multimodal, "text mentioning the key is not an image");
        assert!(!has_multimodal_parts(b"{\"input_audio_x\":1}"));
        assert!(has_multimodal_parts(b"{\"input_audio\":{}}"));
        assert!(!has_multimodal_parts(br#"{"x":"say \"image_url\""}"#), "an escaped quote");
        assert!(has_multimodal_parts(br#"{"x":"a\\","image_url":{}}"#), "an escaped backslash");
    }
}

#[cfg(test)]
mod chat_message_tests {
    use super::*;

    fn messages_of(path: &str, body: &str) -> Vec<(String, String)> {
        let request = InferenceRequest::from_openai(Some(path), [], body.as_bytes()).unwrap();
        request.chat_messages().map(|(role, text)| (role.to_owned(), text.to_owned())).collect()
    }

    fn pairs(expected: &[(&str, &str)]) -> Vec<(String, String)> {
        expected.iter().map(|(role, text)| (role.to_string(), text.to_string())).collect()
    }

    #[test]
    fn a_conversation_comes_back_message_by_message() {
        let body = r#"{"model": "m", "messages": [
            {"role": "system", "content": "Be brief.\nuser: not a message"},
            {"content": "role after content", "role": "user"},
            {"role": "assistant", "content": [{"type": "text", "text": "parts"}]},
            {"role": "user"},
            {"content": "no role"}
        ]}"#;
        assert_eq!(
            messages_of("/v1/chat/completions", body),
            pairs(&[
                ("system", "Be brief.\nuser: not a message"),
                ("user", "role after content"),
                ("assistant", "parts"),
                ("user", ""),
                ("", "no role"),
            ])
        );
    }

    #[test]
    fn anthropics_system_prompt_is_the_first_message() {
        let body = r#"{"model": "m", "system": "Sys", "max_tokens": 5,
                       "messages": [{"role": "user", "content": "Hi"}]}"#;
        assert_eq!(messages_of("/v1/messages", body), pairs(&[("system", "Sys"), ("user", "Hi")]));
    }

    #[test]
    fn other_requests_have_no_messages() {
        assert!(messages_of("/v1/completions", r#"{"model": "m", "prompt": "a: b\n"}"#).is_empty());
        assert!(messages_of("/v1/responses", r#"{"model": "m", "input": "x"}"#).is_empty());
        // A body that names both keeps the fields of its API only.
        let both =
            r#"{"model": "m", "messages": [{"role": "user", "content": "q"}], "prompt": "p"}"#;
        assert!(messages_of("/v1/completions", both).is_empty());
        assert_eq!(messages_of("/v1/chat/completions", both), pairs(&[("user", "q")]));
    }

    proptest::proptest! {
        /// Whatever the texts hold (newlines, `role: ` lookalikes, any characters), the
        /// conversation comes back as it was sent.
        #[test]
        fn any_conversation_comes_back_as_sent(
            turns in proptest::collection::vec(("[a-z_]{0,10}", ".{0,60}"), 0..8),
        ) {
            let messages: Vec<serde_json::Value> = turns
                .iter()
                .map(|(role, content)| serde_json::json!({"role": role, "content": content}))
                .collect();
            let body = serde_json::json!({"model": "m", "messages": messages}).to_string();
            let got = messages_of("/v1/chat/completions", &body);
            let sent: Vec<(String, String)> = turns.clone();
            proptest::prop_assert_eq!(got, sent);
        }
    }

    #[test]
    fn ends_that_do_not_fit_the_prompt_give_no_messages() {
        let mut request = InferenceRequest::new("m", "user: hi\n");
        request.message_ends = vec![9];
        assert_eq!(request.chat_messages().count(), 1);
        request.message_ends = vec![42];
        assert_eq!(request.chat_messages().count(), 0);
        request.message_ends = vec![4];
        assert_eq!(request.chat_messages().count(), 0);
    }
}
