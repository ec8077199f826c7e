//! Bodies of vLLM's gRPC engine API (`vllm.grpc.engine.VllmEngine`), read by
//! `vllmgrpc-parser`: one length-prefixed gRPC message holding a `GenerateRequest` (a text or
//! pre-tokenized prompt) or an `EmbedRequest` (a tokenized input).
//!
//! Only the fields scheduling reads are declared; protobuf skips the others. The messages
//! carry no model name, so the request targets the pool's model (as vLLM's HTTP generate
//! API may). Compressed messages are refused, as llm-d-router refuses them.
//!
//! Also the bodies `vertexai-parser` reads: a Vertex AI `PredictionService` request
//! (`ChatCompletionsRequest`, `RawPredictRequest`, `StreamRawPredictRequest`, each an
//! `endpoint` and a `google.api.HttpBody`), whose `HttpBody.data` is an OpenAI JSON body.

use crate::request::body::{ApiKind, BodyError, ParsedBody};

/// The gRPC message prefix: a compression flag and a big-endian length.
const FRAME_HEADER: usize = 5;

/// `TokenizedInput`: the prompt's token ids.
#[derive(Clone, PartialEq, prost::Message)]
struct TokenizedInput {
    #[prost(uint32, repeated, tag = "2")]
    input_ids: Vec<u32>,
}

/// `GenerateRequest.input`.
#[derive(Clone, PartialEq, prost::Oneof)]
enum GenerateInput {
    #[prost(message, tag = "2")]
    Tokenized(TokenizedInput),
    #[prost(string, tag = "3")]
    Text(String),
}

/// `GenerateRequest`, the fields scheduling reads.
#[derive(Clone, PartialEq, prost::Message)]
struct GenerateRequest {
    #[prost(oneof = "GenerateInput", tags = "2, 3")]
    input: Option<GenerateInput>,
    #[prost(bool, tag = "5")]
    stream: bool,
}

/// `EmbedRequest`, the fields scheduling reads.
#[derive(Clone, PartialEq, prost::Message)]
struct EmbedRequest {
    #[prost(message, optional, tag = "2")]
    tokenized: Option<TokenizedInput>,
}

/// `google.api.HttpBody`, the field read.
#[derive(Clone, PartialEq, prost::Message)]
struct HttpBody {
    #[prost(bytes = "vec", tag = "2")]
    data: Vec<u8>,
}

/// The Vertex AI `PredictionService` requests `vertexai-parser` reads: all three carry the
/// wrapped body in field 2.
#[derive(Clone, PartialEq, prost::Message)]
struct VertexRequest {
    #[prost(message, optional, tag = "2")]
    http_body: Option<HttpBody>,
}

/// The JSON body a Vertex AI gRPC request of `api` wraps in its `HttpBody`.
pub(crate) fn vertex_http_body(api: ApiKind, body: &[u8]) -> Result<Vec<u8>, BodyError> {
    let message = unframe(body)?;
    let request = <VertexRequest as prost::Message>::decode(message).map_err(invalid)?;
    request
        .http_body
        .map(|http_body| http_body.data)
        .ok_or(BodyError::MissingPrompt { api, expected: "\"http_body\"" })
}

/// Reads the gRPC message in `body` as the request of `api`.
pub(crate) fn parse(api: ApiKind, body: &[u8]) -> Result<ParsedBody, BodyError> {
    let message = unframe(body)?;
    let mut prompt = String::new();
    let stream = match api {
        ApiKind::VllmGrpcEmbed => {
            let request = <EmbedRequest as prost::Message>::decode(message).map_err(invalid)?;
            let tokenized = request
                .tokenized
                .ok_or(BodyError::MissingPrompt { api, expected: "\"tokenized\" input" })?;
            write_tokens(&tokenized.input_ids, &mut prompt);
            false
        }
        _ => {
            let request = <GenerateRequest as prost::Message>::decode(message).map_err(invalid)?;
            match request.input {
                Some(GenerateInput::Text(text)) => prompt = text,
                Some(GenerateInput::Tokenized(tokenized)) => {
                    write_tokens(&tokenized.input_ids, &mut prompt)
                }
                None => {
                    return Err(BodyError::MissingPrompt {
                        api,
                        expected: "\"text\" or \"tokenized\" input",
                    });
                }
            }
            request.stream
        }
    };
    Ok(ParsedBody { model: String::new(), prompt, api, stream, message_ends: Vec::new() })
}

/// The message of a gRPC body: one uncompressed length-prefixed message.
fn unframe(body: &[u8]) -> Result<&[u8], BodyError> {
    if body.is_empty() {
        return Err(BodyError::Empty);
    }
    let Some((header, rest)) = body.split_first_chunk::<FRAME_HEADER>() else {
        return Err(BodyError::InvalidGrpc {
            message: format!("{} bytes, shorter than the 5-byte message header", body.len()),
        });
    };
    let [compressed, length @ ..] = *header;
    if compressed != 0 {
        return Err(BodyError::InvalidGrpc {
            message: "compressed gRPC messages are not supported".into(),
        });
    }
    let length = u32::from_be_bytes(length) as usize;
    rest.get(..length).ok_or_else(|| BodyError::InvalidGrpc {
        message: format!("the header announces {length} bytes but only {} follow", rest.len()),
    })
}

fn invalid(error: prost::DecodeError) -> BodyError {
    BodyError::InvalidGrpc { message: error.to_string() }
}

/// Token ids as the JSON bodies' token lists are written: each in decimal and a space, so
/// that equal token prefixes give equal text prefixes.
pub(crate) fn write_tokens(tokens: &[u32], prompt: &mut String) {
    prompt.reserve(tokens.len() * 7);
    let mut digits = [0u8; 10];
    for &token in tokens {
        let mut at = digits.len();
        let mut rest = token;
        loop {
            at -= 1;
            digits[at] = b'0' + (rest % 10) as u8;
            rest /= 10;
            if rest == 0 {
                break;
            }
        }
        prompt.extend(digits[at..].iter().map(|&digit| char::from(digit)));
        prompt.push(' ');
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;

    fn framed(message: &impl Message) -> Vec<u8> {
        let payload = message.encode_to_vec();
        let mut body = vec![0];
        body.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        body.extend_from_slice(&payload);
        body
    }

    #[test]
    fn generate_reads_text_or_tokens_and_stream() {
        let text = GenerateRequest {
            input: Some(GenerateInput::Text("hello there".into())),
            stream: true,
        };
        let parsed = parse(ApiKind::VllmGrpcGenerate, &framed(&text)).unwrap();
        assert_eq!((parsed.prompt.as_str(), parsed.stream), ("hello there", true));
        assert_eq!(parsed.model, "");

        let tokens = GenerateRequest {
            input: Some(GenerateInput::Tokenized(TokenizedInput { input_ids: vec![1, 22, 333] })),
            stream: false,
        };
        let parsed = parse(ApiKind::VllmGrpcGenerate, &framed(&tokens)).unwrap();
        assert_eq!(parsed.prompt, "1 22 333 ");
    }

    #[test]
    fn embed_needs_a_tokenized_input() {
        let embed = EmbedRequest { tokenized: Some(TokenizedInput { input_ids: vec![7, 8] }) };
        assert_eq!(parse(ApiKind::VllmGrpcEmbed, &framed(&embed)).unwrap().prompt, "7 8 ");
        let empty = EmbedRequest { tokenized: None };
        assert!(matches!(
            parse(ApiKind::VllmGrpcEmbed, &framed(&empty)),
            Err(BodyError::MissingPrompt { .. })
        ));
    }

    /// A Vertex AI request as a client builds it: `endpoint` (1) and `http_body` (2), the
    /// body's `content_type` (1) and `data` (2).
    fn vertex_request(json: &str) -> Vec<u8> {
        #[derive(Clone, PartialEq, prost::Message)]
        struct FullHttpBody {
            #[prost(string, tag = "1")]
            content_type: String,
            #[prost(bytes = "vec", tag = "2")]
            data: Vec<u8>,
        }
        #[derive(Clone, PartialEq, prost::Message)]
        struct FullRequest {
            #[prost(string, tag = "1")]
            endpoint: String,
            #[prost(message, optional, tag = "2")]
            http_body: Option<FullHttpBody>,
        }
        framed(&FullRequest {
            endpoint: "projects/p/locations/us-central1/endpoints/e".into(),
            http_body: Some(FullHttpBody {
                content_type: "application/json".into(),
                data: json.as_bytes().to_vec(),
            }),
        })
    }

    #[test]
    fn vertex_requests_wrap_an_openai_body() {
        let chat = vertex_request(
            r#"{"model":"google/gemma","messages":[{"role":"user","content":"Hi there"}],"stream":true}"#,
        );
        let parsed = ParsedBody::parse_as(Some(ApiKind::VertexAiChatCompletions), &chat).unwrap();
        assert_eq!(parsed.model, "google/gemma");
        assert_eq!(parsed.api, ApiKind::ChatCompletions);
        assert!(parsed.stream && parsed.prompt.contains("Hi there"), "{parsed:?}");
        let raw = vertex_request(r#"{"model":"m","input":"Tell me a story"}"#);
        let parsed = ParsedBody::parse_as(Some(ApiKind::VertexAiRawPredict), &raw).unwrap();
        assert_eq!(
            (parsed.api, parsed.prompt.contains("Tell me a story")),
            (ApiKind::Responses, true)
        );
        // The wrapped body is checked as the OpenAI parser checks it.
        let no_model = vertex_request(r#"{"messages":[{"role":"user","content":"x"}]}"#);
        assert_eq!(
            ParsedBody::parse_as(Some(ApiKind::VertexAiChatCompletions), &no_model),
            Err(BodyError::MissingModel)
        );
        let empty = framed(&VertexRequest { http_body: None });
        assert!(matches!(
            ParsedBody::parse_as(Some(ApiKind::VertexAiChatCompletions), &empty),
            Err(BodyError::MissingPrompt { .. })
        ));
        assert_eq!(
            ParsedBody::parse_as(Some(ApiKind::VertexAiRawPredict), b""),
            Err(BodyError::Empty)
        );
    }

    #[test]
    fn broken_frames_are_named() {
        let request =
            GenerateRequest { input: Some(GenerateInput::Text("x".into())), stream: false };
        let body = framed(&request);
        let error = |body: &[u8]| parse(ApiKind::VllmGrpcGenerate, body).unwrap_err().to_string();
        assert_eq!(parse(ApiKind::VllmGrpcGenerate, b""), Err(BodyError::Empty));
        assert!(error(&body[..3]).contains("5-byte"));
        assert!(error(&body[..body.len() - 1]).contains("announces"));
        let mut compressed = body.clone();
        compressed[0] = 1;
        assert!(error(&compressed).contains("compressed"));
        let mut garbage = vec![0, 0, 0, 0, 2];
        garbage.extend_from_slice(&[0xff, 0xff]);
        assert!(error(&garbage).contains("gRPC"));
        let none = GenerateRequest { input: None, stream: false };
        assert!(error(&framed(&none)).contains("\"text\" or \"tokenized\""));
    }
}
