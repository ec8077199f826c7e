//! `epp-sim`: runs endpoint-picking policies through the simulated inference pool and prints
//! a comparison table, optionally JSON and an SVG chart of p90 TTFT against offered load; `pd`
//! compares prefill/decode disaggregation with aggregated serving at equal server count.

use std::process::ExitCode;
use std::time::Instant;

use sim::policy::PD_PREFIX_NON_CACHED_TOKENS;
use sim::{
    EppReplicas, KvEventLink, KvLink, LengthDistribution, Policy, ReplicaSpread, ReplicaSync,
    RunReport, ServerProfile, ServerRoles, SimConfig, SyntheticWorkload, TraceWorkload,
    WorkloadSource, WorkloadSpec,
};

const USAGE: &str = "\
epp-sim: compare endpoint-picking policies on a simulated vLLM pool

USAGE:
    epp-sim run   [OPTIONS]     one rate (--qps), every policy
    epp-sim sweep [OPTIONS]     every rate in --qps-list, every policy
    epp-sim ladder [OPTIONS]    a benchmark's rate ladder: one run per policy whose rate steps
                                through --qps-list, --requests per stage, each stage continuing
                                from the state the last one left (no cold restart); per stage:
                                success rate, completed requests and output tokens per second,
                                TTFT and NTPOT percentiles with the first --warmup of the
                                stage's requests left out
    epp-sim bench [OPTIONS]     the standard set: every policy on ShareGPT-like chat (at 200/s
                                and at its knee), prefix-heavy, shared-prefix at two cache
                                pressures, one hot prefix, a LoRA mix and a sheddable mix;
                                prints a markdown table with the default profile's throughput
                                and p90 TTFT against load-only routing and its p90 TTFT against
                                GIE's exact formulas, and whether it holds (>= 0.9x and <= 1.2x
                                load-only's, <= 1.2x GIE's); writes BENCH.md, bench.json and bench.svg
                                under --out (--workload trace:PATH replaces the synthetic chat;
                                --requests, --profile and --seed apply)
    epp-sim pd    [OPTIONS]     prefill/decode disaggregation against aggregated serving at
                                equal server count: GIE's default profile on P+D servers
                                labelled prefill-decode, then llm-d's P/D config with
                                always-disagg-pd-decider and with prefix-based-pd-decider on
                                P prefill + D decode servers; prints p90 TTFT and TPOT and their
                                P/D / aggregated ratios, at --qps, or every rate of --qps-list
                                when given (--servers and --policies do not apply)
    epp-sim replicas [OPTIONS]  one EPP against --replicas EPP replicas behind a gateway that
                                spreads requests over them, each on its own and then sharing
                                prefix records and in-flight counts (as through Redis); per
                                rate of --qps-list (or --qps) and EPP policy of --policies
                                [default: epp]: TTFT, hit rate and p90 TTFT against one EPP

OPTIONS:
    --workload W          sharegpt-like | prefix-heavy | long-prompt | hot-prefix |
                          shared-prefix | trace:PATH (ShareGPT JSON)
                          [default: sharegpt-like; long-prompt for `pd`]
                          hot-prefix: one 6,000-token system prompt shared by every request,
                          200-token questions and answers;
                          shared-prefix: inference-perf's shared_prefix shape, set by the
                          five flags below [defaults: 150 groups of 5 prompts, 6,000-token
                          system prompts, 200-token questions and answers]
    --groups N            synthetic workloads: distinct system prompts (num_groups)
    --prompts-per-group N synthetic workloads: fixed questions per system prompt, asked again
                          and again (num_prompts_per_group; 0 = every question new)
    --system-prompt-len N synthetic workloads: system prompt length, tokens
    --question-len N      synthetic workloads: every question this long, tokens
    --output-len N        synthetic workloads: every answer this long, tokens
    --qps N               arrival rate for `run` [default: 50]
    --qps-list A,B,..     arrival rates for `sweep` [default: 10,20,30,40,50,60]
    --requests N          requests per run [default: 20000]
    --servers N           model servers [default: 10]
    --profile P           server profile: h100-llama3-8b | h100x2-qwen3-32b |
                          h100x4-llama3.1-70b | a100-llama2-7b | small-test, or a YAML
                          file of the shape of crates/sim/profiles/*.yaml
                          [default: h100-llama3-8b]
    --policies P,..       round-robin, random, least-request, oracle, epp (GIE default:
                          queue, KV and prefix scorers), epp-queue-kv, epp-prefix-heavy,
                          epp-gie-exact (the default profile with GIE's exact formulas:
                          affinity whatever the load, no lag compensation), epp-precise
                          (the default profile on llm-d's precise-prefix-cache-producer,
                          fed by the servers' KV-cache events), epp-precise-speculative
                          (the same with llm-d's speculativeIndexing),
                          epp:NAME=CONFIG.yaml
                          [default: round-robin,random,least-request,epp,oracle]
    --prompt-tokens N     the same as --system-prompt-len
    --seed N              seed of the workload and every decision [default: 1]
    --scrape-ms N         metrics scrape interval [default: 50]
    --conversation-gap S  mean seconds between turns of a conversation [default: 10]
    --first-turns         trace workloads: only the first turn of each conversation, as
                          single requests (how vLLM's and GIE's benchmark tools replay
                          ShareGPT)
    --adapters N          LoRA adapters conversations may target [default: 0]
    --adapter-share F     share of conversations on an adapter [default: 0]
    --sheddable-share F   share of sheddable (priority -1) conversations [default: 0]
    --no-shedding         never shed, even when saturated
    --prefill-servers N   `pd`: servers labelled prefill [default: 2]; `run`/`sweep`: label
                          the first N of --servers prefill and the rest decode (for P/D
                          policies such as epp-pd-always or epp:NAME=MY-PD-CONFIG.yaml)
    --decode-servers N    `pd`: servers labelled decode [default: 6]
    --kv-link-gbps F      KV-transfer bandwidth between prefill and decode servers, GB/s
                          (`inf`: no bandwidth cost) [default: 50, a 400 Gb/s RDMA NIC]
    --kv-link-ms F        fixed cost of each KV transfer, ms [default: 1]
    --non-cached-tokens N `pd`: prefix-based-pd-decider's nonCachedTokens [default: 512]
    --out DIR             `bench`: where to write BENCH.md, bench.json and bench.svg
    --max-concurrency N   the client's limit on requests in flight: later arrivals wait
                          for a response before they are sent [default: none, open loop]
    --timeout S           the client's timeout, seconds: later responses count as failed
                          (the success rate of `ladder`; `timed out` in JSON)
    --warmup F            `ladder`: share of each stage's requests left out of its
                          latencies [default: 0.1]
    --kv-event-delay-ms F a server's KV-cache events reach the precise index this late
                          [default: 5]
    --kv-event-loss F     share of KV-event batches lost (a lost batch makes its server
                          untrusted: its matches fall back to the approximate index)
                          [default: 0]
    --replicas N          EPP policies run as N replicas behind the gateway
                          [default: 1; `replicas`: 4]
    --replica-sync        `run`/`sweep`/`ladder`: the replicas share prefix records and
                          in-flight counts (`replicas` runs both ways)
    --sync-delay-ms F     synced replicas: a prefix record reaches the others this late
                          [default: 10]
    --sync-interval-ms F  synced replicas: in-flight counts are exchanged this often
                          (crossReplicaSyncInterval) [default: 200]
    --replica-spread S    round-robin | random: how the gateway spreads requests over the
                          replicas [default: round-robin]
    --json PATH           write the reports as JSON (`-` for stdout)
    --svg PATH            write an SVG chart of p90 TTFT, p90 TPOT and throughput against
                          rate (sweep)
    --quiet               no progress on stderr
";

struct Options {
    command: String,
    workload: String,
    qps: f64,
    qps_list: Vec<f64>,
    requests: u64,
    servers: usize,
    profile: String,
    policies: Vec<String>,
    policies_given: bool,
    seed: u64,
    scrape_ms: f64,
    conversation_gap_s: f64,
    first_turns_only: bool,
    adapters: u32,
    adapter_share: f64,
    sheddable_share: f64,
    shedding: bool,
    json: Option<String>,
    svg: Option<String>,
    out: Option<String>,
    warmup: f64,
    max_concurrency: Option<u32>,
    timeout_s: Option<f64>,
    quiet: bool,
    workload_given: bool,
    qps_list_given: bool,
    prompt_tokens: Option<u32>,
    groups: Option<u32>,
    prompts_per_group: Option<u32>,
    question_len: Option<u32>,
    output_len: Option<u32>,
    prefill_servers: usize,
    prefill_servers_given: bool,
    decode_servers: usize,
    kv_link_gbps: f64,
    kv_link_ms: f64,
    non_cached_tokens: u32,
    replicas: Option<usize>,
    replica_sync: bool,
    sync: ReplicaSync,
    replica_spread: ReplicaSpread,
    kv_events: KvEventLink,
}

fn parse_number<T: std::str::FromStr>(flag: &str, value: &str) -> Result<T, String> {
    value.parse().map_err(|_| format!("{flag}: '{value}' is not a valid number"))
}

fn parse_options(args: &[String]) -> Result<Options, String> {
    let mut options = Options {
        command: String::new(),
        workload: "sharegpt-like".to_owned(),
        qps: 50.0,
        qps_list: vec![10.0, 20.0, 30.0, 40.0, 50.0, 60.0],
        requests: 20_000,
        servers: 10,
        profile: "h100-llama3-8b".to_owned(),
        policies: ["round-robin", "random", "least-request", "epp", "oracle"]
            .map(String::from)
            .to_vec(),
        policies_given: false,
        seed: 1,
        scrape_ms: 50.0,
        conversation_gap_s: 10.0,
        first_turns_only: false,
        adapters: 0,
        adapter_share: 0.0,
        sheddable_share: 0.0,
        shedding: true,
        json: None,
        svg: None,
        out: None,
        warmup: 0.1,
        max_concurrency: None,
        timeout_s: None,
        quiet: false,
        workload_given: false,
        qps_list_given: false,
        prompt_tokens: None,
        groups: None,
        prompts_per_group: None,
        question_len: None,
        output_len: None,
        prefill_servers: 2,
        prefill_servers_given: false,
        decode_servers: 6,
        kv_link_gbps: KvLink::default().gbps,
        kv_link_ms: KvLink::default().latency_s * 1e3,
        non_cached_tokens: PD_PREFIX_NON_CACHED_TOKENS,
        replicas: None,
        replica_sync: false,
        sync: ReplicaSync::default(),
        replica_spread: ReplicaSpread::RoundRobin,
        kv_events: KvEventLink::default(),
    };
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        let mut value =
            |flag: &str| args.next().cloned().ok_or_else(|| format!("{flag} needs a value"));
        match arg.as_str() {
            "run" | "sweep" | "pd" | "bench" | "ladder" | "replicas"
                if options.command.is_empty() =>
            {
                options.command = arg.clone();
            }
            "--out" => options.out = Some(value(arg)?),
            "--replicas" => options.replicas = Some(parse_number(arg, &value(arg)?)?),
            "--replica-sync" => options.replica_sync = true,
            "--kv-event-delay-ms" => {
                options.kv_events.delay_s = parse_number::<f64>(arg, &value(arg)?)? / 1e3;
            }
            "--kv-event-loss" => options.kv_events.loss = parse_number(arg, &value(arg)?)?,
            "--sync-delay-ms" => {
                options.sync.record_delay_s = parse_number::<f64>(arg, &value(arg)?)? / 1e3;
            }
            "--sync-interval-ms" => {
                options.sync.interval_s = parse_number::<f64>(arg, &value(arg)?)? / 1e3;
            }
            "--replica-spread" => {
                options.replica_spread = match value(arg)?.as_str() {
                    "round-robin" => ReplicaSpread::RoundRobin,
                    "random" => ReplicaSpread::Random,
                    other => {
                        return Err(format!(
                            "--replica-spread: '{other}' is not round-robin or random"
                        ));
                    }
                };
            }
            "--warmup" => options.warmup = parse_number(arg, &value(arg)?)?,
            "--max-concurrency" => {
                options.max_concurrency = Some(parse_number(arg, &value(arg)?)?);
            }
            "--timeout" => options.timeout_s = Some(parse_number(arg, &value(arg)?)?),
            "-h" | "--help" => options.command = "help".to_owned(),
            "--workload" => {
                options.workload = value(arg)?;
                options.workload_given = true;
            }
            "--qps" => options.qps = parse_number(arg, &value(arg)?)?,
            "--qps-list" => {
                options.qps_list = value(arg)?
                    .split(',')
                    .map(|rate| parse_number(arg, rate.trim()))
                    .collect::<Result<_, _>>()?;
                options.qps_list_given = true;
            }
            "--prompt-tokens" | "--system-prompt-len" => {
                options.prompt_tokens = Some(parse_number(arg, &value(arg)?)?);
            }
            "--groups" => options.groups = Some(parse_number(arg, &value(arg)?)?),
            "--prompts-per-group" => {
                options.prompts_per_group = Some(parse_number(arg, &value(arg)?)?);
            }
            "--question-len" => options.question_len = Some(parse_number(arg, &value(arg)?)?),
            "--output-len" => options.output_len = Some(parse_number(arg, &value(arg)?)?),
            "--prefill-servers" => {
                options.prefill_servers = parse_number(arg, &value(arg)?)?;
                options.prefill_servers_given = true;
            }
            "--decode-servers" => options.decode_servers = parse_number(arg, &value(arg)?)?,
            "--kv-link-gbps" => options.kv_link_gbps = parse_number(arg, &value(arg)?)?,
            "--kv-link-ms" => options.kv_link_ms = parse_number(arg, &value(arg)?)?,
            "--non-cached-tokens" => {
                options.non_cached_tokens = parse_number(arg, &value(arg)?)?;
            }
            "--requests" => options.requests = parse_number(arg, &value(arg)?)?,
            "--servers" => options.servers = parse_number(arg, &value(arg)?)?,
            "--profile" => options.profile = value(arg)?,
            "--policies" => {
                options.policies = value(arg)?.split(',').map(|p| p.trim().to_owned()).collect();
                options.policies_given = true;
            }
            "--seed" => options.seed = parse_number(arg, &value(arg)?)?,
            "--scrape-ms" => options.scrape_ms = parse_number(arg, &value(arg)?)?,
            "--conversation-gap" => options.conversation_gap_s = parse_number(arg, &value(arg)?)?,
            "--adapters" => options.adapters = parse_number(arg, &value(arg)?)?,
            "--adapter-share" => options.adapter_share = parse_number(arg, &value(arg)?)?,
            "--sheddable-share" => options.sheddable_share = parse_number(arg, &value(arg)?)?,
            "--no-shedding" => options.shedding = false,
            "--first-turns" => options.first_turns_only = true,
            "--json" => options.json = Some(value(arg)?),
            "--svg" => options.svg = Some(value(arg)?),
            "--quiet" => options.quiet = true,
            other => return Err(format!("unexpected argument '{other}'")),
        }
    }
    if options.command.is_empty() {
        options.command = "run".to_owned();
    }
    if options.command == "replicas" && options.replica_sync {
        return Err("--replica-sync: `replicas` runs with and without sync".to_owned());
    }
    if options.command == "pd" && !options.workload_given {
        options.workload = "long-prompt".to_owned();
    }
    Ok(options)
}

fn workload(options: &Options) -> Result<WorkloadSpec, String> {
    let source = match options.workload.as_str() {
        "sharegpt-like" => WorkloadSource::Synthetic(SyntheticWorkload::sharegpt_like()),
        "prefix-heavy" => WorkloadSource::Synthetic(SyntheticWorkload::prefix_heavy()),
        "long-prompt" => WorkloadSource::Synthetic(SyntheticWorkload::long_prompt()),
        "hot-prefix" => WorkloadSource::Synthetic(SyntheticWorkload::hot_prefix()),
        "shared-prefix" => {
            WorkloadSource::Synthetic(SyntheticWorkload::shared_prefix(150, 5, 6000, 200, 200))
        }
        other => match other.strip_prefix("trace:") {
            Some(path) => {
                WorkloadSource::Trace(TraceWorkload::load(path).map_err(|e| e.to_string())?)
            }
            None => {
                return Err(format!(
                    "unknown workload '{other}': expected sharegpt-like, prefix-heavy, long-prompt, hot-prefix, shared-prefix or trace:PATH"
                ));
            }
        },
    };
    let source = shape_synthetic(options, source)?;
    // Charts and tables name the workload, not a local path.
    let name = match options.workload.strip_prefix("trace:") {
        Some(path) => {
            let file = std::path::Path::new(path).file_name().and_then(|name| name.to_str());
            format!("trace {}", file.unwrap_or(path))
        }
        None => options.workload.clone(),
    };
    let mut spec = WorkloadSpec::new(name, source, options.qps, options.requests);
    spec.conversation_gap_s = options.conversation_gap_s;
    spec.first_turns_only = options.first_turns_only;
    spec.adapters = options.adapters;
    spec.adapter_share = options.adapter_share;
    spec.sheddable_share = options.sheddable_share;
    if options.max_concurrency == Some(0) {
        return Err("--max-concurrency: must be at least 1".to_owned());
    }
    spec.max_concurrency = options.max_concurrency;
    if let Some(timeout) = options.timeout_s
        && !(timeout > 0.0 && timeout.is_finite())
    {
        return Err(format!("--timeout: {timeout} is not a positive number of seconds"));
    }
    spec.timeout_s = options.timeout_s;
    Ok(spec)
}

/// Applies the synthetic-shape flags (`--groups`, `--prompts-per-group`, `--system-prompt-len`,
/// `--question-len`, `--output-len`); they are refused for traces.
fn shape_synthetic(options: &Options, source: WorkloadSource) -> Result<WorkloadSource, String> {
    let shaping = [
        ("--system-prompt-len", options.prompt_tokens),
        ("--groups", options.groups),
        ("--prompts-per-group", options.prompts_per_group),
        ("--question-len", options.question_len),
        ("--output-len", options.output_len),
    ];
    let mut synthetic = match source {
        WorkloadSource::Synthetic(synthetic) => synthetic,
        trace => {
            return match shaping.iter().find(|(_, value)| value.is_some()) {
                Some((flag, _)) => Err(format!("{flag}: a trace workload has a shape of its own")),
                None => Ok(trace),
            };
        }
    };
    if let Some(groups) = options.groups {
        synthetic.system_prompts = groups;
        if groups > 0 && synthetic.system_prompt_share == 0.0 {
            synthetic.system_prompt_share = 1.0;
        }
        if groups > 0 && synthetic.system_prompt_tokens == 0 && options.prompt_tokens.is_none() {
            return Err("--groups: give --system-prompt-len for this workload".to_owned());
        }
    }
    if let Some(tokens) = options.prompt_tokens {
        if synthetic.system_prompts == 0 {
            return Err(format!(
                "--system-prompt-len: workload '{}' has no shared system prompts (add --groups)",
                options.workload
            ));
        }
        synthetic.system_prompt_tokens = tokens;
    }
    if let Some(prompts) = options.prompts_per_group {
        if synthetic.system_prompts == 0 && prompts > 0 {
            return Err("--prompts-per-group: the workload has no groups (add --groups)".to_owned());
        }
        synthetic.prompts_per_group = prompts;
    }
    if let Some(tokens) = options.question_len {
        synthetic.message_tokens = LengthDistribution::Fixed(tokens);
    }
    if let Some(tokens) = options.output_len {
        synthetic.output_tokens = LengthDistribution::Fixed(tokens);
    }
    Ok(WorkloadSource::Synthetic(synthetic))
}

fn execute(options: &Options) -> Result<(), String> {
    let profile = ServerProfile::load(&options.profile).map_err(|e| e.to_string())?;
    let mut config = SimConfig::new(options.servers, profile);
    config.seed = options.seed;
    config.scrape_interval_s = options.scrape_ms / 1e3;
    if !options.shedding {
        config.saturation = None;
    }
    config.kv_events = options.kv_events;
    config.kv_link = KvLink { gbps: options.kv_link_gbps, latency_s: options.kv_link_ms / 1e3 };
    if options.command == "bench" {
        return execute_bench(options, &config.profile);
    }
    let mut workload = workload(options)?;
    // The profile's context length caps the workload (8,192 for the shipped profiles).
    workload.max_context_tokens = config.profile.max_model_len;
    if options.command == "pd" {
        return execute_pd(options, &config, &workload);
    }
    if options.prefill_servers_given {
        config.roles = ServerRoles::Disaggregated { prefill_servers: options.prefill_servers };
    }
    config.replicas = EppReplicas {
        count: options.replicas.unwrap_or(1),
        sync: options.replica_sync.then_some(options.sync),
        spread: options.replica_spread,
    };
    if options.command == "replicas" {
        return execute_replicas(options, &config, &workload);
    }
    let policies: Vec<Policy> = options
        .policies
        .iter()
        .map(|spec| Policy::parse(spec).map_err(|e| e.to_string()))
        .collect::<Result<_, _>>()?;
    if options.command == "ladder" {
        if !(0.0..1.0).contains(&options.warmup) {
            return Err(format!("--warmup: {} is not a share in [0, 1)", options.warmup));
        }
        let ladder = workload.with_ladder(&options.qps_list, options.requests, options.warmup);
        let mut progress = Progress::new(options.quiet);
        let reports =
            sim::sweep(&config, &ladder, &[ladder.qps], &policies, |done, total, report| {
                progress.report(done, total, report)
            })
            .map_err(|e| e.to_string())?;
        progress.finish();
        println!(
            "{} on {} servers: rates {:?} req/s, {} requests a stage, warm-up {:.0}% of each stage",
            workload.name,
            options.servers,
            options.qps_list,
            options.requests,
            options.warmup * 100.0
        );
        print!("{}", sim::render_ladder_table(&reports));
        return write_json(options, &reports);
    }
    let rates =
        if options.command == "sweep" { options.qps_list.clone() } else { vec![options.qps] };

    let mut progress = Progress::new(options.quiet);
    let reports = sim::sweep(&config, &workload, &rates, &policies, |done, total, report| {
        progress.report(done, total, report)
    })
    .map_err(|e| e.to_string())?;
    progress.finish();

    print!("{}", sim::render_table(&reports));
    write_json(options, &reports)?;
    if let Some(path) = &options.svg {
        let title = format!("{} on {} servers", workload.name, options.servers);
        std::fs::write(path, sim::sweep_chart(&title, &reports))
            .map_err(|e| format!("cannot write {path}: {e}"))?;
    }
    Ok(())
}

fn execute_bench(options: &Options, profile: &ServerProfile) -> Result<(), String> {
    let trace = match options.workload.strip_prefix("trace:") {
        Some(path) => {
            Some(WorkloadSource::Trace(TraceWorkload::load(path).map_err(|e| e.to_string())?))
        }
        None if options.workload_given && options.workload != "sharegpt-like" => {
            return Err(format!(
                "bench: --workload takes a ShareGPT trace (trace:PATH) for the chat cases, not '{}'",
                options.workload
            ));
        }
        None => None,
    };
    let cases = sim::bench::standard_set(options.requests, trace);
    let mut progress = Progress::new(options.quiet);
    let results = sim::bench::run_set(&cases, profile, options.seed, |done, total, report| {
        progress.report(done, total, report)
    })
    .map_err(|e| e.to_string())?;
    progress.finish();
    let header = format!(
        "Standard set: profile {}, {} requests per run, seed {}, 50 ms scrapes.\n\n",
        profile.name, options.requests, options.seed
    );
    let table = format!("{header}{}", sim::bench::render_markdown(&results));
    print!("{table}");
    if let Some(dir) = &options.out {
        let dir = std::path::Path::new(dir);
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let write = |name: &str, contents: &str| {
            let path = dir.join(name);
            std::fs::write(&path, contents)
                .map_err(|e| format!("cannot write {}: {e}", path.display()))
        };
        write("BENCH.md", &table)?;
        let json = serde_json::to_string_pretty(&results).map_err(|e| e.to_string())?;
        write("bench.json", &json)?;
        let cases: Vec<(String, Vec<RunReport>)> =
            results.iter().map(|result| (result.case.clone(), result.reports.clone())).collect();
        let title = format!("p90 TTFT against load-only routing ({})", profile.name);
        write("bench.svg", &sim::relative_ttft_chart(&title, &cases, "epp-queue-kv"))?;
    }
    if results.iter().all(sim::bench::CaseResult::holds) {
        Ok(())
    } else {
        let failing: Vec<&str> =
            results.iter().filter(|r| !r.holds()).map(|r| r.case.as_str()).collect();
        Err(format!(
            "the default profile misses its bounds (against load-only routing, against GIE's exact \
             formulas) on: {}",
            failing.join(", ")
        ))
    }
}

fn execute_replicas(
    options: &Options,
    config: &SimConfig,
    workload: &WorkloadSpec,
) -> Result<(), String> {
    let count = options.replicas.unwrap_or(4);
    if count < 2 {
        return Err(format!("--replicas: `replicas` compares one EPP with several, got {count}"));
    }
    let specs: Vec<&str> = if options.policies_given {
        options.policies.iter().map(String::as_str).collect()
    } else {
        vec!["epp"]
    };
    let policies: Vec<Policy> = specs
        .iter()
        .map(|spec| Policy::parse(spec).map_err(|e| e.to_string()))
        .collect::<Result<_, _>>()?;
    if !policies.iter().any(|policy| matches!(policy, Policy::Epp { .. })) {
        return Err("--policies: `replicas` needs at least one EPP policy".to_owned());
    }
    let rates = if options.qps_list_given { options.qps_list.clone() } else { vec![options.qps] };
    let mut progress = Progress::new(options.quiet);
    let reports = sim::compare_replicas(
        config,
        count,
        options.sync,
        workload,
        &rates,
        &policies,
        |done, total, report| progress.report(done, total, report),
    )
    .map_err(|e| e.to_string())?;
    progress.finish();
    println!(
        "{} on {} servers: one EPP, {count} independent replicas, {count} synced replicas (records {} ms late, counts every {} ms), {} spread; seed {}",
        workload.name,
        config.servers,
        options.sync.record_delay_s * 1e3,
        options.sync.interval_s * 1e3,
        options.replica_spread.name(),
        config.seed,
    );
    print!("{}", sim::render_replicas_table(&reports));
    write_json(options, &reports)
}

fn execute_pd(
    options: &Options,
    config: &SimConfig,
    workload: &WorkloadSpec,
) -> Result<(), String> {
    let rates = if options.qps_list_given { options.qps_list.clone() } else { vec![options.qps] };
    let mut progress = Progress::new(options.quiet);
    let reports = sim::compare_pd(
        config,
        options.prefill_servers,
        options.decode_servers,
        options.non_cached_tokens,
        workload,
        &rates,
        |done, total, report| progress.report(done, total, report),
    )
    .map_err(|e| e.to_string())?;
    progress.finish();
    println!(
        "{} on {} prefill + {} decode servers against {} aggregated; KV link {} GB/s + {} ms, {} KiB/token; seed {}",
        workload.name,
        options.prefill_servers,
        options.decode_servers,
        options.prefill_servers + options.decode_servers,
        options.kv_link_gbps,
        options.kv_link_ms,
        config.profile.kv_bytes_per_token / 1024,
        config.seed,
    );
    print!("{}", sim::render_pd_table(&reports));
    write_json(options, &reports)
}

/// Per-run progress and simulation speed on stderr.
struct Progress {
    quiet: bool,
    started: Instant,
    run_started: Instant,
    simulated: u64,
}

impl Progress {
    fn new(quiet: bool) -> Self {
        Self { quiet, started: Instant::now(), run_started: Instant::now(), simulated: 0 }
    }

    fn report(&mut self, done: usize, total: usize, report: &RunReport) {
        self.simulated += report.arrivals;
        if !self.quiet {
            let seconds = self.run_started.elapsed().as_secs_f64();
            eprintln!(
                "[{done}/{total}] {:<14} qps {:>6.1}: {} requests in {seconds:.2} s ({:.2} M simulated requests/min)",
                report.policy,
                report.qps,
                report.arrivals,
                report.arrivals as f64 / seconds.max(1e-9) * 60.0 / 1e6,
            );
        }
        self.run_started = Instant::now();
    }

    fn finish(&self) {
        if !self.quiet {
            let seconds = self.started.elapsed().as_secs_f64();
            eprintln!(
                "{} simulated requests in {seconds:.1} s: {:.2} M/min",
                self.simulated,
                self.simulated as f64 / seconds.max(1e-9) * 60.0 / 1e6
            );
        }
    }
}

fn write_json(options: &Options, reports: &[RunReport]) -> Result<(), String> {
    if let Some(path) = &options.json {
        let json = serde_json::to_string_pretty(&reports).map_err(|e| e.to_string())?;
        if path == "-" {
            println!("{json}");
        } else {
            std::fs::write(path, json).map_err(|e| format!("cannot write {path}: {e}"))?;
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let options = match parse_options(&args) {
        Ok(options) => options,
        Err(message) => {
            eprintln!("epp-sim: {message}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    if options.command == "help" {
        print!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    match execute(&options) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("epp-sim: {message}");
            ExitCode::FAILURE
        }
    }
}
