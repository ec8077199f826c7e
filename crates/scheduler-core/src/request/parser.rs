//! Which parser reads a request body, chosen by the request's path as llm-d-router chooses:
//! the `requestHandler.parsers` of the config, each claiming path suffixes, the longest
//! matching suffix winning, and a parser that claims no path (`passthrough-parser`) taking
//! whatever none of the others claims.
//!
//! ```
//! use scheduler_core::{ApiKind, ParserTable, RequestParser};
//!
//! let parsers = ParserTable::default(); // openai, anthropic, vllmhttp, then passthrough
//! assert_eq!(
//!     parsers.resolve("/v1/chat/completions?stream=true"),
//!     Some((RequestParser::OpenAi, ApiKind::ChatCompletions)),
//! );
//! assert_eq!(
//!     parsers.resolve("/v1/messages"),
//!     Some((RequestParser::Anthropic, ApiKind::AnthropicMessages)),
//! );
//! assert_eq!(parsers.resolve("/v1/rerank"), Some((RequestParser::Passthrough, ApiKind::Unparsed)));
//!
//! // An explicit list gains no fallback: a path no parser claims is refused.
//! let openai_only = ParserTable::new([RequestParser::OpenAi]);
//! assert_eq!(openai_only.resolve("/v1/rerank"), None);
//! ```

use std::fmt;

use crate::request::body::ApiKind;

/// A request parser plugin of llm-d-router.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RequestParser {
    /// `openai-parser`: the OpenAI APIs.
    OpenAi,
    /// `anthropic-parser`: Anthropic's Messages API.
    Anthropic,
    /// `vllmhttp-parser`: vLLM's `/inference/v1/generate` (pre-tokenized prompts).
    VllmHttp,
    /// `passthrough-parser`: claims no path; the body is not read, and the request is
    /// scheduled on load and headers alone.
    Passthrough,
    /// `vllmgrpc-parser`: vLLM's gRPC engine API (`Generate` and `Embed`, HTTP/2 cleartext).
    /// Not in the default list, as in llm-d-router.
    VllmGrpc,
    /// `sglanghttp-parser`: SGLang's native `/generate` (a pre-tokenized prompt). Not in the
    /// default list.
    SglangHttp,
    /// `vertexai-parser`: Vertex AI's gRPC `PredictionService` (`ChatCompletions`,
    /// `RawPredict`, `StreamRawPredict`), whose `HttpBody` wraps an OpenAI body. Not in the
    /// default list.
    VertexAi,
}

/// Path suffixes each parser claims, with the API a body sent there is read as.
const OPENAI_CLAIMS: &[(&str, ApiKind)] = &[
    ("chat/completions", ApiKind::ChatCompletions),
    ("completions", ApiKind::Completions),
    ("embeddings", ApiKind::Embeddings),
    ("responses", ApiKind::Responses),
    ("conversations", ApiKind::Conversations),
    ("chat/completions/render", ApiKind::ChatCompletions),
    ("completions/render", ApiKind::Completions),
    ("images/generations", ApiKind::ImageGenerations),
];
const ANTHROPIC_CLAIMS: &[(&str, ApiKind)] = &[
    ("v1/messages", ApiKind::AnthropicMessages),
    ("v1/messages/count_tokens", ApiKind::AnthropicMessages),
];
const VLLM_HTTP_CLAIMS: &[(&str, ApiKind)] = &[("inference/v1/generate", ApiKind::VllmGenerate)];
/// SGLang claims `generate` and reads only the path `/generate` itself (see [`longest_claim`]).
const SGLANG_HTTP_CLAIMS: &[(&str, ApiKind)] = &[("generate", ApiKind::SglangGenerate)];
const VERTEX_AI_CLAIMS: &[(&str, ApiKind)] = &[
    ("PredictionService/ChatCompletions", ApiKind::VertexAiChatCompletions),
    ("PredictionService/StreamRawPredict", ApiKind::VertexAiRawPredict),
    ("PredictionService/RawPredict", ApiKind::VertexAiRawPredict),
];
const VLLM_GRPC_CLAIMS: &[(&str, ApiKind)] = &[
    ("vllm.grpc.engine.VllmEngine/Generate", ApiKind::VllmGrpcGenerate),
    ("vllm.grpc.engine.VllmEngine/Embed", ApiKind::VllmGrpcEmbed),
];

impl RequestParser {
    /// llm-d-router's default list, in its order.
    pub const DEFAULTS: [Self; 4] =
        [Self::OpenAi, Self::Anthropic, Self::VllmHttp, Self::Passthrough];

    /// Every parser type.
    pub const ALL: [Self; 7] = [
        Self::OpenAi,
        Self::Anthropic,
        Self::VllmHttp,
        Self::Passthrough,
        Self::VllmGrpc,
        Self::SglangHttp,
        Self::VertexAi,
    ];

    /// The plugin type name.
    pub const fn type_name(self) -> &'static str {
        match self {
            Self::OpenAi => "openai-parser",
            Self::Anthropic => "anthropic-parser",
            Self::VllmHttp => "vllmhttp-parser",
            Self::Passthrough => "passthrough-parser",
            Self::VllmGrpc => "vllmgrpc-parser",
            Self::SglangHttp => "sglanghttp-parser",
            Self::VertexAi => "vertexai-parser",
        }
    }

    /// The parser of a plugin type name.
    pub fn from_type_name(type_name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|parser| parser.type_name() == type_name)
    }

    /// The path suffixes it claims (none: it takes what no other parser claims).
    fn claims(self) -> &'static [(&'static str, ApiKind)] {
        match self {
            Self::OpenAi => OPENAI_CLAIMS,
            Self::Anthropic => ANTHROPIC_CLAIMS,
            Self::VllmHttp => VLLM_HTTP_CLAIMS,
            Self::Passthrough => &[],
            Self::VllmGrpc => VLLM_GRPC_CLAIMS,
            Self::SglangHttp => SGLANG_HTTP_CLAIMS,
            Self::VertexAi => VERTEX_AI_CLAIMS,
        }
    }
}

impl fmt::Display for RequestParser {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.type_name())
    }
}

/// The parsers in force, resolved once from the config's list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParserTable {
    /// Parsers that claim paths, each type once, in the order listed.
    claiming: Vec<RequestParser>,
    /// The parser that takes unclaimed paths, if one is listed.
    fallback: Option<RequestParser>,
}

impl Default for ParserTable {
    /// llm-d-router's defaults: OpenAI, Anthropic and vLLM HTTP, then passthrough for
    /// anything else.
    fn default() -> Self {
        Self::new(RequestParser::DEFAULTS)
    }
}

impl ParserTable {
    /// The table of `parsers` as listed. As llm-d-router does, a type listed twice counts
    /// once, and the first parser that claims no path ends the list: it takes every path
    /// the ones before it do not claim, so parsers after it are never consulted.
    pub fn new(parsers: impl IntoIterator<Item = RequestParser>) -> Self {
        let mut table = Self { claiming: Vec::new(), fallback: None };
        for parser in parsers {
            if parser.claims().is_empty() {
                table.fallback = Some(parser);
                break;
            }
            if !table.claiming.contains(&parser) {
                table.claiming.push(parser);
            }
        }
        table
    }

    /// The parser for a request to `path` and the API it reads the body as; `None` when no
    /// listed parser claims the path and none takes the rest (llm-d-router answers 400).
    ///
    /// The query string is ignored and the longest claimed suffix wins. A suffix must start
    /// at a path segment or after a `.` (`/v1/xcompletions` is not `completions`, a gRPC
    /// method `/google.cloud.aiplatform.v1.PredictionService/RawPredict` is
    /// `PredictionService/RawPredict`), where llm-d-router compares bare strings. SGLang's
    /// `generate` matches the path `/generate` alone: llm-d-router's parser claims the
    /// suffix but refuses any other path it is given.
    pub fn resolve(&self, path: &str) -> Option<(RequestParser, ApiKind)> {
        longest_claim(&self.claiming, path)
            .or_else(|| self.fallback.map(|parser| (parser, ApiKind::Unparsed)))
    }

    /// The parsers consulted, in order (the fallback last).
    pub fn parsers(&self) -> impl Iterator<Item = RequestParser> + '_ {
        self.claiming.iter().copied().chain(self.fallback)
    }
}

/// The parser among `parsers` claiming the longest suffix of `path`, and its API.
pub(crate) fn longest_claim(
    parsers: &[RequestParser],
    path: &str,
) -> Option<(RequestParser, ApiKind)> {
    let path = path.split('?').next().unwrap_or(path).trim().trim_end_matches('/');
    let mut best: Option<(RequestParser, ApiKind, usize)> = None;
    for &parser in parsers {
        for &(suffix, api) in parser.claims() {
            let longer = best.is_none_or(|(_, _, length)| suffix.len() > length);
            let matches = if parser == RequestParser::SglangHttp {
                path.trim_start_matches('/') == suffix
            } else {
                ends_with_segments(path, suffix)
            };
            if longer && matches {
                best = Some((parser, api, suffix.len()));
            }
        }
    }
    best.map(|(parser, api, _)| (parser, api))
}

/// Whether `path` ends with the segments of `suffix` (or a `.`-qualified name ending so).
fn ends_with_segments(path: &str, suffix: &str) -> bool {
    path.strip_suffix(suffix)
        .is_some_and(|head| head.is_empty() || head.ends_with('/') || head.ends_with('.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_longest_claimed_suffix_wins_whatever_the_order() {
        let table = ParserTable::new([RequestParser::OpenAi, RequestParser::Anthropic]);
        assert_eq!(
            table.resolve("/v1/chat/completions/render"),
            Some((RequestParser::OpenAi, ApiKind::ChatCompletions))
        );
        assert_eq!(
            table.resolve("/v1/completions/render/"),
            Some((RequestParser::OpenAi, ApiKind::Completions))
        );
        assert_eq!(
            table.resolve("/v1/messages/count_tokens"),
            Some((RequestParser::Anthropic, ApiKind::AnthropicMessages))
        );
        assert_eq!(
            table.resolve("/v1/projects/p/locations/l/endpoints/openapi/chat/completions"),
            Some((RequestParser::OpenAi, ApiKind::ChatCompletions))
        );
        assert_eq!(
            ParserTable::default().resolve("/inference/v1/generate"),
            Some((RequestParser::VllmHttp, ApiKind::VllmGenerate))
        );
    }

    #[test]
    fn suffixes_match_whole_segments() {
        let table = ParserTable::new([RequestParser::OpenAi]);
        assert_eq!(table.resolve("/v1/xcompletions"), None);
        assert_eq!(table.resolve("/v1/messages"), None, "anthropic is not listed");
        assert_eq!(
            table.resolve("completions"),
            Some((RequestParser::OpenAi, ApiKind::Completions))
        );
    }

    #[test]
    fn the_first_fallback_ends_the_list_and_duplicates_count_once() {
        let table = ParserTable::new([
            RequestParser::OpenAi,
            RequestParser::OpenAi,
            RequestParser::Passthrough,
            RequestParser::Anthropic,
        ]);
        assert_eq!(
            table.parsers().collect::<Vec<_>>(),
            [RequestParser::OpenAi, RequestParser::Passthrough]
        );
        assert_eq!(
            table.resolve("/v1/messages"),
            Some((RequestParser::Passthrough, ApiKind::Unparsed)),
            "anthropic comes after the fallback and is never consulted"
        );
    }

    #[test]
    fn sglang_and_vertex_paths_resolve_as_go_resolves_them() {
        let table = ParserTable::new([
            RequestParser::OpenAi,
            RequestParser::VllmHttp,
            RequestParser::SglangHttp,
            RequestParser::VertexAi,
        ]);
        assert_eq!(
            table.resolve("/generate/"),
            Some((RequestParser::SglangHttp, ApiKind::SglangGenerate))
        );
        assert_eq!(
            table.resolve("/inference/v1/generate"),
            Some((RequestParser::VllmHttp, ApiKind::VllmGenerate)),
            "the longer vLLM claim wins"
        );
        assert_eq!(table.resolve("/v1/generate"), None, "SGLang reads /generate alone");
        for (method, api) in [
            ("ChatCompletions", ApiKind::VertexAiChatCompletions),
            ("RawPredict", ApiKind::VertexAiRawPredict),
            ("StreamRawPredict", ApiKind::VertexAiRawPredict),
        ] {
            let path = format!("/google.cloud.aiplatform.v1beta1.PredictionService/{method}");
            assert_eq!(table.resolve(&path), Some((RequestParser::VertexAi, api)), "{path}");
        }
        assert_eq!(table.resolve("/google.cloud.aiplatform.v1.PredictionService/Predict"), None);
        assert!(!RequestParser::DEFAULTS.contains(&RequestParser::SglangHttp));
        assert!(!RequestParser::DEFAULTS.contains(&RequestParser::VertexAi));
    }

    #[test]
    fn type_names_round_trip() {
        for parser in RequestParser::ALL {
            assert_eq!(RequestParser::from_type_name(parser.type_name()), Some(parser));
        }
        assert_eq!(RequestParser::from_type_name("vllmgrpc-parser"), Some(RequestParser::VllmGrpc));
        assert_eq!(RequestParser::from_type_name("vllmgrpc"), None);
    }
}
