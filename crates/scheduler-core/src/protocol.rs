//! Names of the endpoint-picker protocol (GIE v1): the headers a request carries to the picker
//! and the picker writes for the proxy, and the Envoy dynamic-metadata keys of the same values.
//! Defined once here; every adapter and tool reads them from this module.

/// Header naming the InferenceObjective (and so the priority) of a request, as llm-d-router
/// names it. Wins over [`OBJECTIVE_HEADER`] when a request carries both.
pub const LLM_D_OBJECTIVE_HEADER: &str = "x-llm-d-inference-objective";
/// Older name of [`LLM_D_OBJECTIVE_HEADER`] (GIE's), still read as an alias.
pub const OBJECTIVE_HEADER: &str = "x-gateway-inference-objective";
/// Header naming the flow (tenant) a request belongs to, for fair queuing, as llm-d-router
/// names it. Wins over [`FAIRNESS_ID_HEADER`] when a request carries both.
pub const LLM_D_FAIRNESS_ID_HEADER: &str = "x-llm-d-inference-fairness-id";
/// Older name of [`LLM_D_FAIRNESS_ID_HEADER`] (GIE's), still read as an alias.
pub const FAIRNESS_ID_HEADER: &str = "x-gateway-inference-fairness-id";
/// Header carrying the model name the request is to be served by: read when the gateway sets
/// it, and written (with [`MODEL_REWRITE_HEADER`]) when a model rewrite chose another
/// model than the body named. llm-d-router's name.
pub const LLM_D_MODEL_REWRITE_HEADER: &str = "x-llm-d-model-name-rewrite";
/// The older (GIE) name of [`LLM_D_MODEL_REWRITE_HEADER`], still read and written.
pub const MODEL_REWRITE_HEADER: &str = "x-gateway-model-name-rewrite";
/// Header through which a client or proxy passes a request id.
pub const REQUEST_ID_HEADER: &str = "x-request-id";
/// Header (and `envoy.lb` metadata key) carrying the chosen endpoint to the proxy: `ip:port`,
/// or a comma-separated list, primary first, when fallbacks are emitted.
pub const DESTINATION_ENDPOINT_HEADER: &str = "x-gateway-destination-endpoint";
/// Dynamic metadata namespace the proxy's load balancer reads the destination from.
pub const LB_METADATA_NAMESPACE: &str = "envoy.lb";
/// Metadata namespace of the proxy's subset hint.
pub const SUBSET_HINT_NAMESPACE: &str = "envoy.lb.subset_hint";
/// Key of the subset hint: the endpoints the request may go to.
pub const SUBSET_HINT_KEY: &str = "x-gateway-destination-endpoint-subset";
/// Key (in [`LB_METADATA_NAMESPACE`]) of the endpoint that actually served the request,
/// reported by the proxy on the response.
pub const SERVED_ENDPOINT_KEY: &str = "x-gateway-destination-endpoint-served";
/// Response header naming why the picker dropped a request (`rejected-no-endpoints`,
/// `rejected-saturated`, `rejected-ttl-expired`, `rejected-context-cancelled`), on its 429 and
/// 503 answers. llm-d-router's name.
pub const REQUEST_DROPPED_REASON_HEADER: &str = "x-llm-d-request-dropped-reason";
/// Key (in [`LB_METADATA_NAMESPACE`]) of the scheduler's score of each endpoint named in the
/// destination (a struct `ip:port` -> number); emitted only when asked for
/// (`--emit-endpoint-scores`).
pub const DESTINATION_ENDPOINT_SCORES_KEY: &str = "x-gateway-destination-endpoint-scores";
/// Request header naming the prefill endpoint (`ip:port`) of a disaggregated request, for the
/// decode endpoint's sidecar to fetch the KV cache from; the destination stays the decode
/// endpoint. llm-d-router's name (`routing.PrefillEndpointHeader`).
pub const PREFILL_ENDPOINT_HEADER: &str = "x-prefiller-host-port";
/// Request header listing the endpoints (`ip:port`, comma-separated) that encode the request's
/// multimodal inputs. llm-d-router's name (`routing.EncoderEndpointsHeader`).
pub const ENCODER_ENDPOINTS_HEADER: &str = "x-encoder-hosts-ports";
/// Request header naming the data-parallel rank (`ip:port`) chosen for a request whose
/// destination is its pod's primary port. llm-d-router's name
/// (`routing.DataParallelEndpointHeader`).
pub const DATA_PARALLEL_ENDPOINT_HEADER: &str = "x-data-parallel-host-port";
/// Request header naming a peer endpoint (`ip:port`) holding more of the prompt's KV cache,
/// for the routing sidecar to pull over the P2P connector (`p2p-source-producer`).
/// llm-d-router's name (`routing.KVCacheSourceHeader`).
pub const KV_CACHE_SOURCE_HEADER: &str = "x-kv-cache-source-host-port";
/// The routing headers the picker alone writes: the adapters remove what a client sent under
/// these names when the decision does not set them, so a client cannot steer a sidecar.
pub const ROUTING_REQUEST_HEADERS: [&str; 4] = [
    PREFILL_ENDPOINT_HEADER,
    ENCODER_ENDPOINTS_HEADER,
    DATA_PARALLEL_ENDPOINT_HEADER,
    KV_CACHE_SOURCE_HEADER,
];
