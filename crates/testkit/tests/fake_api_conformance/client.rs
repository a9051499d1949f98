//! The client's view of the server: a kubeconfig with its token, and discovery of the served
//! Sandbox versions.

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use kube::core::GroupVersionKind;
use serde_json::json;
use testkit::fake_api::{FakeApiServer, FAKE_TOKEN};

use crate::support::*;

#[tokio::test]
async fn kubeconfig_client_reaches_the_server_with_its_token() {
    let server = FakeApiServer::start().await;
    server.add_pod("default", "a", &[]);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kubeconfig");
    server.write_kubeconfig(&path);
    let kubeconfig = kube::config::Kubeconfig::read_from(&path).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .unwrap();
    assert_eq!(config.default_namespace, "default");
    let client = kube::Client::try_from(config).unwrap();
    let pods: Api<Pod> = Api::default_namespaced(client);
    assert_eq!(
        pods.list(&ListParams::default()).await.unwrap().items.len(),
        1
    );
    assert_eq!(
        server.requests()[0].authorization.as_deref(),
        Some(format!("Bearer {FAKE_TOKEN}").as_str())
    );
}

#[tokio::test]
async fn discovery_reflects_served_sandbox_versions() {
    let server = FakeApiServer::start().await;
    let client = server.client();
    assert_eq!(client.apiserver_version().await.unwrap().minor, "33");
    server.add_sandbox("v1alpha1", "default", "a", json!({}));
    server.register_sandbox_version("v1beta1");
    let gvk = GroupVersionKind::gvk("agents.x-k8s.io", "v1alpha1", "Sandbox");
    let (resource, caps) = kube::discovery::pinned_kind(&client, &gvk).await.unwrap();
    assert_eq!(resource.plural, "sandboxes");
    assert!(caps.supports_operation(kube::discovery::verbs::WATCH));
    let group = kube::discovery::group(&client, "agents.x-k8s.io")
        .await
        .unwrap();
    assert_eq!(group.preferred_version_or_latest(), "v1beta1");
    let raw = raw_get(&server, "/apis").await;
    assert_eq!(raw["kind"], "APIGroupList");
    server.disable_sandbox_api();
    assert!(kube::discovery::group(&client, "agents.x-k8s.io")
        .await
        .is_err());
}
