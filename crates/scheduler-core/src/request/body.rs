//! Parsing of inference request bodies into the model name and the prompt text: the OpenAI
//! APIs (`/v1/completions`, `/v1/chat/completions`, `/v1/responses`, `/v1/embeddings`,
//! `/v1/conversations`, `/v1/images/generations`), Anthropic's Messages API (`/v1/messages`)
//! and vLLM's `/inference/v1/generate`.
//!
//! Only the fields scheduling needs are read; every other field is skipped without being
//! materialised. Chat messages are flattened to `role: text` lines in order, so that two
//! conversations sharing leading messages share a leading prompt prefix.
//!
//! # How
//!
//! One pass of serde_json over the body with hand-written visitors: each value is dispatched on
//! its first token and its text is appended straight to the one prompt `String` (strings are
//! borrowed from the body unless they hold escapes; token ids are formatted in place). Nothing
//! is buffered as a generic JSON tree, so a prompt of a million token ids costs the prompt
//! string and nothing per id.
//!
//! The accepted shapes and the flattened text are those of the `#[serde(untagged)]` parser
//! this replaced, case for case (checked against it on generated bodies while both existed;
//! the shapes that comparison pinned down are in the tests below), so prefix hashes did not
//! change:
//! - `prompt`: a string (as is), strings (each followed by `\n`), token ids, or arrays of token
//!   ids (each id in decimal followed by a space);
//! - `messages`: `role: text\n` per message, the text being the string content or the `text`
//!   of each content part; a message or a part may also be an array of its fields in order;
//! - Anthropic's `system` (a string or text blocks) comes first, as `system: text\n`, then its
//!   `messages` as above; vLLM's `token_ids` as token ids; a conversation's `items` as
//!   messages;
//! - `input`: as `prompt`, or messages. An array of arrays is token ids if the first non-empty
//!   inner array starts with an id, messages if it starts with a role (empty inner arrays are
//!   empty batches, or empty messages once the list turns out to be messages);
//! - wherever the old parser held a value as a generic tree (`content`, `input`), the parts it
//!   skips are still checked as it checked them (valid UTF-8 and escapes, numbers in range);
//!   unknown top-level and message fields are skipped unchecked, as before.
//!
//! # Bounds
//!
//! - Memory: the prompt is never longer than the body (every emitted byte stands for at least
//!   one byte of JSON), so it is allocated once at the body's length and never grows; it is
//!   shrunk when less than half is used. Besides it, serde_json's scratch holds the longest
//!   string with escapes (decoded). Peak allocation measured on 32 MiB bodies: 1.5 times the
//!   body for `[[0],[0],..]` (the shrink), 1.0 for flat ids or strings without escapes, 2.0 for
//!   one 32 MiB string or key with an escape (tests/body_memory.rs checks the token-id cases).
//! - Time: linear in the body.
//! - Depth: serde_json's recursion limit (128 nested arrays or objects) applies everywhere, so
//!   deep nesting is an error, not a stack overflow.

use std::borrow::Cow;
use std::fmt;

use serde::de::{
    self, DeserializeSeed, Deserializer, Expected, IgnoredAny, MapAccess, SeqAccess, Unexpected,
    Visitor,
};

/// Which API a body was written for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum ApiKind {
    /// `/v1/completions`: a `prompt`.
    #[default]
    Completions,
    /// `/v1/chat/completions`: `messages`.
    ChatCompletions,
    /// `/v1/responses`: `input`.
    Responses,
    /// `/v1/embeddings`: `input`.
    Embeddings,
    /// `/v1/conversations`: `items`.
    Conversations,
    /// `/v1/images/generations`: a `prompt`.
    ImageGenerations,
    /// Anthropic's `/v1/messages`: `messages`, and an optional `system`.
    AnthropicMessages,
    /// vLLM's `/inference/v1/generate`: `token_ids`; the model is optional.
    VllmGenerate,
    /// A body not interpreted at all (the passthrough parser): no model, no prompt.
    Unparsed,
    /// vLLM's gRPC `VllmEngine/Generate`: a protobuf `GenerateRequest` (text or token ids).
    VllmGrpcGenerate,
    /// vLLM's gRPC `VllmEngine/Embed`: a protobuf `EmbedRequest` (token ids).
    VllmGrpcEmbed,
    /// SGLang's `/generate`: `input_ids` (one pre-tokenized prompt); no model.
    SglangGenerate,
    /// Vertex AI's gRPC `PredictionService/ChatCompletions`: an OpenAI chat completion body
    /// in the request's `HttpBody`.
    VertexAiChatCompletions,
    /// Vertex AI's gRPC `PredictionService/RawPredict` and `StreamRawPredict`: an OpenAI
    /// Responses body in the request's `HttpBody`.
    VertexAiRawPredict,
}

impl ApiKind {
    /// The API an HTTP path names, ignoring any query string: the paths the OpenAI,
    /// Anthropic and vLLM HTTP parsers claim (see [`ParserTable`](crate::ParserTable)).
    pub fn from_path(path: &str) -> Option<Self> {
        use crate::request::parser::{RequestParser, longest_claim};
        const CLAIMING: [RequestParser; 3] =
            [RequestParser::OpenAi, RequestParser::Anthropic, RequestParser::VllmHttp];
        longest_claim(&CLAIMING, path).map(|(_, api)| api)
    }
}

/// Why a request body could not be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BodyError {
    /// The body is empty.
    #[error("request body is empty")]
    Empty,
    /// The body is not valid JSON, or a field has the wrong type.
    #[error("request body is not valid JSON: {message} (line {line}, column {column})")]
    InvalidJson {
        /// The parser's description.
        message: String,
        /// 1-based line of the error.
        line: usize,
        /// 1-based column of the error.
        column: usize,
    },
    /// The body is not one well-formed, uncompressed gRPC message of the API's type.
    #[error("request body is not a valid gRPC message: {message}")]
    InvalidGrpc {
        /// What was wrong.
        message: String,
    },
    /// The body has no `model` field, or it is empty.
    #[error("request body has no \"model\" field")]
    MissingModel,
    /// The body carries no prompt in any form the named API accepts.
    #[error("request body has no {expected} field for {api:?}")]
    MissingPrompt {
        /// The API the body was read as.
        api: ApiKind,
        /// The field that was expected.
        expected: &'static str,
    },
}

/// The scheduling-relevant content of a request body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParsedBody {
    /// The `model` field.
    pub model: String,
    /// The prompt text, flattened.
    pub prompt: String,
    /// The API the body was read as.
    pub api: ApiKind,
    /// The `stream` field.
    pub stream: bool,
    /// For a body of chat messages, where each message's `role: text\n` line ends in
    /// `prompt` (byte offsets); empty for other bodies.
    pub message_ends: Vec<u32>,
}

impl ParsedBody {
    /// Parses `body`; `path`, when given, says which OpenAI API it targets.
    pub fn parse(path: Option<&str>, body: &[u8]) -> Result<Self, BodyError> {
        Self::parse_as(path.and_then(ApiKind::from_path), body)
    }

    /// Parses `body` as written for `api`; without one, the fields present decide between
    /// the OpenAI APIs (`messages`, else `prompt`, else `input`). An [`ApiKind::Unparsed`]
    /// body is not read at all.
    pub fn parse_as(api: Option<ApiKind>, body: &[u8]) -> Result<Self, BodyError> {
        if api == Some(ApiKind::Unparsed) {
            let api = ApiKind::Unparsed;
            let (model, prompt) = (String::new(), String::new());
            return Ok(Self { model, prompt, api, stream: false, message_ends: Vec::new() });
        }
        match api {
            Some(api @ (ApiKind::VllmGrpcGenerate | ApiKind::VllmGrpcEmbed)) => {
                return crate::request::grpc_body::parse(api, body);
            }
            Some(ApiKind::SglangGenerate) => return crate::request::sglang_body::parse(body),
            Some(api @ (ApiKind::VertexAiChatCompletions | ApiKind::VertexAiRawPredict)) => {
                let inner = crate::request::grpc_body::vertex_http_body(api, body)?;
                let openai = match api {
                    ApiKind::VertexAiChatCompletions => ApiKind::ChatCompletions,
                    _ => ApiKind::Responses,
                };
                return Self::parse_as(Some(openai), &inner);
            }
            _ => {}
        }
        if body.iter().all(u8::is_ascii_whitespace) {
            return Err(BodyError::Empty);
        }
        let path_api = api;
        // Never outgrown: see the module's bounds.
        let mut prompt = String::with_capacity(body.len());
        let mut message_ends = Vec::new();
        let fields =
            read_fields(path_api, body, &mut prompt, &mut message_ends).map_err(invalid_json)?;
        let model = match fields.model {
            Some(model) if !model.trim().is_empty() => model.into_owned(),
            // vLLM's generate API routes pre-tokenized prompts, often without a model.
            _ if path_api == Some(ApiKind::VllmGenerate) => String::new(),
            _ => return Err(BodyError::MissingModel),
        };
        let api = path_api.unwrap_or(if fields.present[PromptField::Messages as usize] {
            ApiKind::ChatCompletions
        } else if fields.present[PromptField::Prompt as usize] {
            ApiKind::Completions
        } else {
            ApiKind::Responses
        });
        let field = PromptField::of(api);
        // Go's parsers want token ids and conversation items to be non-empty lists.
        let must_not_be_empty = matches!(field, PromptField::TokenIds | PromptField::Items);
        if !fields.present[field as usize] || (must_not_be_empty && prompt.is_empty()) {
            return Err(BodyError::MissingPrompt { api, expected: field.quoted_name() });
        }
        if let Some(system) = fields.system {
            prompt.insert_str(0, &system);
            if !message_ends.is_empty() {
                // Anthropic's system prompt is the conversation's first message.
                let shift = u32::try_from(system.len()).unwrap_or(u32::MAX);
                for end in &mut message_ends {
                    *end = end.saturating_add(shift);
                }
                message_ends.insert(0, shift);
            }
        }
        if prompt.len() < prompt.capacity() / 2 {
            prompt.shrink_to_fit();
        }
        let stream = fields.stream.unwrap_or(false);
        Ok(Self { model, prompt, api, stream, message_ends })
    }
}

fn invalid_json(error: serde_json::Error) -> BodyError {
    BodyError::InvalidJson {
        message: strip_position(&error.to_string()),
        line: error.line(),
        column: error.column(),
    }
}

/// serde_json appends " at line L column C"; the error carries those as fields already.
fn strip_position(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(at) => message[..at].to_owned(),
        None => message.to_owned(),
    }
}

/// Reads the body's fields, writing the prompt of the field that `api` (or, without one, the
/// field that decides the API) names into `out`.
fn read_fields<'de>(
    api: Option<ApiKind>,
    body: &'de [u8],
    out: &mut String,
    message_ends: &mut Vec<u32>,
) -> Result<Fields<'de>, serde_json::Error> {
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    let fields = deserializer.deserialize_struct(
        "request body",
        &BODY_FIELDS,
        BodyVisitor { api, out, message_ends },
    )?;
    deserializer.end()?;
    Ok(fields)
}

/// The top-level fields read; the first five in the order of the array form of a body.
const BODY_FIELDS: [&str; 8] =
    ["model", "prompt", "messages", "input", "stream", "items", "token_ids", "system"];
const MODEL: usize = 0;
const STREAM: usize = 4;
const SYSTEM: usize = 7;

/// The fields that can carry the prompt, by their index in [`BODY_FIELDS`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PromptField {
    Prompt = 1,
    Messages = 2,
    Input = 3,
    Items = 5,
    TokenIds = 6,
}

impl PromptField {
    fn of(api: ApiKind) -> Self {
        match api {
            ApiKind::Completions | ApiKind::ImageGenerations => Self::Prompt,
            ApiKind::ChatCompletions | ApiKind::AnthropicMessages => Self::Messages,
            ApiKind::Responses | ApiKind::Embeddings | ApiKind::Unparsed => Self::Input,
            ApiKind::Conversations => Self::Items,
            ApiKind::VllmGenerate
            | ApiKind::VllmGrpcGenerate
            | ApiKind::VllmGrpcEmbed
            | ApiKind::SglangGenerate => Self::TokenIds,
            ApiKind::VertexAiChatCompletions => Self::Messages,
            ApiKind::VertexAiRawPredict => Self::Input,
        }
    }

    fn from_index(index: usize) -> Self {
        match index {
            1 => Self::Prompt,
            2 => Self::Messages,
            5 => Self::Items,
            6 => Self::TokenIds,
            _ => Self::Input,
        }
    }

    fn quoted_name(self) -> &'static str {
        match self {
            Self::Prompt => "\"prompt\"",
            Self::Messages => "\"messages\"",
            Self::Input => "\"input\"",
            Self::Items => "non-empty \"items\"",
            Self::TokenIds => "non-empty \"token_ids\"",
        }
    }

    /// Without a path, the API is that of `messages`, else `prompt`, else `input`; the fields
    /// of the other APIs are only read when the path names them.
    fn precedence(self) -> u8 {
        match self {
            Self::Messages => 3,
            Self::Prompt => 2,
            Self::Input => 1,
            Self::Items | Self::TokenIds => 0,
        }
    }
}

/// Whether the body of `api` (or, without one, of the OpenAI API its fields decide) reads the
/// field at `index` of [`BODY_FIELDS`]; the fields it does not read are skipped unchecked, as
/// any unknown field is.
fn reads_field(api: Option<ApiKind>, index: usize) -> bool {
    match index {
        SYSTEM => api == Some(ApiKind::AnthropicMessages),
        MODEL | STREAM => true,
        _ => {
            let field = PromptField::from_index(index);
            match api {
                Some(api) => field.precedence() > 0 || PromptField::of(api) == field,
                None => field.precedence() > 0,
            }
        }
    }
}

#[derive(Default)]
struct Fields<'de> {
    model: Option<Cow<'de, str>>,
    stream: Option<bool>,
    /// Which prompt fields are present and not null, by index in [`BODY_FIELDS`].
    present: [bool; BODY_FIELDS.len()],
    /// The field whose text `out` holds.
    written: Option<PromptField>,
    /// Anthropic's system prompt, flattened (`system: text\n`), to go before the messages.
    system: Option<String>,
}

impl Fields<'_> {
    /// Whether `field`'s text goes to the prompt (the others are only checked).
    fn writes(&self, api: Option<ApiKind>, field: PromptField) -> bool {
        match api {
            Some(api) => PromptField::of(api) == field,
            None => {
                field.precedence() > 0
                    && self.written.is_none_or(|held| field.precedence() > held.precedence())
            }
        }
    }

    fn record(&mut self, field: PromptField, present: bool, written: bool) {
        self.present[field as usize] = present;
        if present && written {
            self.written = Some(field);
        }
    }
}

struct BodyVisitor<'o> {
    api: Option<ApiKind>,
    out: &'o mut String,
    /// Where each chat message's line ends in `out`.
    message_ends: &'o mut Vec<u32>,
}

impl BodyVisitor<'_> {
    fn prompt_seed(
        &mut self,
        fields: &Fields<'_>,
        field: PromptField,
    ) -> (PromptFieldSeed<'_>, bool) {
        let writes = fields.writes(self.api, field);
        let sink = Sink(if writes { Some(&mut *self.out) } else { None });
        let message_ends = if writes { Some(&mut *self.message_ends) } else { None };
        (PromptFieldSeed { field, sink, message_ends }, writes)
    }
}

impl<'de> Visitor<'de> for BodyVisitor<'_> {
    type Value = Fields<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object (an OpenAI request)")
    }

    fn visit_map<A: MapAccess<'de>>(mut self, mut map: A) -> Result<Fields<'de>, A::Error> {
        let mut fields = Fields::default();
        let mut seen = [false; BODY_FIELDS.len()];
        while let Some(key) = map.next_key_seed(KeyIndex(&BODY_FIELDS))? {
            let Some(index) = key.filter(|&index| reads_field(self.api, index)) else {
                map.next_value::<IgnoredAny>()?;
                continue;
            };
            if std::mem::replace(&mut seen[index], true) {
                return Err(de::Error::duplicate_field(BODY_FIELDS[index]));
            }
            match index {
                MODEL => fields.model = map.next_value_seed(ModelSeed)?,
                STREAM => fields.stream = map.next_value()?,
                SYSTEM => fields.system = map.next_value_seed(SystemSeed)?,
                _ => {
                    let field = PromptField::from_index(index);
                    let (seed, writes) = self.prompt_seed(&fields, field);
                    let present = map.next_value_seed(seed)?;
                    fields.record(field, present, writes);
                }
            }
        }
        Ok(fields)
    }

    /// A body may also be the array of its fields in order (as derived `Deserialize` accepts).
    fn visit_seq<A: SeqAccess<'de>>(mut self, mut seq: A) -> Result<Fields<'de>, A::Error> {
        let mut fields = Fields::default();
        match seq.next_element_seed(ModelSeed)? {
            Some(model) => fields.model = model,
            None => return Ok(fields),
        }
        for field in [PromptField::Prompt, PromptField::Messages, PromptField::Input] {
            let (seed, writes) = self.prompt_seed(&fields, field);
            match seq.next_element_seed(seed)? {
                Some(present) => fields.record(field, present, writes),
                None => return Ok(fields),
            }
        }
        fields.stream = seq.next_element::<Option<bool>>()?.flatten();
        Ok(fields)
    }
}

/// A map key as its index in a list of field names (`None`: a field not read).
struct KeyIndex(&'static [&'static str]);

impl<'de> DeserializeSeed<'de> for KeyIndex {
    type Value = Option<usize>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Option<usize>, D::Error> {
        deserializer.deserialize_identifier(self)
    }
}

impl Visitor<'_> for KeyIndex {
    type Value = Option<usize>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a field name")
    }

    fn visit_str<E: de::Error>(self, key: &str) -> Result<Option<usize>, E> {
        Ok(self.0.iter().position(|name| *name == key))
    }
}

/// `model`: borrowed from the body unless it holds escapes; `null` is no model.
struct ModelSeed;

impl<'de> DeserializeSeed<'de> for ModelSeed {
    type Value = Option<Cow<'de, str>>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_option(self)
    }
}

impl<'de> Visitor<'de> for ModelSeed {
    type Value = Option<Cow<'de, str>>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string")
    }

    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_str(self)
    }

    fn visit_borrowed_str<E: de::Error>(self, model: &'de str) -> Result<Self::Value, E> {
        Ok(Some(Cow::Borrowed(model)))
    }

    fn visit_str<E: de::Error>(self, model: &str) -> Result<Self::Value, E> {
        Ok(Some(Cow::Owned(model.to_owned())))
    }
}

/// Where flattened prompt text goes: the prompt, or nowhere for a field that is only checked.
struct Sink<'s>(Option<&'s mut String>);

impl Sink<'_> {
    fn reborrow(&mut self) -> Sink<'_> {
        Sink(self.0.as_deref_mut())
    }

    fn push_str(&mut self, text: &str) {
        if let Some(out) = &mut self.0 {
            out.push_str(text);
        }
    }

    fn len(&self) -> usize {
        self.0.as_ref().map_or(0, |out| out.len())
    }

    fn insert_str(&mut self, at: usize, text: &str) {
        if let Some(out) = &mut self.0 {
            out.insert_str(at, text);
        }
    }

    /// A token id stands for text we cannot decode here; its decimal form and a space keep
    /// equal token prefixes equal, which is all prefix matching needs.
    fn push_token(&mut self, token: i64) {
        let Some(out) = &mut self.0 else { return };
        // "-9223372036854775808 " is the longest.
        let mut text = [0u8; 21];
        let mut at = text.len() - 1;
        text[at] = b' ';
        let mut rest = token.unsigned_abs();
        loop {
            at -= 1;
            text[at] = b'0' + (rest % 10) as u8;
            rest /= 10;
            if rest == 0 {
                break;
            }
        }
        if token < 0 {
            at -= 1;
            text[at] = b'-';
        }
        if let Ok(text) = std::str::from_utf8(&text[at..]) {
            out.push_str(text);
        }
    }
}

/// The value of `prompt`, `messages` or `input`: `null` counts as absent (the result says
/// whether it was present).
struct PromptFieldSeed<'s> {
    field: PromptField,
    sink: Sink<'s>,
    message_ends: Option<&'s mut Vec<u32>>,
}

impl<'de> DeserializeSeed<'de> for PromptFieldSeed<'_> {
    type Value = bool;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<bool, D::Error> {
        deserializer.deserialize_option(self)
    }
}

impl<'de> Visitor<'de> for PromptFieldSeed<'_> {
    type Value = bool;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.field {
            PromptField::Prompt => PromptValue { sink: Sink(None), items: None }.expecting(f),
            PromptField::Messages | PromptField::Items => f.write_str("an array of messages"),
            PromptField::TokenIds => f.write_str("an array of token ids"),
            PromptField::Input => {
                PromptValue { sink: Sink(None), items: Some(Unknown::Check) }.expecting(f)
            }
        }
    }

    fn visit_none<E: de::Error>(self) -> Result<bool, E> {
        Ok(false)
    }

    fn visit_unit<E: de::Error>(self) -> Result<bool, E> {
        Ok(false)
    }

    fn visit_some<D: Deserializer<'de>>(mut self, deserializer: D) -> Result<bool, D::Error> {
        // A field of higher precedence replaces the text of one read before it.
        if let Some(out) = &mut self.sink.0 {
            out.clear();
        }
        if let Some(ends) = &mut self.message_ends {
            ends.clear();
        }
        let sink = self.sink;
        match self.field {
            PromptField::Prompt => deserializer.deserialize_any(PromptValue { sink, items: None }),
            PromptField::Input => {
                deserializer.deserialize_any(PromptValue { sink, items: Some(Unknown::Check) })
            }
            PromptField::Messages => deserializer.deserialize_seq(MessageList {
                sink,
                unknown: Unknown::Skip,
                ends: self.message_ends,
            }),
            PromptField::Items => deserializer.deserialize_seq(MessageList {
                sink,
                unknown: Unknown::Check,
                ends: None,
            }),
            PromptField::TokenIds => deserializer.deserialize_seq(TokenList { sink }),
        }?;
        Ok(true)
    }
}

/// What happens to fields a message or content part does not read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Unknown {
    /// Skipped unchecked (serde's `IgnoredAny`).
    Skip,
    /// Checked as a generic JSON value would be (strings valid UTF-8 with valid escapes,
    /// numbers in range), then dropped.
    Check,
}

impl Unknown {
    fn skip_value<'de, A: MapAccess<'de>>(self, map: &mut A) -> Result<(), A::Error> {
        match self {
            Self::Skip => map.next_value::<IgnoredAny>().map(drop),
            Self::Check => map.next_value_seed(CheckValue),
        }
    }
}

/// A `prompt` (or `input`, when `items` is set: messages are accepted too, their unknown
/// fields handled as it says): a string, or an array whose shape its elements decide.
struct PromptValue<'s> {
    sink: Sink<'s>,
    items: Option<Unknown>,
}

impl<'de> Visitor<'de> for PromptValue<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(
            "a string, an array of strings, an array of token ids or an array of token-id arrays",
        )?;
        if self.items.is_some() {
            f.write_str(", or an array of messages")?;
        }
        Ok(())
    }

    fn visit_str<E: de::Error>(mut self, text: &str) -> Result<(), E> {
        self.sink.push_str(text);
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(mut self, mut seq: A) -> Result<(), A::Error> {
        let mut list = ListShape { kind: ListKind::Undecided, empty_arrays: 0, items: self.items };
        while seq
            .next_element_seed(ListElement { list: &mut list, sink: self.sink.reborrow() })?
            .is_some()
        {}
        Ok(())
    }
}

/// What an array given as a prompt turned out to hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ListKind {
    /// Nothing yet but empty arrays.
    Undecided,
    Texts,
    Tokens,
    TokenBatches,
    Messages,
}

/// The state of a prompt array being read: its elements must all be of one kind, decided by
/// the first (or, for arrays of arrays, by the first non-empty one).
struct ListShape {
    kind: ListKind,
    /// Empty arrays read while undecided: empty token batches, or empty messages once the
    /// list turns out to be messages.
    empty_arrays: usize,
    items: Option<Unknown>,
}

impl ListShape {
    /// Settles a scalar element's kind: only as the array's first element may it decide.
    fn scalar<E: de::Error>(&mut self, kind: ListKind, found: Unexpected<'_>) -> Result<(), E> {
        if self.kind == ListKind::Undecided && self.empty_arrays == 0 {
            self.kind = kind;
        }
        if self.kind == kind { Ok(()) } else { Err(E::invalid_type(found, self)) }
    }

    /// Turns an undecided list of empty arrays into messages: each was an empty message.
    fn settle_as_messages(&mut self, sink: &mut Sink<'_>) {
        if self.kind == ListKind::Undecided {
            self.kind = ListKind::Messages;
            for _ in 0..std::mem::take(&mut self.empty_arrays) {
                sink.push_str(": \n");
            }
        }
    }
}

impl Expected for ListShape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match (self.kind, self.items.is_some()) {
            (ListKind::Undecided, false) if self.empty_arrays == 0 => {
                "a string, a token id or an array of token ids"
            }
            (ListKind::Undecided, true) if self.empty_arrays == 0 => {
                "a string, a token id, an array of token ids or a message"
            }
            (ListKind::Undecided, false) => "an array of token ids, like the elements before",
            (ListKind::Undecided, true) => "an array of token ids or a message",
            (ListKind::Texts, _) => "a string, like the array's first element",
            (ListKind::Tokens, _) => "a token id, like the array's first element",
            (ListKind::TokenBatches, _) => "an array of token ids, like the elements before",
            (ListKind::Messages, _) => "a message, like the elements before",
        })
    }
}

/// One element of a prompt array.
struct ListElement<'l, 's> {
    list: &'l mut ListShape,
    sink: Sink<'s>,
}

impl<'de> DeserializeSeed<'de> for ListElement<'_, '_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for ListElement<'_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.list.fmt(f)
    }

    fn visit_str<E: de::Error>(mut self, text: &str) -> Result<(), E> {
        self.list.scalar(ListKind::Texts, Unexpected::Str(text))?;
        self.sink.push_str(text);
        self.sink.push_str("\n");
        Ok(())
    }

    fn visit_i64<E: de::Error>(mut self, token: i64) -> Result<(), E> {
        self.list.scalar(ListKind::Tokens, Unexpected::Signed(token))?;
        self.sink.push_token(token);
        Ok(())
    }

    fn visit_u64<E: de::Error>(self, token: u64) -> Result<(), E> {
        self.visit_i64(token_id(token)?)
    }

    fn visit_seq<A: SeqAccess<'de>>(mut self, mut seq: A) -> Result<(), A::Error> {
        match self.list.kind {
            ListKind::TokenBatches => read_tokens(&mut seq, self.sink),
            ListKind::Messages => message_fields(&mut seq, self.sink),
            ListKind::Undecided => {
                // The first element says which: a token id, or (in `input`) a message's role.
                let first = InnerFirst { list: &mut *self.list, sink: self.sink.reborrow() };
                if seq.next_element_seed(first)?.is_none() {
                    self.list.empty_arrays += 1;
                    return Ok(());
                }
                match self.list.kind {
                    ListKind::TokenBatches => read_tokens(&mut seq, self.sink),
                    _ => message_after_role(&mut seq, self.sink),
                }
            }
            ListKind::Texts | ListKind::Tokens => {
                Err(de::Error::invalid_type(Unexpected::Seq, &*self.list))
            }
        }
    }

    fn visit_map<A: MapAccess<'de>>(mut self, map: A) -> Result<(), A::Error> {
        match self.list.items {
            Some(unknown) if matches!(self.list.kind, ListKind::Undecided | ListKind::Messages) => {
                self.list.settle_as_messages(&mut self.sink);
                message_map(map, self.sink, unknown)
            }
            _ => Err(de::Error::invalid_type(Unexpected::Map, &*self.list)),
        }
    }
}

/// The first element of an inner array while the list is undecided.
struct InnerFirst<'l, 's> {
    list: &'l mut ListShape,
    sink: Sink<'s>,
}

impl InnerFirst<'_, '_> {
    fn role<E: de::Error>(mut self, role: &str, found: Unexpected<'_>) -> Result<(), E> {
        if self.list.items.is_none() {
            return Err(E::invalid_type(found, &"a token id"));
        }
        self.list.settle_as_messages(&mut self.sink);
        self.sink.push_str(role);
        self.sink.push_str(": ");
        Ok(())
    }
}

impl<'de> DeserializeSeed<'de> for InnerFirst<'_, '_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for InnerFirst<'_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.list.items {
            Some(_) => f.write_str("a token id or a message role"),
            None => f.write_str("a token id"),
        }
    }

    fn visit_i64<E: de::Error>(mut self, token: i64) -> Result<(), E> {
        self.list.kind = ListKind::TokenBatches;
        self.sink.push_token(token);
        Ok(())
    }

    fn visit_u64<E: de::Error>(self, token: u64) -> Result<(), E> {
        self.visit_i64(token_id(token)?)
    }

    fn visit_str<E: de::Error>(self, role: &str) -> Result<(), E> {
        self.role(role, Unexpected::Str(role))
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.role("", Unexpected::Unit)
    }
}

/// A token id: a JSON integer that fits an `i64`.
fn token_id<E: de::Error>(token: u64) -> Result<i64, E> {
    i64::try_from(token).map_err(|_| {
        E::invalid_value(Unexpected::Unsigned(token), &"a token id (a 64-bit integer)")
    })
}

/// The rest of an array of token ids.
fn read_tokens<'de, A: SeqAccess<'de>>(seq: &mut A, mut sink: Sink<'_>) -> Result<(), A::Error> {
    while seq.next_element_seed(TokenSeed { sink: sink.reborrow() })?.is_some() {}
    Ok(())
}

struct TokenSeed<'s> {
    sink: Sink<'s>,
}

impl<'de> DeserializeSeed<'de> for TokenSeed<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl Visitor<'_> for TokenSeed<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a token id")
    }

    fn visit_i64<E: de::Error>(mut self, token: i64) -> Result<(), E> {
        self.sink.push_token(token);
        Ok(())
    }

    fn visit_u64<E: de::Error>(self, token: u64) -> Result<(), E> {
        self.visit_i64(token_id(token)?)
    }
}

/// `token_ids`: an array of token ids.
struct TokenList<'s> {
    sink: Sink<'s>,
}

impl<'de> Visitor<'de> for TokenList<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an array of token ids")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        read_tokens(&mut seq, self.sink)
    }
}

/// Anthropic's `system`: `null`, a string or an array of text blocks, flattened as a message
/// of role `system` would be.
struct SystemSeed;

impl<'de> DeserializeSeed<'de> for SystemSeed {
    type Value = Option<String>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        let mut text = String::from("system: ");
        let mut present = false;
        deserializer
            .deserialize_option(SystemVisitor { text: &mut text, present: &mut present })?;
        text.push('\n');
        Ok(present.then_some(text))
    }
}

struct SystemVisitor<'t> {
    text: &'t mut String,
    present: &'t mut bool,
}

impl<'de> Visitor<'de> for SystemVisitor<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string or an array of text blocks")
    }

    fn visit_none<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        *self.present = true;
        ContentSeed { sink: Sink(Some(self.text)) }.deserialize(deserializer)
    }
}

/// `messages`: an array of messages.
struct MessageList<'s> {
    sink: Sink<'s>,
    unknown: Unknown,
    /// Where each message's line ends in the prompt, when they are wanted.
    ends: Option<&'s mut Vec<u32>>,
}

impl<'de> Visitor<'de> for MessageList<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an array of messages")
    }

    fn visit_seq<A: SeqAccess<'de>>(mut self, mut seq: A) -> Result<(), A::Error> {
        while seq
            .next_element_seed(MessageSeed { sink: self.sink.reborrow(), unknown: self.unknown })?
            .is_some()
        {
            if let Some(ends) = &mut self.ends {
                // The prompt is never longer than the body, which is far below 4 GiB.
                ends.push(u32::try_from(self.sink.len()).unwrap_or(u32::MAX));
            }
        }
        Ok(())
    }
}

/// One message, flattened to `role: text\n`: an object, or the array of its fields in order
/// (`[role, content]`).
struct MessageSeed<'s> {
    sink: Sink<'s>,
    unknown: Unknown,
}

const MESSAGE_FIELDS: [&str; 2] = ["role", "content"];

impl<'de> DeserializeSeed<'de> for MessageSeed<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_struct("message", &MESSAGE_FIELDS, self)
    }
}

impl<'de> Visitor<'de> for MessageSeed<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a message")
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<(), A::Error> {
        message_map(map, self.sink, self.unknown)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        message_fields(&mut seq, self.sink)
    }
}

/// A message object: `role` may come after `content`, so the role is inserted before the
/// text when it does.
fn message_map<'de, A: MapAccess<'de>>(
    mut map: A,
    mut sink: Sink<'_>,
    unknown: Unknown,
) -> Result<(), A::Error> {
    let start = sink.len();
    let (mut role_seen, mut content_seen) = (false, false);
    while let Some(key) = map.next_key_seed(KeyIndex(&MESSAGE_FIELDS))? {
        match key {
            Some(0) => {
                if std::mem::replace(&mut role_seen, true) {
                    return Err(de::Error::duplicate_field("role"));
                }
                let at = content_seen.then_some(start);
                let written = map.next_value_seed(TextSeed { sink: sink.reborrow(), at })?;
                match at {
                    Some(at) => sink.insert_str(at + written, ": "),
                    None => sink.push_str(": "),
                }
            }
            Some(_) => {
                if std::mem::replace(&mut content_seen, true) {
                    return Err(de::Error::duplicate_field("content"));
                }
                // Written now; a role that comes later is inserted before it.
                map.next_value_seed(ContentSeed { sink: sink.reborrow() })?;
            }
            None => unknown.skip_value(&mut map)?,
        }
    }
    if !role_seen {
        sink.insert_str(start, ": ");
    }
    sink.push_str("\n");
    Ok(())
}

/// A message as the array of its fields: `[role, content]`, both optional (extra elements are
/// refused by serde_json when the array does not end there).
fn message_fields<'de, A: SeqAccess<'de>>(seq: &mut A, mut sink: Sink<'_>) -> Result<(), A::Error> {
    let role = seq.next_element_seed(TextSeed { sink: sink.reborrow(), at: None })?;
    sink.push_str(": ");
    if role.is_none() {
        sink.push_str("\n");
        return Ok(());
    }
    message_after_role(seq, sink)
}

/// The content of a message array whose role is written, and the message's end.
fn message_after_role<'de, A: SeqAccess<'de>>(
    seq: &mut A,
    mut sink: Sink<'_>,
) -> Result<(), A::Error> {
    seq.next_element_seed(ContentSeed { sink: sink.reborrow() })?;
    sink.push_str("\n");
    Ok(())
}

/// An optional string (`null` is none) written to the sink, or inserted at `at`; the result
/// is how many bytes were written.
struct TextSeed<'s> {
    sink: Sink<'s>,
    at: Option<usize>,
}

impl<'de> DeserializeSeed<'de> for TextSeed<'_> {
    type Value = usize;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<usize, D::Error> {
        deserializer.deserialize_option(self)
    }
}

impl<'de> Visitor<'de> for TextSeed<'_> {
    type Value = usize;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string")
    }

    fn visit_none<E: de::Error>(self) -> Result<usize, E> {
        Ok(0)
    }

    fn visit_unit<E: de::Error>(self) -> Result<usize, E> {
        Ok(0)
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<usize, D::Error> {
        deserializer.deserialize_str(self)
    }

    fn visit_str<E: de::Error>(mut self, text: &str) -> Result<usize, E> {
        match self.at {
            Some(at) => self.sink.insert_str(at, text),
            None => self.sink.push_str(text),
        }
        Ok(text.len())
    }
}

/// A message's `content`: `null`, a string, or an array of content parts.
struct ContentSeed<'s> {
    sink: Sink<'s>,
}

impl<'de> DeserializeSeed<'de> for ContentSeed<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_option(self)
    }
}

impl<'de> Visitor<'de> for ContentSeed<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string or an array of content parts")
    }

    fn visit_none<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }

    fn visit_str<E: de::Error>(mut self, text: &str) -> Result<(), E> {
        self.sink.push_str(text);
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(mut self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(PartSeed { sink: self.sink.reborrow() })?.is_some() {}
        Ok(())
    }
}

/// A content part: its `text` is written; an object, or the array `[text]`.
struct PartSeed<'s> {
    sink: Sink<'s>,
}

const PART_FIELDS: [&str; 1] = ["text"];

impl<'de> DeserializeSeed<'de> for PartSeed<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_struct("content part", &PART_FIELDS, self)
    }
}

impl<'de> Visitor<'de> for PartSeed<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a content part")
    }

    fn visit_map<A: MapAccess<'de>>(mut self, mut map: A) -> Result<(), A::Error> {
        let mut text_seen = false;
        while let Some(key) = map.next_key_seed(KeyIndex(&PART_FIELDS))? {
            if key.is_none() {
                map.next_value_seed(CheckValue)?;
            } else if std::mem::replace(&mut text_seen, true) {
                return Err(de::Error::duplicate_field("text"));
            } else {
                map.next_value_seed(TextSeed { sink: self.sink.reborrow(), at: None })?;
            }
        }
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        seq.next_element_seed(TextSeed { sink: self.sink, at: None })?;
        Ok(())
    }
}

/// Any JSON value, read in full and dropped: strings must be valid UTF-8 with valid escapes,
/// numbers in range (what reading it into a generic value would check).
struct CheckValue;

impl<'de> DeserializeSeed<'de> for CheckValue {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for CheckValue {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        Ok(())
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        Ok(())
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        Ok(())
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        Ok(())
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        Ok(())
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(CheckValue)?.is_some() {}
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while map.next_key_seed(CheckValue)?.is_some() {
            map.next_value_seed(CheckValue)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(path: &str, body: &str) -> Result<ParsedBody, BodyError> {
        ParsedBody::parse(Some(path), body.as_bytes())
    }

    #[test]
    fn completions_prompt_is_the_text() {
        let body = parse("/v1/completions", r#"{"model":"m","prompt":"Hello","stream":true}"#);
        let body = body.unwrap();
        assert_eq!(
            (body.model.as_str(), body.prompt.as_str(), body.api, body.stream),
            ("m", "Hello", ApiKind::Completions, true)
        );
    }

    #[test]
    fn chat_messages_flatten_in_order_with_content_parts() {
        let body = parse(
            "/v1/chat/completions",
            r#"{"model":"m","messages":[
                {"role":"system","content":"Be brief."},
                {"role":"user","content":[{"type":"text","text":"Hi "},
                  {"type":"image_url","image_url":{"url":"x"}},{"type":"text","text":"there"}]},
                {"role":"assistant","content":null,"tool_calls":[]}]}"#,
        )
        .unwrap();
        assert_eq!(body.prompt, "system: Be brief.\nuser: Hi there\nassistant: \n");
        assert_eq!(body.api, ApiKind::ChatCompletions);
    }

    #[test]
    fn shared_leading_messages_give_a_shared_prefix() {
        let first = parse(
            "/v1/chat/completions",
            r#"{"model":"m","messages":[{"role":"system","content":"S"},{"role":"user","content":"a"}]}"#,
        )
        .unwrap();
        let second = parse(
            "/v1/chat/completions",
            r#"{"model":"m","messages":[{"role":"system","content":"S"},{"role":"user","content":"b"}]}"#,
        )
        .unwrap();
        assert!(first.prompt.starts_with("system: S\nuser: "));
        assert!(second.prompt.starts_with("system: S\nuser: "));
    }

    #[test]
    fn api_is_inferred_from_fields_without_a_path() {
        let chat = ParsedBody::parse(None, br#"{"model":"m","messages":[]}"#).unwrap();
        assert_eq!(chat.api, ApiKind::ChatCompletions);
        let input = ParsedBody::parse(None, br#"{"model":"m","input":"x"}"#).unwrap();
        assert_eq!((input.api, input.prompt.as_str()), (ApiKind::Responses, "x"));
    }

    #[test]
    fn token_prompts_and_string_arrays_are_accepted() {
        let tokens = parse("/v1/completions", r#"{"model":"m","prompt":[1,2,3]}"#).unwrap();
        assert_eq!(tokens.prompt, "1 2 3 ");
        let texts = parse("/v1/completions", r#"{"model":"m","prompt":["a","b"]}"#).unwrap();
        assert_eq!(texts.prompt, "a\nb\n");
        let embeddings = parse("/v1/embeddings", r#"{"model":"m","input":["a"]}"#).unwrap();
        assert_eq!(embeddings.prompt, "a\n");
    }

    #[test]
    fn errors_name_what_is_wrong() {
        assert_eq!(parse("/v1/completions", "  "), Err(BodyError::Empty));
        assert_eq!(parse("/v1/completions", r#"{"prompt":"x"}"#), Err(BodyError::MissingModel));
        assert_eq!(
            parse("/v1/completions", r#"{"model":" ","prompt":"x"}"#),
            Err(BodyError::MissingModel)
        );
        assert_eq!(
            parse("/v1/chat/completions", r#"{"model":"m","prompt":"x"}"#),
            Err(BodyError::MissingPrompt {
                api: ApiKind::ChatCompletions,
                expected: "\"messages\""
            })
        );
        let Err(BodyError::InvalidJson { line, column, message }) =
            parse("/v1/completions", "{\"model\":\n 3}")
        else {
            panic!("a number for model must be rejected");
        };
        assert_eq!((line, column), (2, 2));
        assert!(message.contains("invalid type"), "{message}");
        let error = parse("/v1/completions", "{not json").unwrap_err();
        assert!(error.to_string().contains("line 1"), "{error}");
    }

    #[test]
    fn anthropic_messages_put_the_system_prompt_first() {
        let body = r#"{"model":"claude","max_tokens":64,"messages":[
            {"role":"user","content":[{"type":"text","text":"Hi"},
              {"type":"image","source":{"type":"base64","data":"AA=="}}]},
            {"role":"assistant","content":"Hello"}],
            "system":[{"type":"text","text":"Be brief."},{"type":"text","text":" Be kind."}],
            "stream":true}"#;
        let parsed = parse("/v1/messages", body).unwrap();
        assert_eq!(parsed.prompt, "system: Be brief. Be kind.\nuser: Hi\nassistant: Hello\n");
        assert_eq!((parsed.api, parsed.stream), (ApiKind::AnthropicMessages, true));
        // A string system prompt, before the messages; none at all; null.
        let parsed = parse(
            "/v1/messages/count_tokens",
            r#"{"model":"c","system":"S","messages":[{"role":"user","content":"Q"}]}"#,
        );
        assert_eq!(parsed.unwrap().prompt, "system: S\nuser: Q\n");
        let parsed = parse("/v1/messages", r#"{"model":"c","system":null,"messages":[]}"#);
        assert_eq!(parsed.unwrap().prompt, "");
        assert_eq!(
            parse("/v1/messages", r#"{"model":"c","system":"S"}"#),
            Err(BodyError::MissingPrompt {
                api: ApiKind::AnthropicMessages,
                expected: "\"messages\""
            })
        );
        assert!(parse("/v1/messages", r#"{"model":"c","system":7,"messages":[]}"#).is_err());
    }

    #[test]
    fn the_fields_of_other_apis_are_skipped_unchecked() {
        // OpenAI bodies may carry keys that other APIs read; they are unknown fields here.
        let parsed = parse(
            "/v1/chat/completions",
            r#"{"model":"m","system":7,"system":{},"token_ids":"x","items":1,"messages":[]}"#,
        );
        assert_eq!(parsed.unwrap().prompt, "");
        let parsed = ParsedBody::parse(None, br#"{"model":"m","token_ids":[1,2],"prompt":"p"}"#);
        assert_eq!(parsed.unwrap().prompt, "p");
    }

    #[test]
    fn vllm_generate_reads_token_ids_and_needs_no_model() {
        let parsed = parse(
            "/inference/v1/generate",
            r#"{"token_ids":[1,22,333],"sampling_params":{"max_tokens":8}}"#,
        )
        .unwrap();
        assert_eq!((parsed.model.as_str(), parsed.prompt.as_str()), ("", "1 22 333 "));
        assert_eq!(parsed.api, ApiKind::VllmGenerate);
        let named = parse("/inference/v1/generate", r#"{"model":"m","token_ids":[5]}"#);
        assert_eq!(named.unwrap().model, "m");
        for refused in [r#"{"token_ids":[]}"#, r#"{"model":"m"}"#] {
            assert_eq!(
                parse("/inference/v1/generate", refused),
                Err(BodyError::MissingPrompt {
                    api: ApiKind::VllmGenerate,
                    expected: "non-empty \"token_ids\""
                })
            );
        }
        assert!(parse("/inference/v1/generate", r#"{"token_ids":"hello"}"#).is_err());
    }

    #[test]
    fn conversations_read_their_items_as_messages() {
        let parsed = parse(
            "/v1/conversations",
            r#"{"model":"m","items":[{"type":"message","role":"user",
                "content":[{"type":"input_text","text":"Hi"}]}]}"#,
        );
        assert_eq!(parsed.unwrap().prompt, "user: Hi\n");
        assert!(parse("/v1/conversations", r#"{"model":"m","items":[]}"#).is_err());
        let images = parse("/v1/images/generations", r#"{"model":"m","prompt":"a cat"}"#).unwrap();
        assert_eq!((images.api, images.prompt.as_str()), (ApiKind::ImageGenerations, "a cat"));
    }

    #[test]
    fn unparsed_bodies_are_not_read() {
        let parsed = ParsedBody::parse_as(Some(ApiKind::Unparsed), b"\x00 not json").unwrap();
        assert_eq!((parsed.model.as_str(), parsed.prompt.as_str()), ("", ""));
    }

    #[test]
    fn api_from_path_ignores_query_and_prefixes() {
        assert_eq!(
            ApiKind::from_path("/openai/v1/chat/completions?x=1"),
            Some(ApiKind::ChatCompletions)
        );
        assert_eq!(ApiKind::from_path("/v1/completions/"), Some(ApiKind::Completions));
        assert_eq!(ApiKind::from_path("/health"), None);
    }

    /// Shapes the format allows beyond the common ones, with the text each flattens to (these
    /// are what the earlier `untagged` parser produced, so prefix hashes are unchanged).
    #[test]
    fn every_accepted_shape_flattens_as_before() {
        let cases: &[(Option<&str>, &str, &str)] = &[
            (Some("/v1/completions"), r#"{"model":"m","prompt":[[1,2],[],[-3]]}"#, "1 2 -3 "),
            (Some("/v1/completions"), r#"{"model":"m","prompt":[]}"#, ""),
            (
                Some("/v1/completions"),
                r#"{"model":"m","prompt":"a\nb\u00e9\ud83d\ude00"}"#,
                "a\nbé😀",
            ),
            (
                Some("/v1/completions"),
                r#"{"model":"m","prompt":[9223372036854775807,-9223372036854775808,0]}"#,
                "9223372036854775807 -9223372036854775808 0 ",
            ),
            (
                Some("/v1/chat/completions"),
                r#"{"model":"m","messages":[{"content":"late role","role":"user"},{"content":"x"},{}]}"#,
                "user: late role\n: x\n: \n",
            ),
            (
                Some("/v1/chat/completions"),
                r#"{"model":"m","messages":[["user","hi"],["a"],[],[null,[["p"],{"text":null}]]]}"#,
                "user: hi\na: \n: \n: p\n",
            ),
            (Some("/v1/responses"), r#"{"model":"m","input":[[],[]]}"#, ""),
            (Some("/v1/responses"), r#"{"model":"m","input":[[],[7]]}"#, "7 "),
            (
                Some("/v1/responses"),
                r#"{"model":"m","input":[[],["user","hi"]]}"#,
                ": \nuser: hi\n",
            ),
            (Some("/v1/responses"), r#"{"model":"m","input":[[],{"role":"r"}]}"#, ": \nr: \n"),
            (Some("/v1/responses"), r#"{"model":"m","input":[[null],[]]}"#, ": \n: \n"),
            (
                Some("/v1/embeddings"),
                r#"{"model":"m","input":[{"role":"u","content":"c"}]}"#,
                "u: c\n",
            ),
            (None, r#"{"model":"m","input":"i","prompt":"p","messages":[]}"#, ""),
            (None, r#"{"model":"m","messages":null,"prompt":"p","input":"i"}"#, "p"),
            (None, r#"{"input":"i","model":"m","prompt":null}"#, "i"),
            (None, r#"["m","p",null,null,true]"#, "p"),
            (Some("/v1/chat/completions"), r#"["m",null,[{"role":"u","content":"c"}]]"#, "u: c\n"),
        ];
        for (path, body, prompt) in cases {
            let parsed = ParsedBody::parse(*path, body.as_bytes());
            assert_eq!(parsed.map(|parsed| parsed.prompt), Ok((*prompt).to_owned()), "{body}");
        }
    }

    /// Bodies the format refuses, each with a clear message (and never a panic).
    #[test]
    fn refused_shapes_are_invalid_json() {
        let cases: &[(&str, &str)] = &[
            (r#"{"model":"m","prompt":[1,"a"]}"#, "expected a token id"),
            (r#"{"model":"m","prompt":["a",1]}"#, "expected a string"),
            (r#"{"model":"m","prompt":[[],1]}"#, "expected an array of token ids"),
            (r#"{"model":"m","prompt":[1.5]}"#, "invalid type: floating point"),
            (r#"{"model":"m","prompt":[-0]}"#, "invalid type: floating point"),
            (r#"{"model":"m","prompt":[9223372036854775808]}"#, "expected a token id"),
            (r#"{"model":"m","prompt":[["user"]]}"#, "expected a token id"),
            (r#"{"model":"m","prompt":[{"role":"u"}]}"#, "invalid type: map"),
            (r#"{"model":"m","prompt":[[[1]]]}"#, "invalid type: sequence"),
            (r#"{"model":"m","prompt":"x","prompt":"y"}"#, "duplicate field `prompt`"),
            (r#"{"model":"m","messages":[{"role":"a","role":"b"}]}"#, "duplicate field `role`"),
            (r#"{"model":"m","messages":[["u","c","extra"]]}"#, "trailing characters"),
            (r#"{"model":"m","messages":[{"content":[{"text":"a","x":1e999}]}]}"#, "out of range"),
            (r#"{"model":"m","messages":[{"content":[{"x":"\ud800"}]}]}"#, "hex escape"),
            (r#"{"model":"m","messages":[{"content":5}]}"#, "expected a string or an array"),
            (r#"{"model":"m","input":[["u"],[1]]}"#, "expected a string"),
            (r#"{"model":"m","input":[{"role":"u"},"a"]}"#, "expected a message"),
            (r#"{"model":"m","input":[null]}"#, "invalid type: null"),
            (r#"{"model":"m","stream":"yes"}"#, "invalid type: string"),
            (r#"{"model":"m","prompt":"x"} x"#, "trailing characters"),
            (r#"5"#, "expected a JSON object"),
        ];
        for (body, expected) in cases {
            let error = ParsedBody::parse(Some("/v1/completions"), body.as_bytes()).unwrap_err();
            let BodyError::InvalidJson { message, .. } = &error else {
                panic!("{body}: {error:?} is not InvalidJson");
            };
            assert!(message.contains(expected), "{body}: {message:?} lacks {expected:?}");
        }
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_stack_overflow() {
        for (prefix, open, close) in [
            (r#"{"model":"m","prompt":"#, "[", "]"),
            (r#"{"model":"m","extra":"#, "[", "]"),
            (r#"{"model":"m","input":"#, "[", "]"),
            (r#"{"model":"m","messages":[{"content":[{"x":"#, "{\"a\":", "}"),
            (r#"{"model":"m","input":[{"x":"#, "[", "]"),
        ] {
            let body = format!("{prefix}{}1{}", open.repeat(100_000), close.repeat(100_000));
            let error = ParsedBody::parse(None, body.as_bytes()).unwrap_err();
            assert!(matches!(error, BodyError::InvalidJson { .. }), "{prefix}: {error:?}");
        }
    }

    /// Properties on generated bodies, valid and broken (duplicates, the array form of
    /// structs, mixed arrays, lone surrogates, invalid UTF-8, out-of-range numbers). The same
    /// generator compared this parser with the `untagged` one it replaced, body for body.
    mod generated {
        use proptest::prelude::*;

        use super::super::ParsedBody;

        type Json = Vec<u8>;

        fn join(open: u8, items: Vec<Json>, close: u8) -> Json {
            let mut out = vec![open];
            for (index, item) in items.into_iter().enumerate() {
                if index > 0 {
                    out.push(b',');
                }
                out.extend(item);
            }
            out.push(close);
            out
        }

        fn array(
            items: impl Strategy<Value = Json> + Clone,
            len: std::ops::Range<usize>,
        ) -> impl Strategy<Value = Json> + Clone {
            prop::collection::vec(items, len).prop_map(|items| join(b'[', items, b']'))
        }

        fn object(
            entries: impl Strategy<Value = (Json, Json)> + Clone,
            len: std::ops::Range<usize>,
        ) -> impl Strategy<Value = Json> + Clone {
            prop::collection::vec(entries, len).prop_map(|entries| {
                let items = entries
                    .into_iter()
                    .map(|(mut key, value)| {
                        key.push(b':');
                        key.extend(value);
                        key
                    })
                    .collect();
                join(b'{', items, b'}')
            })
        }

        fn literal(options: &'static [&'static [u8]]) -> impl Strategy<Value = Json> + Clone {
            prop::sample::select(options).prop_map(<[u8]>::to_vec)
        }

        fn string() -> impl Strategy<Value = Json> + Clone {
            prop_oneof![
                40 => literal(&[
                    b"\"\"", b"\"a\"", b"\"user\"", b"\"system\"", b"\" \"", b"\"hi \\\"x\\\"\\n\"",
                    b"\"\xc3\xa9\"", b"\"\\u00e9\"", b"\"\\ud83d\\ude00\"", b"\"a\\/b\\tc\"",
                ]),
                1 => literal(&[b"\"\\ud800\"", b"\"\\udc00x\"", b"\"\xff\""]),
            ]
        }

        fn number() -> impl Strategy<Value = Json> + Clone {
            prop_oneof![
                30 => literal(&[
                    b"0", b"1", b"42", b"-1", b"9223372036854775807", b"-9223372036854775808",
                ]),
                1 => literal(&[
                    b"-0", b"1.5", b"1e2", b"1e999", b"9223372036854775808",
                    b"-9223372036854775809", b"18446744073709551616",
                ]),
            ]
        }

        fn scalar() -> impl Strategy<Value = Json> + Clone {
            prop_oneof![string(), number(), literal(&[b"null", b"true", b"false"])]
        }

        fn key() -> impl Strategy<Value = Json> + Clone {
            literal(&[
                b"\"model\"",
                b"\"prompt\"",
                b"\"messages\"",
                b"\"input\"",
                b"\"stream\"",
                b"\"role\"",
                b"\"content\"",
                b"\"text\"",
                b"\"type\"",
                b"\"x\"",
                b"\"mod\\u0065l\"",
                b"\"\\ud800\"",
                b"\"\xff\"",
            ])
        }

        fn tree() -> impl Strategy<Value = Json> + Clone {
            scalar().prop_recursive(3, 12, 3, |inner| {
                prop_oneof![array(inner.clone(), 0..3), object((key(), inner), 0..3)]
            })
        }

        fn tokens() -> impl Strategy<Value = Json> + Clone {
            array(prop_oneof![4 => literal(&[b"0", b"7", b"-3", b"128000"]), 1 => number()], 0..4)
        }

        fn prompt() -> impl Strategy<Value = Json> + Clone {
            prop_oneof![
                3 => string(),
                2 => array(string(), 0..4),
                2 => tokens(),
                2 => array(tokens(), 0..4),
                1 => array(prop_oneof![string(), number(), tokens(), array(string(), 0..2)], 0..4),
                1 => tree(),
            ]
        }

        fn part() -> impl Strategy<Value = Json> + Clone {
            prop_oneof![
                6 => fields(
                    vec![
                        (b"\"type\"", literal(&[b"\"text\"", b"\"image_url\""]).boxed()),
                        (b"\"text\"", prop_oneof![6 => string(), 1 => literal(&[b"null"])].boxed()),
                        (b"\"image_url\"", tree().boxed()),
                    ],
                    3,
                ),
                1 => array(prop_oneof![string(), literal(&[b"null"])], 0..3),
                1 => tree(),
            ]
        }

        fn content() -> impl Strategy<Value = Json> + Clone {
            prop_oneof![
                6 => string(),
                1 => literal(&[b"null"]),
                6 => array(part(), 0..3),
                1 => tree(),
            ]
        }

        /// Distinct fields in any order, each present with weight `weight` against 1.
        fn fields(
            entries: Vec<(&'static [u8], BoxedStrategy<Json>)>,
            weight: u32,
        ) -> impl Strategy<Value = Json> + Clone {
            let entries: Vec<_> = entries
                .into_iter()
                .map(|(name, value)| {
                    prop_oneof![
                        weight => value.prop_map(move |value| Some((name.to_vec(), value))),
                        1 => Just(None),
                    ]
                })
                .collect();
            (entries, prop_oneof![1 => (key(), tree()).prop_map(Some), 12 => Just(None)])
                .prop_map(|(entries, extra)| {
                    entries.into_iter().chain([extra]).flatten().collect::<Vec<_>>()
                })
                .prop_shuffle()
                .prop_map(|entries| {
                    let items = entries
                        .into_iter()
                        .map(|(mut key, value)| {
                            key.push(b':');
                            key.extend(value);
                            key
                        })
                        .collect();
                    join(b'{', items, b'}')
                })
        }

        fn message() -> impl Strategy<Value = Json> + Clone {
            let null = || literal(&[b"null"]);
            prop_oneof![
                8 => fields(
                    vec![
                        (b"\"role\"", prop_oneof![8 => string(), 1 => null()].boxed()),
                        (b"\"content\"", content().boxed()),
                        (b"\"name\"", string().boxed()),
                    ],
                    3,
                ),
                2 => array(prop_oneof![string(), null(), content()], 0..3),
                1 => tree(),
            ]
        }

        fn input() -> impl Strategy<Value = Json> + Clone {
            prop_oneof![
                3 => prompt(),
                3 => array(message(), 0..4),
                2 => array(prop_oneof![literal(&[b"[]"]), tokens(), message()], 0..4),
            ]
        }

        fn model() -> impl Strategy<Value = Json> + Clone {
            prop_oneof![16 => literal(&[b"\"m\""]), 2 => string(), 1 => scalar()]
        }

        fn messages() -> impl Strategy<Value = Json> + Clone {
            prop_oneof![8 => array(message(), 0..4), 1 => tree()]
        }

        fn object_body() -> impl Strategy<Value = Json> {
            let null = || literal(&[b"null"]);
            fields(
                vec![
                    (b"\"model\"", model().boxed()),
                    (b"\"prompt\"", prop_oneof![6 => prompt(), 1 => null()].boxed()),
                    (b"\"messages\"", prop_oneof![6 => messages(), 1 => null()].boxed()),
                    (b"\"input\"", prop_oneof![6 => input(), 1 => null()].boxed()),
                    (
                        b"\"stream\"",
                        prop_oneof![4 => literal(&[b"true", b"false"]), 1 => scalar()].boxed(),
                    ),
                    (b"\"x\"", tree().boxed()),
                ],
                2,
            )
        }

        fn body() -> impl Strategy<Value = Json> {
            prop_oneof![
                16 => object_body(),
                1 => array(prop_oneof![model(), prompt(), messages(), input(), scalar()], 0..6),
                1 => tree(),
            ]
        }

        fn path() -> impl Strategy<Value = Option<&'static str>> {
            prop::sample::select(
                &[
                    None,
                    Some("/v1/completions"),
                    Some("/v1/chat/completions"),
                    Some("/v1/responses"),
                    Some("/v1/embeddings"),
                    Some("/v1/messages"),
                    Some("/v1/conversations"),
                    Some("/inference/v1/generate"),
                    Some("/health"),
                ][..],
            )
        }

        /// No panic; a parsed prompt fits the allocation made for it at the body's length
        /// (it never grew), and was shrunk if it used less than half; the model scan agrees.
        fn check(path: Option<&str>, body: &[u8]) -> Result<(), TestCaseError> {
            if let Ok(parsed) = ParsedBody::parse(path, body) {
                prop_assert!(parsed.prompt.len() <= body.len());
                prop_assert!(parsed.prompt.capacity() <= body.len().max(parsed.prompt.len() * 2));
                if parsed.api == crate::ApiKind::VllmGenerate && parsed.model.is_empty() {
                    return Ok(());
                }
                prop_assert!(!parsed.model.trim().is_empty());
                // The model scan (model rewrites, the body-based router) reads the same model
                // without parsing, and a rewrite changes the model and nothing else. (The scan
                // reads objects only; serde's array form of a struct is no client's format.)
                if body.trim_ascii_start().first() != Some(&b'{') {
                    return Ok(());
                }
                let found = crate::model_field::find_model(body);
                let found = found.ok().flatten().map(|field| field.value.into_owned());
                prop_assert_eq!(found.as_deref(), Some(parsed.model.as_str()));
                let rewritten = crate::model_field::rewrite_model(body, "new\"model");
                let rewritten = rewritten.ok().flatten().expect("a model to replace");
                let reparsed = ParsedBody::parse(path, &rewritten).expect("still parses");
                prop_assert_eq!(reparsed.model.as_str(), "new\"model");
                prop_assert_eq!(reparsed.prompt, parsed.prompt);
            }
            Ok(())
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(20_000))]

            #[test]
            fn prompts_fit_the_body(path in path(), body in body()) {
                check(path, &body)?;
            }
        }
    }
}
