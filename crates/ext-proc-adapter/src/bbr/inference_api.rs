//! Which requests the body-based router reads: the JSON inference APIs, by `:path` and
//! `content-type`. Everything else passes through untouched, body unread.

/// Paths of the JSON inference APIs whose body names the model (a query string may follow).
pub const INFERENCE_PATHS: [&str; 5] =
    ["/v1/completions", "/v1/chat/completions", "/v1/responses", "/v1/embeddings", "/v1/messages"];

/// Whether a request with these headers (names lower-cased, as
/// [`ext_proc_proto::header_pairs`] gives them) is a JSON inference request whose body should
/// name the model: its `:path` is one of [`INFERENCE_PATHS`], and its `content-type`, if it
/// has one, is JSON (`application/json` or a `+json` type, any parameters).
pub fn reads_body(headers: &[(String, String)]) -> bool {
    let value = |name: &str| headers.iter().find(|(key, _)| key == name).map(|(_, v)| v.as_str());
    let Some(path) = value(":path") else { return false };
    let path = path.split_once('?').map_or(path, |(path, _)| path);
    INFERENCE_PATHS.contains(&path) && value("content-type").is_none_or(is_json)
}

fn is_json(content_type: &str) -> bool {
    let essence = content_type.split(';').next().unwrap_or_default().trim();
    let Some((kind, subtype)) = essence.split_once('/') else { return false };
    kind.eq_ignore_ascii_case("application")
        && (subtype.eq_ignore_ascii_case("json")
            || subtype.len() > 5 && subtype[subtype.len() - 5..].eq_ignore_ascii_case("+json"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    #[test]
    fn inference_paths_with_or_without_a_query_are_read() {
        for path in INFERENCE_PATHS {
            assert!(reads_body(&headers(&[(":path", path)])), "{path}");
        }
        assert!(reads_body(&headers(&[(":path", "/v1/chat/completions?stream=true")])));
        assert!(!reads_body(&headers(&[(":path", "/v1/audio/transcriptions")])));
        assert!(!reads_body(&headers(&[(":path", "/v1/completions/extra")])));
        assert!(!reads_body(&headers(&[(":path", "/healthz")])));
        assert!(!reads_body(&headers(&[])), "no path, nothing to go by");
    }

    #[test]
    fn only_json_content_types_are_read() {
        let with = |content_type| {
            reads_body(&headers(&[(":path", "/v1/completions"), ("content-type", content_type)]))
        };
        assert!(with("application/json"));
        assert!(with("Application/JSON; charset=utf-8"));
        assert!(with("application/vnd.api+json"));
        assert!(!with("multipart/form-data; boundary=x"));
        assert!(!with("text/plain"));
        assert!(!with("application/x-json-stream"));
        assert!(!with("+json"));
    }
}
