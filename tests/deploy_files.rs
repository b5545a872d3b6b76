//! The deploy files parse and say what matters: the compose file runs three stoa replicas on
//! one Redis with the config that names it, the Kubernetes Deployment is ready on /readyz of
//! the admin port, and the stoa configurations in them pass `stoa check` (once the service
//! names they use, which only resolve inside the deployment, point at this machine).

mod common;

use std::collections::BTreeSet;

use common::{repo_path, stoa, write_temp};
use serde_norway::Value;

fn yaml(rel: &str) -> Value {
    let text = std::fs::read_to_string(repo_path(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"));
    serde_norway::from_str(&text).unwrap_or_else(|e| panic!("{rel} is not valid YAML: {e}"))
}

fn s<'a>(v: &'a Value, path: &[&str]) -> &'a Value {
    path.iter().fold(v, |v, k| &v[*k])
}

/// `stoa check` on `text`: the problems it reports, each must be an unresolvable name among
/// `hosts`; then with those hosts pointing at 127.0.0.1, it must pass.
fn passes_check(text: &str, hosts: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let path = write_temp(dir.path(), "stoa.toml", text);
    let (code, out, err) = stoa(&["check", "--config", path.to_str().unwrap()], &[]);
    if code != 0 {
        for line in err.lines().skip(1) {
            assert!(
                hosts
                    .iter()
                    .any(|h| line.contains(&format!("cannot resolve {h}:"))),
                "{line}\n{out}{err}"
            );
        }
    }
    let mut local = text.to_string();
    for h in hosts {
        local = local.replace(&format!("//{h}:"), "//127.0.0.1:");
    }
    let path = write_temp(dir.path(), "local.toml", &local);
    let (code, out, err) = stoa(&["check", "--config", path.to_str().unwrap()], &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("cluster: node"), "{out}");
}

#[test]
fn the_compose_file_runs_three_replicas_on_one_redis() {
    let compose = yaml("deploy/compose.yaml");
    let services = compose["services"].as_mapping().expect("services");
    let names: BTreeSet<&str> = services.keys().filter_map(|k| k.as_str()).collect();
    for want in ["redis", "demo", "stoa", "prometheus", "grafana"] {
        assert!(names.contains(want), "no {want} service in {names:?}");
    }
    let stoa_service = &compose["services"]["stoa"];
    assert_eq!(s(stoa_service, &["deploy", "replicas"]).as_u64(), Some(3));
    assert!(s(stoa_service, &["depends_on", "redis"]).is_mapping());

    // The config it mounts has a [cluster] section on the redis service.
    let volume = stoa_service["volumes"][0].as_str().expect("config volume");
    let (file, target) = volume.split_once(':').expect("host:container");
    assert!(target.starts_with("/etc/stoa/stoa.toml"), "{volume}");
    let text = std::fs::read_to_string(repo_path(&format!("deploy/{file}"))).unwrap();
    let config: toml_value::Table = toml_value::parse(&text);
    assert_eq!(
        config["cluster"]["redis"].as_str(),
        Some("redis://redis:6379/0")
    );
    passes_check(&text, &["demo", "redis"]);

    // Prometheus is given the scrape file that finds every replica; Grafana the dashboard.
    let prometheus = yaml("deploy/compose-prometheus.yml");
    let sd = &prometheus["scrape_configs"][0]["dns_sd_configs"][0];
    assert_eq!(sd["names"][0].as_str(), Some("stoa"));
    assert_eq!(sd["port"].as_u64(), Some(9901));
    let grafana = format!("{:?}", compose["services"]["grafana"]["volumes"]);
    assert!(grafana.contains("../dashboards:"), "{grafana}");
    let provider = yaml("deploy/grafana/provisioning/dashboards/stoa.yaml");
    assert!(provider["providers"][0]["options"]["path"].is_string());
    let datasource = yaml("deploy/grafana/provisioning/datasources/prometheus.yaml");
    assert_eq!(
        datasource["datasources"][0]["url"].as_str(),
        Some("http://prometheus:9090")
    );
}

#[test]
fn the_kubernetes_manifests_are_complete_and_ready_on_readyz() {
    let dir = "deploy/kubernetes";
    let kustomization = yaml(&format!("{dir}/kustomization.yaml"));
    let mut kinds = BTreeSet::new();
    let mut deployment = None;
    let mut configmap = None;
    for file in kustomization["resources"].as_sequence().expect("resources") {
        let doc = yaml(&format!("{dir}/{}", file.as_str().unwrap()));
        let kind = doc["kind"].as_str().expect("kind").to_string();
        assert!(doc["apiVersion"].is_string(), "{file:?}");
        assert_eq!(doc["metadata"]["name"].as_str(), Some("stoa"), "{file:?}");
        match kind.as_str() {
            "Deployment" => deployment = Some(doc),
            "ConfigMap" => configmap = Some(doc),
            _ => {}
        }
        kinds.insert(kind);
    }
    let want: BTreeSet<String> = [
        "ConfigMap",
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "ServiceMonitor",
    ]
    .map(String::from)
    .into();
    assert_eq!(kinds, want);

    let deployment = deployment.unwrap();
    let pod = s(&deployment, &["spec", "template", "spec"]);
    let container = &pod["containers"][0];
    let admin_port = container["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|p| p["name"].as_str() == Some("admin"))
        .expect("an admin port");
    assert_eq!(admin_port["containerPort"].as_u64(), Some(9901));
    let probe = s(container, &["readinessProbe", "httpGet"]);
    assert_eq!(probe["path"].as_str(), Some("/readyz"));
    assert_eq!(probe["port"].as_str(), Some("admin"));

    // The ConfigMap's config: the admin listener is on that port, and it passes stoa check.
    let text = configmap.unwrap()["data"]["stoa.toml"]
        .as_str()
        .expect("stoa.toml")
        .to_string();
    let config = toml_value::parse(&text);
    assert_eq!(config["admin"]["listen"].as_str(), Some("0.0.0.0:9901"));
    assert!(config["cluster"]["redis"].is_string());
    passes_check(&text, &["stoa-demo", "redis"]);
    let mount = s(container, &["volumeMounts"])[0]["mountPath"].as_str();
    assert_eq!(mount, Some("/etc/stoa"));
}

/// TOML through serde_json values (figment's own parser is not exposed to tests).
mod toml_value {
    pub type Table = serde_json::Value;

    pub fn parse(text: &str) -> Table {
        use figment::providers::{Format, Toml};
        figment::Figment::from(Toml::string(text))
            .extract()
            .expect("valid TOML")
    }
}
