//! The manifests and Helm values under `deploy/`: every document parses, the kinds are the
//! expected ones, the Role grants only what the picker needs, the Deployment passes only
//! flags the `epp` binary lists in its `--help`, probes health names it serves, and its
//! scheduling config loads.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;

use ext_proc_adapter::health::{LIVENESS, READINESS};
use serde_json::Value;

fn deploy_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../deploy")
}

/// The YAML documents of `deploy/<name>` (empty documents left out).
fn documents(name: &str) -> Vec<Value> {
    let path = deploy_dir().join(name);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|error| panic!("cannot read {}: {error}", path.display()));
    let documents: Vec<Value> = serde_saphyr::from_multiple(&text)
        .unwrap_or_else(|error| panic!("{} does not parse: {error}", path.display()));
    documents.into_iter().filter(|document| !document.is_null()).collect()
}

fn kinds(documents: &[Value]) -> Vec<&str> {
    documents.iter().map(|document| document["kind"].as_str().unwrap_or("")).collect()
}

fn of_kind<'a>(documents: &'a [Value], kind: &str) -> &'a Value {
    let found = documents.iter().find(|document| document["kind"] == kind);
    found.unwrap_or_else(|| panic!("no {kind}"))
}

fn strings(value: &Value) -> Vec<&str> {
    let items = value.as_array().map(Vec::as_slice).unwrap_or_default();
    items
        .iter()
        .map(|item| item.as_str().unwrap_or_else(|| panic!("not a string: {item}")))
        .collect()
}

/// The long flags (`--name`) and short ones (`-v`) that `epp --help` lists.
fn listed_flags() -> BTreeSet<String> {
    let output = Command::new(env!("CARGO_BIN_EXE_epp")).arg("--help").output().unwrap();
    assert!(output.status.success());
    let help = String::from_utf8(output.stdout).unwrap();
    help.split(|c: char| c.is_whitespace() || c == ',' || c == '[' || c == ']')
        .filter(|word| word.starts_with('-') && word.len() > 1)
        .map(|word| word.split(['=', '<']).next().unwrap_or(word).to_owned())
        .collect()
}

#[test]
fn every_manifest_parses_into_the_expected_kinds() {
    let epp = documents("epp.yaml");
    let expected = ["ServiceAccount", "Role", "RoleBinding", "ConfigMap", "Deployment", "Service"];
    assert_eq!(kinds(&epp), expected);
    for document in &epp {
        assert!(document["apiVersion"].is_string(), "{document}");
        assert!(document["metadata"]["name"].is_string(), "{document}");
    }
    let pool = documents("inferencepool.yaml");
    assert_eq!(kinds(&pool), ["InferencePool"]);
    assert_eq!(pool[0]["apiVersion"], "inference.networking.k8s.io/v1");
    for values in ["helm-values/gie-inferencepool.yaml", "helm-values/llm-d.yaml"] {
        let documents = documents(values);
        assert_eq!(documents.len(), 1, "{values}");
        assert!(documents[0].is_object(), "{values}");
    }
}

#[test]
fn the_role_grants_only_reads_and_the_leader_lease() {
    let epp = documents("epp.yaml");
    let role = of_kind(&epp, "Role");
    let mut granted = BTreeSet::new();
    for rule in role["rules"].as_array().unwrap() {
        let verbs = strings(&rule["verbs"]);
        let resources = strings(&rule["resources"]);
        for verb in &verbs {
            assert!(["get", "list", "watch", "create", "update"].contains(verb), "{rule}");
            if ["create", "update"].contains(verb) {
                assert_eq!(resources, ["leases"], "only the lease is written: {rule}");
            }
        }
        for group in strings(&rule["apiGroups"]) {
            for resource in &resources {
                for verb in &verbs {
                    granted.insert(format!("{group}/{resource}/{verb}"));
                }
            }
        }
    }
    let wanted = [
        "/pods/get",
        "/pods/list",
        "/pods/watch",
        "inference.networking.k8s.io/inferencepools/watch",
        "inference.networking.x-k8s.io/inferencepools/watch",
        "inference.networking.x-k8s.io/inferenceobjectives/watch",
        "inference.networking.x-k8s.io/inferencemodelrewrites/watch",
        "coordination.k8s.io/leases/create",
        "coordination.k8s.io/leases/update",
    ];
    for grant in wanted {
        assert!(granted.contains(grant), "missing {grant} in {granted:?}");
    }
    let binding = of_kind(&epp, "RoleBinding");
    assert_eq!(binding["roleRef"]["name"], role["metadata"]["name"]);
    let account = of_kind(&epp, "ServiceAccount");
    assert_eq!(binding["subjects"][0]["name"], account["metadata"]["name"]);
    let deployment = of_kind(&epp, "Deployment");
    let pod = &deployment["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], account["metadata"]["name"]);
}

#[test]
fn the_deployment_passes_only_flags_epp_lists() {
    // The Kubernetes flags are listed in every build (refused at start without the feature).
    let listed = listed_flags();
    assert!(listed.contains("--log-format") && listed.contains("-v"), "{listed:?}");
    assert!(listed.contains("--pool-namespace") && listed.contains("--ha-enable-leader-election"));
    let epp = documents("epp.yaml");
    let deployment = of_kind(&epp, "Deployment");
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    let args = strings(&container["args"]);
    assert!(!args.is_empty());
    for arg in args.iter().filter(|arg| arg.starts_with('-')) {
        let flag = arg.split('=').next().unwrap_or(arg);
        assert!(listed.contains(flag), "{flag} is not in `epp --help`: {listed:?}");
    }
    // The ports the container declares are the ones its flags set.
    let after = |flag: &str| args.iter().position(|arg| *arg == flag).map(|at| args[at + 1]);
    assert_eq!(after("--grpc-port"), Some("9002"));
    assert_eq!(after("--grpc-health-port"), Some("9003"));
    assert_eq!(after("--metrics-port"), Some("9090"));
    let ports: Vec<u64> = container["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|port| port["containerPort"].as_u64().unwrap())
        .collect();
    assert_eq!(ports, [9002, 9003, 9090]);
    // The probes ask the health service for names it serves.
    assert_eq!(container["livenessProbe"]["grpc"]["service"], LIVENESS);
    assert_eq!(container["readinessProbe"]["grpc"]["service"], READINESS);
    for probe in ["livenessProbe", "readinessProbe"] {
        assert_eq!(container[probe]["grpc"]["port"], 9003, "{probe}");
    }
    // The config file the args name is the ConfigMap's key, mounted where the args say.
    let config_file = after("--config-file").unwrap();
    let mount = &container["volumeMounts"][0];
    let key = config_file.strip_prefix(&format!("{}/", mount["mountPath"].as_str().unwrap()));
    let config_map = of_kind(&epp, "ConfigMap");
    let config = config_map["data"][key.unwrap()].as_str().unwrap();
    let config = scheduler_core::EndpointPickerConfig::from_yaml(config).unwrap();
    config.construct_plugins(&scorers::builtin_registry()).unwrap();
}

#[test]
fn the_pool_points_at_the_epp_service() {
    let epp = documents("epp.yaml");
    let service = of_kind(&epp, "Service");
    let pool = &documents("inferencepool.yaml")[0];
    let picker = &pool["spec"]["endpointPickerRef"];
    assert_eq!(picker["name"], service["metadata"]["name"]);
    assert_eq!(picker["failureMode"], "FailClose");
    let grpc = service["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|port| port["port"] == picker["port"]["number"])
        .unwrap_or_else(|| panic!("the Service has no port {}", picker["port"]["number"]));
    assert_eq!(grpc["appProtocol"], "http2");
    let deployment = of_kind(&epp, "Deployment");
    assert_eq!(service["spec"]["selector"], deployment["spec"]["selector"]["matchLabels"]);
    assert_eq!(pool["spec"]["selector"]["matchLabels"]["app"], "vllm-llama3-8b-instruct");
    assert_eq!(pool["spec"]["targetPorts"][0]["number"], 8000);
}

#[test]
fn the_helm_values_point_the_charts_at_the_image_with_known_flags() {
    let listed = listed_flags();
    let gie = &documents("helm-values/gie-inferencepool.yaml")[0];
    let llm_d = &documents("helm-values/llm-d.yaml")[0];
    for epp in [&gie["inferenceExtension"], &llm_d["router"]["epp"]] {
        assert_eq!(epp["image"]["repository"], "epp-rs/epp", "{epp}");
        for flag in epp["flags"].as_object().unwrap().keys() {
            assert!(listed.contains(&format!("--{flag}")), "--{flag} is not in `epp --help`");
        }
    }
    // The flags both charts always pass, in their spelling (`--help` after them exits 0
    // only if each parsed).
    let output = Command::new(env!("CARGO_BIN_EXE_epp"))
        .args(["--zap-encoder", "json", "--tracing=false", "--v=1", "--help"])
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
}
