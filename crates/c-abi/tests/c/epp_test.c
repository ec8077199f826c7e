/* End-to-end test of the epp C API, from C: build a picker from YAML, describe a pool, schedule,
 * complete, and check every error path the header documents. Exits 0 when all checks pass. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "epp.h"

static int failures = 0;

#define CHECK(cond)                                                                 \
  do {                                                                              \
    if (!(cond)) {                                                                  \
      char message_[512];                                                           \
      epp_last_error_message(message_, sizeof message_);                            \
      fprintf(stderr, "%s:%d: check failed: %s (last error: %s)\n", __FILE__,       \
              __LINE__, #cond, message_);                                           \
      failures++;                                                                   \
    }                                                                               \
  } while (0)

static const char CONFIG[] =
    "apiVersion: inference.networking.x-k8s.io/v1alpha1\n"
    "kind: EndpointPickerConfig\n"
    "plugins:\n"
    "- type: queue-scorer\n"
    "- type: kv-cache-utilization-scorer\n"
    "- type: max-score-picker\n"
    "  parameters:\n"
    "    maxNumOfEndpoints: 3\n"
    "schedulingProfiles:\n"
    "- name: default\n"
    "  plugins:\n"
    "  - pluginRef: queue-scorer\n"
    "    weight: 2\n"
    "  - pluginRef: kv-cache-utilization-scorer\n"
    "    weight: 2\n"
    "  - pluginRef: max-score-picker\n";

/* Sheds on saturation: an endpoint is full at 5 waiting requests or 80% KV cache. The long
 * staleness window keeps metrics set by the test fresh however slow the machine. */
static const char SHED_CONFIG[] =
    "plugins:\n"
    "- type: queue-scorer\n"
    "- type: max-score-picker\n"
    "saturationDetector:\n"
    "  queueDepthThreshold: 5\n"
    "  kvCacheUtilThreshold: 0.8\n"
    "  metricsStalenessThreshold: 1m\n";

static const char OBJECTIVES[] =
    "- name: batch\n"
    "  priority: -1\n"
    "- name: chat\n"
    "  priority: 2\n";

/* Queueing flow control over endpoints that take one request at a time; a queued request
 * gives up after 30 ms. */
static const char QUEUE_CONFIG[] =
    "featureGates: [flowControl]\n"
    "plugins:\n"
    "- type: concurrency-detector\n"
    "  parameters: {maxConcurrency: 1}\n"
    "- type: queue-scorer\n"
    "- type: max-score-picker\n"
    "schedulingProfiles:\n"
    "- name: default\n"
    "  plugins:\n"
    "  - pluginRef: queue-scorer\n"
    "  - pluginRef: max-score-picker\n"
    "saturationDetector: {pluginRef: concurrency-detector}\n"
    "flowControl: {defaultRequestTTL: 30ms}\n";

static const char CHAT[] =
    "{\"model\":\"llama\",\"messages\":[{\"role\":\"user\",\"content\":\"Hello there\"}]}";

static EppHeader header(const char *name, const char *value) {
  EppHeader h = {name, strlen(name), value, strlen(value)};
  return h;
}

static int32_t schedule(const EppScheduler *epp, const char *body, char *out, size_t cap,
                        size_t max_endpoints, uint64_t *token, int32_t *http) {
  EppHeader headers[2] = {header(":path", "/v1/chat/completions"), header("x-request-id", "c-1")};
  return epp_schedule(epp, (const uint8_t *)body, strlen(body), headers, 2, out, cap,
                      max_endpoints, token, http);
}

static int32_t schedule_objective(const EppScheduler *epp, const char *objective, char *out,
                                  size_t cap, uint64_t *token, int32_t *http) {
  EppHeader headers[2] = {header(":path", "/v1/chat/completions"),
                          header("x-gateway-inference-objective", objective)};
  return epp_schedule(epp, (const uint8_t *)CHAT, strlen(CHAT), headers, 2, out, cap, 0, token,
                      http);
}

static void set_load(EppScheduler *epp, const char *address, uint32_t queue, double kv) {
  EppEndpointMetrics metrics;
  memset(&metrics, 0, sizeof metrics);
  metrics.waiting_queue = queue;
  metrics.running = 2;
  metrics.kv_usage = kv;
  metrics.max_lora = 4;
  metrics.active_loras = "sql-lora, chat-lora";
  metrics.waiting_loras = NULL;
  CHECK(epp_endpoint_set_metrics(epp, address, &metrics) == EPP_STATUS_OK);
}

static void *hammer(void *arg) {
  const EppScheduler *epp = arg;
  for (int i = 0; i < 200; i++) {
    char out[128];
    uint64_t token = 0;
    int32_t http = 0;
    if (schedule(epp, CHAT, out, sizeof out, 0, &token, &http) != EPP_STATUS_OK ||
        epp_request_complete(epp, token, 3, 5, EPP_OUTCOME_COMPLETED) != EPP_STATUS_OK) {
      return (void *)1;
    }
  }
  return NULL;
}

int main(void) {
  char out[256];
  uint64_t token = 0;
  int32_t http = 0;

  /* A garbage config is refused with a message. */
  const char garbage[] = "plugins: [ {type: no-such-plugin} ]";
  CHECK(epp_scheduler_new(garbage, sizeof garbage - 1) == NULL);
  CHECK(epp_last_error_message(NULL, 0) > 0);
  char message[256];
  size_t length = epp_last_error_message(message, sizeof message);
  CHECK(length > 0 && strlen(message) == (length < sizeof message ? length : sizeof message - 1));
  CHECK(strstr(message, "no-such-plugin") != NULL);
  const char not_yaml[] = "\x01\x02: : [";
  CHECK(epp_scheduler_new(not_yaml, sizeof not_yaml - 1) == NULL);
  const char bad_utf8[] = "kind: \xff\xfe";
  CHECK(epp_scheduler_new(bad_utf8, sizeof bad_utf8 - 1) == NULL);

  EppScheduler *epp = epp_scheduler_new(CONFIG, strlen(CONFIG));
  CHECK(epp != NULL);
  if (epp == NULL) return 1;

  /* Three replicas; 10.0.0.2 is the least loaded, then 10.0.0.3, then 10.0.0.1. */
  CHECK(epp_endpoint_upsert(epp, "10.0.0.1:8000", "vllm-0") == EPP_STATUS_OK);
  CHECK(epp_endpoint_upsert(epp, "10.0.0.2:8000", "vllm-1") == EPP_STATUS_OK);
  CHECK(epp_endpoint_upsert(epp, "10.0.0.3:8000", NULL) == EPP_STATUS_OK);
  set_load(epp, "10.0.0.1:8000", 12, 0.90);
  set_load(epp, "10.0.0.2:8000", 0, 0.10);
  set_load(epp, "10.0.0.3:8000", 4, 0.50);

  CHECK(schedule(epp, CHAT, out, sizeof out, 1, &token, &http) == EPP_STATUS_OK);
  CHECK(strcmp(out, "10.0.0.2:8000") == 0);
  CHECK(http == 200);
  CHECK(token != 0);
  CHECK(epp_in_flight_count(epp) == 1);
  CHECK(epp_request_set_served_endpoint(epp, token, "10.0.0.2:8000") == EPP_STATUS_OK);
  CHECK(epp_request_complete(epp, token, 12, 34, EPP_OUTCOME_COMPLETED) == EPP_STATUS_OK);
  CHECK(epp_request_complete(epp, token, 12, 34, EPP_OUTCOME_COMPLETED) ==
        EPP_STATUS_UNKNOWN_TOKEN);
  CHECK(epp_in_flight_count(epp) == 0);

  /* Fallbacks: every ranked endpoint, best first. */
  CHECK(schedule(epp, CHAT, out, sizeof out, 0, &token, &http) == EPP_STATUS_OK);
  CHECK(strcmp(out, "10.0.0.2:8000,10.0.0.3:8000,10.0.0.1:8000") == 0);
  CHECK(epp_request_complete(epp, token, 0, 0, 7) == EPP_STATUS_INVALID_ARGUMENT);
  CHECK(epp_request_complete(epp, token, 0, 0, EPP_OUTCOME_FAILED) == EPP_STATUS_OK);

  /* A buffer one byte short is refused, not truncated, and nothing stays in flight. */
  size_t needed = strlen("10.0.0.2:8000,10.0.0.3:8000") + 1;
  memset(out, 'x', sizeof out);
  CHECK(schedule(epp, CHAT, out, needed - 1, 2, &token, &http) == EPP_STATUS_BUFFER_TOO_SMALL);
  CHECK(out[0] == '\0' && token == 0 && http == 500);
  CHECK(epp_in_flight_count(epp) == 0);
  CHECK(schedule(epp, CHAT, out, needed, 2, &token, &http) == EPP_STATUS_OK);
  CHECK(strcmp(out, "10.0.0.2:8000,10.0.0.3:8000") == 0);
  CHECK(epp_request_complete(epp, token, 0, 0, EPP_OUTCOME_CANCELLED) == EPP_STATUS_OK);

  /* A malformed body is a 400, an oversized one a 413. */
  CHECK(schedule(epp, "{\"model\": ", out, sizeof out, 1, &token, &http) == EPP_STATUS_BAD_REQUEST);
  CHECK(http == 400 && token == 0 && out[0] == '\0');
  CHECK(schedule(epp, "{\"prompt\":\"hi\"}", out, sizeof out, 1, &token, &http) ==
        EPP_STATUS_BAD_REQUEST);
  CHECK(epp_scheduler_set_max_body_bytes(epp, 16) == EPP_STATUS_OK);
  CHECK(schedule(epp, CHAT, out, sizeof out, 1, &token, &http) == EPP_STATUS_BODY_TOO_LARGE);
  CHECK(http == 413);
  CHECK(epp_scheduler_set_max_body_bytes(epp, 1 << 20) == EPP_STATUS_OK);

  /* NULL arguments are error codes, never crashes. */
  CHECK(epp_schedule(NULL, (const uint8_t *)CHAT, strlen(CHAT), NULL, 0, out, sizeof out, 1,
                     &token, &http) == EPP_STATUS_NULL_ARGUMENT);
  CHECK(epp_schedule(epp, NULL, 10, NULL, 0, out, sizeof out, 1, &token, &http) ==
        EPP_STATUS_NULL_ARGUMENT);
  CHECK(epp_schedule(epp, (const uint8_t *)CHAT, strlen(CHAT), NULL, 3, out, sizeof out, 1,
                     &token, &http) == EPP_STATUS_NULL_ARGUMENT);
  CHECK(epp_schedule(epp, (const uint8_t *)CHAT, strlen(CHAT), NULL, 0, NULL, 10, 1, &token,
                     &http) == EPP_STATUS_NULL_ARGUMENT);
  CHECK(epp_schedule(epp, (const uint8_t *)CHAT, strlen(CHAT), NULL, 0, out, sizeof out, 1, NULL,
                     NULL) == EPP_STATUS_NULL_ARGUMENT);
  CHECK(epp_endpoint_upsert(NULL, "10.0.0.9:8000", NULL) == EPP_STATUS_NULL_ARGUMENT);
  CHECK(epp_endpoint_upsert(epp, NULL, NULL) == EPP_STATUS_NULL_ARGUMENT);
  CHECK(epp_endpoint_set_metrics(epp, "10.0.0.1:8000", NULL) == EPP_STATUS_NULL_ARGUMENT);
  CHECK(epp_endpoint_remove(epp, NULL) == EPP_STATUS_NULL_ARGUMENT);
  CHECK(epp_request_complete(NULL, 1, 0, 0, EPP_OUTCOME_COMPLETED) == EPP_STATUS_NULL_ARGUMENT);
  CHECK(epp_scheduler_set_max_body_bytes(NULL, 1) == EPP_STATUS_NULL_ARGUMENT);
  CHECK(epp_in_flight_count(NULL) == 0);

  /* Bad addresses, unknown endpoints, bad header bytes. */
  CHECK(epp_endpoint_upsert(epp, "not-an-address", NULL) == EPP_STATUS_INVALID_ADDRESS);
  CHECK(epp_endpoint_remove(epp, "10.9.9.9:1") == EPP_STATUS_UNKNOWN_ENDPOINT);
  EppEndpointMetrics nan_metrics;
  memset(&nan_metrics, 0, sizeof nan_metrics);
  nan_metrics.kv_usage = 0.0 / 0.0;
  CHECK(epp_endpoint_set_metrics(epp, "10.0.0.1:8000", &nan_metrics) ==
        EPP_STATUS_INVALID_ARGUMENT);
  EppHeader bad_header = {"x-bad", 5, "\xff", 1};
  CHECK(epp_schedule(epp, (const uint8_t *)CHAT, strlen(CHAT), &bad_header, 1, out, sizeof out, 1,
                     &token, &http) == EPP_STATUS_INVALID_UTF8);
  CHECK(http == 400);

  /* Many threads on one handle. */
  pthread_t threads[4];
  for (int i = 0; i < 4; i++) pthread_create(&threads[i], NULL, hammer, epp);
  for (int i = 0; i < 4; i++) {
    void *result = NULL;
    pthread_join(threads[i], &result);
    CHECK(result == NULL);
  }
  CHECK(epp_in_flight_count(epp) == 0);

  /* Removing every endpoint empties the pool: 503. */
  CHECK(epp_endpoint_remove(epp, "10.0.0.1:8000") == EPP_STATUS_OK);
  CHECK(epp_endpoint_remove(epp, "10.0.0.2:8000") == EPP_STATUS_OK);
  CHECK(epp_endpoint_remove(epp, "10.0.0.3:8000") == EPP_STATUS_OK);
  CHECK(schedule(epp, CHAT, out, sizeof out, 1, &token, &http) == EPP_STATUS_NO_ENDPOINT);
  CHECK(http == 503);

  /* The default config (NULL) builds, and an empty pool is a 503 there too. A request left
   * in flight is released by free. */
  EppScheduler *defaults = epp_scheduler_new(NULL, 0);
  CHECK(defaults != NULL);
  CHECK(schedule(defaults, CHAT, out, sizeof out, 1, &token, &http) == EPP_STATUS_NO_ENDPOINT);
  CHECK(http == 503);
  CHECK(epp_endpoint_upsert(defaults, "[::1]:9000", "v6") == EPP_STATUS_OK);
  CHECK(schedule(defaults, CHAT, out, sizeof out, 1, &token, &http) == EPP_STATUS_OK);
  CHECK(strcmp(out, "[::1]:9000") == 0);

  /* Flow control without queues: a sheddable request on a saturated pool is refused with 429
   * at once, and leaves nothing in flight; other requests are still scheduled. */
  const char bad_objectives[] = "- name: batch\n  priority: low\n";
  CHECK(epp_scheduler_new_with_objectives(SHED_CONFIG, strlen(SHED_CONFIG), bad_objectives,
                                          strlen(bad_objectives)) == NULL);
  EppScheduler *shedding = epp_scheduler_new_with_objectives(SHED_CONFIG, strlen(SHED_CONFIG),
                                                             OBJECTIVES, strlen(OBJECTIVES));
  CHECK(shedding != NULL);
  if (shedding != NULL) {
    CHECK(epp_endpoint_upsert(shedding, "10.0.1.1:8000", NULL) == EPP_STATUS_OK);
    CHECK(epp_endpoint_upsert(shedding, "10.0.1.2:8000", NULL) == EPP_STATUS_OK);
    set_load(shedding, "10.0.1.1:8000", 7, 0.10);
    set_load(shedding, "10.0.1.2:8000", 0, 0.85);
    memset(out, 'x', sizeof out);
    token = 42;
    CHECK(schedule_objective(shedding, "batch", out, sizeof out, &token, &http) ==
          EPP_STATUS_NOT_ADMITTED);
    CHECK(http == 429 && token == 0 && out[0] == '\0');
    epp_last_error_message(message, sizeof message);
    CHECK(strstr(message, "shed") != NULL);
    CHECK(epp_in_flight_count(shedding) == 0);
    CHECK(schedule_objective(shedding, "chat", out, sizeof out, &token, &http) == EPP_STATUS_OK);
    CHECK(http == 200 && token != 0 && epp_in_flight_count(shedding) == 1);
    CHECK(epp_request_complete(shedding, token, 0, 0, EPP_OUTCOME_COMPLETED) == EPP_STATUS_OK);
    /* Once an endpoint has room, the sheddable request goes there. */
    set_load(shedding, "10.0.1.2:8000", 0, 0.20);
    CHECK(schedule_objective(shedding, "batch", out, sizeof out, &token, &http) == EPP_STATUS_OK);
    CHECK(strcmp(out, "10.0.1.2:8000") == 0);
    CHECK(epp_request_complete(shedding, token, 0, 0, EPP_OUTCOME_COMPLETED) == EPP_STATUS_OK);
    epp_scheduler_free(shedding);
  }

  /* Queueing flow control: with the only endpoint busy, the next call waits in the queue
   * (this thread is its only driver) until its TTL passes, then is refused with 429. */
  EppScheduler *queueing = epp_scheduler_new(QUEUE_CONFIG, strlen(QUEUE_CONFIG));
  CHECK(queueing != NULL);
  if (queueing != NULL) {
    CHECK(epp_endpoint_upsert(queueing, "10.0.2.1:8000", NULL) == EPP_STATUS_OK);
    uint64_t busy = 0;
    CHECK(schedule(queueing, CHAT, out, sizeof out, 0, &busy, &http) == EPP_STATUS_OK);
    CHECK(schedule(queueing, CHAT, out, sizeof out, 0, &token, &http) == EPP_STATUS_NOT_ADMITTED);
    CHECK(http == 429 && token == 0);
    epp_last_error_message(message, sizeof message);
    CHECK(strstr(message, "expired") != NULL);
    CHECK(epp_request_complete(queueing, busy, 0, 0, EPP_OUTCOME_COMPLETED) == EPP_STATUS_OK);
    CHECK(schedule(queueing, CHAT, out, sizeof out, 0, &token, &http) == EPP_STATUS_OK);
    CHECK(strcmp(out, "10.0.2.1:8000") == 0);
    CHECK(epp_request_complete(queueing, token, 0, 0, EPP_OUTCOME_COMPLETED) == EPP_STATUS_OK);
    epp_scheduler_free(queueing);
  }

  /* Prefill/decode disaggregation: roles as labels, the prefill pick as a header to forward. */
  {
    const char pd[] =
        "plugins:\n"
        "- type: prefill-filter\n"
        "- type: decode-filter\n"
        "- type: always-disagg-pd-decider\n"
        "- type: disagg-profile-handler\n"
        "  parameters: {deciders: {prefill: always-disagg-pd-decider}}\n"
        "schedulingProfiles:\n"
        "- {name: prefill, plugins: [{pluginRef: prefill-filter}]}\n"
        "- {name: decode, plugins: [{pluginRef: decode-filter}]}\n";
    EppScheduler *disagg = epp_scheduler_new(pd, strlen(pd));
    CHECK(disagg != NULL);
    if (disagg != NULL) {
      CHECK(epp_endpoint_upsert(disagg, "10.0.1.1:8000", NULL) == EPP_STATUS_OK);
      CHECK(epp_endpoint_upsert(disagg, "10.0.1.2:8000", NULL) == EPP_STATUS_OK);
      set_load(disagg, "10.0.1.1:8000", 0, 0.1);
      set_load(disagg, "10.0.1.2:8000", 0, 0.1);
      CHECK(epp_endpoint_set_label(disagg, "10.0.1.1:8000", "llm-d.ai/role", "prefill") ==
            EPP_STATUS_OK);
      CHECK(epp_endpoint_set_label(disagg, "10.0.1.2:8000", "llm-d.ai/role", "decode") ==
            EPP_STATUS_OK);
      CHECK(epp_endpoint_set_label(disagg, "10.0.9.9:1", "llm-d.ai/role", "decode") ==
            EPP_STATUS_UNKNOWN_ENDPOINT);
      CHECK(schedule(disagg, CHAT, out, sizeof out, 1, &token, &http) == EPP_STATUS_OK);
      CHECK(strcmp(out, "10.0.1.2:8000") == 0);
      char headers[128];
      CHECK(epp_request_upstream_headers(disagg, token, headers, sizeof headers) ==
            EPP_STATUS_OK);
      CHECK(strcmp(headers, "x-prefiller-host-port: 10.0.1.1:8000\n") == 0);
      CHECK(epp_request_upstream_headers(disagg, token, headers, 8) ==
            EPP_STATUS_BUFFER_TOO_SMALL);
      CHECK(epp_request_response_started(disagg, token) == EPP_STATUS_OK);
      CHECK(epp_request_complete(disagg, token, 5, 5, EPP_OUTCOME_COMPLETED) == EPP_STATUS_OK);
      CHECK(epp_request_response_started(disagg, token) == EPP_STATUS_UNKNOWN_TOKEN);
      epp_scheduler_free(disagg);
    }
  }

  epp_scheduler_free(defaults);
  epp_scheduler_free(epp);
  epp_scheduler_free(NULL);

  if (failures) {
    fprintf(stderr, "%d check(s) failed\n", failures);
    return 1;
  }
  printf("epp C API: all checks passed\n");
  return 0;
}
