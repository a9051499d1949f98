//! Namespaces and the cluster's identity: the default ones, implicit creation, removal,
//! termination, RBAC on namespace GETs and faults aimed at them.

use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec,
};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams, PostParams};
use kube::core::GroupVersionKind;
use kube::ResourceExt;
use serde_json::json;
use testkit::fake_api::{FakeApiServer, Fault, FaultAction, Kind};

use crate::support::*;

fn ns_review(verb: &str, name: Option<&str>) -> SelfSubjectAccessReview {
    SelfSubjectAccessReview {
        spec: SelfSubjectAccessReviewSpec {
            resource_attributes: Some(ResourceAttributes {
                namespace: name.map(Into::into),
                verb: Some(verb.into()),
                group: Some(String::new()),
                resource: Some("namespaces".into()),
                name: name.map(Into::into),
                ..Default::default()
            }),
            ..Default::default()
        },
        ..Default::default()
    }
}

#[tokio::test]
async fn new_server_has_default_and_kube_system_whose_uid_is_the_cluster_uid() {
    let server = FakeApiServer::start().await;
    let api = namespaces(&server);
    let default = api.get_opt("default").await.unwrap().unwrap();
    assert_eq!(default.name_any(), "default");
    assert_eq!(phase(&default), Some("Active"));
    assert!(default.metadata.creation_timestamp.is_some());
    assert!(default.metadata.namespace.is_none());
    assert_eq!(
        default.labels().get("kubernetes.io/metadata.name"),
        Some(&"default".to_string())
    );
    let kube_system = api.get_opt("kube-system").await.unwrap().unwrap();
    let uid = server.cluster_uid();
    assert_eq!(kube_system.uid().as_deref(), Some(uid.as_str()));
    assert_ne!(default.uid(), kube_system.uid());
    // A UUID v4, random per server.
    assert_eq!(uid.len(), 36);
    assert_eq!(&uid[14..15], "4");
    let other = FakeApiServer::start().await;
    assert_ne!(other.cluster_uid(), uid);

    // The raw object, and the metadata-only representation.
    let raw = raw_get(&server, "/api/v1/namespaces/kube-system").await;
    assert_eq!(
        (raw["kind"].as_str(), raw["apiVersion"].as_str()),
        (Some("Namespace"), Some("v1"))
    );
    assert_eq!(raw["status"]["phase"], "Active");
    assert!(raw["metadata"]["resourceVersion"].as_str().is_some());
    let meta = api.get_metadata_opt("kube-system").await.unwrap().unwrap();
    assert_eq!(meta.types.unwrap().kind, "PartialObjectMetadata");
    assert_eq!(meta.metadata.uid.as_deref(), Some(uid.as_str()));

    // Listing: NamespaceList in name order, paginated, metadata-only too.
    let list = api.list(&ListParams::default()).await.unwrap();
    assert_eq!(list.types.kind, "NamespaceList");
    let names: Vec<_> = list.items.iter().map(|n| n.name_any()).collect();
    assert_eq!(names, ["default", "kube-system"]);
    assert_eq!(server.namespaces(), names);
    let pages = all_pages(&api, ListParams::default().limit(1))
        .await
        .unwrap();
    assert_eq!(pages.len(), 2);
    assert_eq!(pages[0].metadata.remaining_item_count, Some(1));
    let meta = api.list_metadata(&ListParams::default()).await.unwrap();
    assert_eq!(meta.types.kind, "PartialObjectMetadataList");
    assert_eq!(meta.items.len(), 2);
    let by_name = api
        .list(&ListParams::default().fields("metadata.name=kube-system"))
        .await
        .unwrap();
    assert_eq!(by_name.items.len(), 1);
    let raw_list = raw_get(&server, "/api/v1/namespaces").await;
    assert!(raw_list["items"][0].get("kind").is_none());

    // Another cluster behind the same address: kube-system changes its uid.
    let before = server.resource_version();
    server.set_cluster_uid("11111111-2222-4333-8444-555555555555");
    assert_eq!(server.cluster_uid(), "11111111-2222-4333-8444-555555555555");
    let kube_system = api.get("kube-system").await.unwrap();
    assert_eq!(
        kube_system.uid().as_deref(),
        Some("11111111-2222-4333-8444-555555555555")
    );
    assert!(
        kube_system
            .resource_version()
            .unwrap()
            .parse::<u64>()
            .unwrap()
            > before
    );

    // Discovery lists namespaces as a cluster-scoped resource.
    let (resource, caps) = kube::discovery::pinned_kind(
        &server.client(),
        &GroupVersionKind::gvk("", "v1", "Namespace"),
    )
    .await
    .unwrap();
    assert_eq!(resource.plural, "namespaces");
    assert_eq!(caps.scope, kube::discovery::Scope::Cluster);
}

#[tokio::test]
async fn adding_objects_creates_their_namespace_implicitly() {
    let server = FakeApiServer::start().await;
    let api = namespaces(&server);
    assert!(api.get_opt("agents").await.unwrap().is_none());
    server.add_pod("agents", "p", &[]);
    let agents = api.get_opt("agents").await.unwrap().unwrap();
    assert_eq!(phase(&agents), Some("Active"));
    // The namespace is written before the object: the object is the latest revision.
    let pods: Api<Pod> = Api::namespaced(server.client(), "agents");
    let pod = pods.get("p").await.unwrap();
    assert_eq!(
        pod.resource_version().unwrap(),
        server.resource_version().to_string()
    );
    assert!(agents.resource_version().unwrap().parse::<u64>().unwrap() < server.resource_version());
    // Adding more objects leaves the namespace as it is.
    server.add_pod("agents", "q", &[]);
    assert_eq!(api.get("agents").await.unwrap().uid(), agents.uid());
    server.add_sandbox("v1alpha1", "sandboxes", "s", json!({}));
    assert!(api.get_opt("sandboxes").await.unwrap().is_some());

    assert!(server.add_namespace("empty"));
    assert!(!server.add_namespace("empty"));
    assert!(!server.add_namespace("default"));
    assert_eq!(
        server.namespaces(),
        ["agents", "default", "empty", "kube-system", "sandboxes"]
    );
}

#[tokio::test]
async fn removed_namespace_answers_not_found_status() {
    let server = FakeApiServer::start().await;
    server.add_pod("agents", "p", &[]);
    let api = namespaces(&server);
    let uid = api.get("agents").await.unwrap().uid();
    assert!(server.remove_namespace("agents"));
    assert!(!server.remove_namespace("agents"));
    assert!(api.get_opt("agents").await.unwrap().is_none());
    assert!(api.get_metadata_opt("agents").await.unwrap().is_none());
    let err = api.get("agents").await.unwrap_err();
    assert!(
        matches!(&err, kube::Error::Api(s) if s.code == 404 && s.reason == "NotFound"),
        "{err:?}"
    );
    let status = api_status(err);
    assert_eq!(status.message, "namespaces \"agents\" not found");
    let details = status.details.unwrap();
    assert_eq!(
        (
            details.name.as_str(),
            details.kind.as_str(),
            details.group.as_str()
        ),
        ("agents", "namespaces", "")
    );
    // Only the Namespace went; its pods are still there.
    let pods: Api<Pod> = Api::namespaced(server.client(), "agents");
    assert_eq!(
        pods.list(&ListParams::default()).await.unwrap().items.len(),
        1
    );
    assert_eq!(server.namespaces(), ["default", "kube-system"]);

    // Adding an object creates it again, as a new object.
    server.add_pod("agents", "q", &[]);
    assert_ne!(api.get("agents").await.unwrap().uid(), uid);

    // kube-system comes back with the cluster's identity.
    let cluster = server.cluster_uid();
    assert!(server.remove_namespace("kube-system"));
    assert!(api.get_opt("kube-system").await.unwrap().is_none());
    assert!(server.add_namespace("kube-system"));
    assert_eq!(
        api.get("kube-system").await.unwrap().uid().as_deref(),
        Some(cluster.as_str())
    );
}

#[tokio::test]
async fn terminating_namespace_has_deletion_timestamp() {
    let server = FakeApiServer::start().await;
    server.add_pod("agents", "p", &[]);
    let api = namespaces(&server);
    let before = server.resource_version();
    server.set_namespace_terminating("agents");
    let agents = api.get("agents").await.unwrap();
    assert!(agents.metadata.deletion_timestamp.is_some());
    assert_eq!(phase(&agents), Some("Terminating"));
    assert!(agents.resource_version().unwrap().parse::<u64>().unwrap() > before);
    let terminating = api
        .list(&ListParams::default().fields("status.phase=Terminating"))
        .await
        .unwrap();
    let names: Vec<_> = terminating.items.iter().map(|n| n.name_any()).collect();
    assert_eq!(names, ["agents"]);
    // Adding into a terminating namespace leaves it terminating.
    server.add_pod("agents", "q", &[]);
    assert_eq!(
        phase(&api.get("agents").await.unwrap()),
        Some("Terminating")
    );
    // The generic call does the same for Kind::Namespace.
    server.set_terminating(Kind::Namespace, "", "default");
    let default = api.get_metadata("default").await.unwrap();
    assert!(default.metadata.deletion_timestamp.is_some());
}

#[tokio::test]
async fn denied_namespace_get_answers_403_and_access_reviews_agree() {
    let server = FakeApiServer::start().await;
    let api = namespaces(&server);
    let reviews: Api<SelfSubjectAccessReview> = Api::all(server.client());
    let pp = PostParams::default();
    let allowed = |r: SelfSubjectAccessReview| r.status.unwrap().allowed;
    assert!(allowed(
        reviews
            .create(&pp, &ns_review("get", Some("kube-system")))
            .await
            .unwrap()
    ));

    server.deny("get", "", "namespaces");
    let status = api_status(api.get("kube-system").await.unwrap_err());
    assert_eq!((status.code, status.reason.as_str()), (403, "Forbidden"));
    assert_eq!(
        status.message,
        "namespaces \"kube-system\" is forbidden: User \"system:serviceaccount:default:sandbox-reconciler\" cannot get resource \"namespaces\" in API group \"\" in the namespace \"kube-system\""
    );
    let details = status.details.unwrap();
    assert_eq!(
        (details.name.as_str(), details.kind.as_str()),
        ("kube-system", "namespaces")
    );
    // get_opt maps only 404 to None: a 403 stays an error.
    assert!(api.get_opt("default").await.is_err());
    // list is another verb.
    assert_eq!(
        api.list(&ListParams::default()).await.unwrap().items.len(),
        2
    );

    // Reviews: denied whatever the name, or without one; other verbs stay allowed.
    for name in [Some("kube-system"), Some("agents"), None] {
        let review = reviews.create(&pp, &ns_review("get", name)).await.unwrap();
        let status = review.status.unwrap();
        assert!(!status.allowed, "{name:?}");
        assert!(status.reason.is_some());
        assert_eq!(
            review.spec.resource_attributes.unwrap().name.as_deref(),
            name
        );
    }
    assert!(allowed(
        reviews.create(&pp, &ns_review("list", None)).await.unwrap()
    ));

    server.deny("list", "", "namespaces");
    let status = api_status(api.list(&ListParams::default()).await.unwrap_err());
    assert_eq!(
        status.message,
        "namespaces is forbidden: User \"system:serviceaccount:default:sandbox-reconciler\" cannot list resource \"namespaces\" in API group \"\" at the cluster scope"
    );

    server.allow_all();
    assert!(api.get_opt("kube-system").await.unwrap().is_some());
    assert!(allowed(
        reviews
            .create(&pp, &ns_review("get", Some("kube-system")))
            .await
            .unwrap()
    ));
}

#[tokio::test]
async fn faults_on_namespace_gets_fire_on_them_and_not_on_lists_inside() {
    let server = FakeApiServer::start().await;
    server.add_pod("agents", "p", &[]);
    server.add_pod("agents-2", "p", &[]);
    let api = namespaces(&server);
    let pods: Api<Pod> = Api::namespaced(server.client(), "agents");

    // A path-substring rule: a namespace GET is a single-object GET, not a list.
    server.inject(Fault::on_get("/namespaces/agents", FaultAction::Status(500, None)).once());
    assert_eq!(
        pods.list(&ListParams::default()).await.unwrap().items.len(),
        1
    );
    assert_eq!(server.requests().last().unwrap().status, Some(200));
    let status = api_status(api.get("agents").await.unwrap_err());
    assert_eq!(
        (status.code, status.reason.as_str()),
        (500, "InternalError")
    );
    let last = server.requests().last().cloned().unwrap();
    assert_eq!(
        (last.method.as_str(), last.path.as_str(), last.status),
        ("GET", "/api/v1/namespaces/agents", Some(500))
    );
    assert!(api.get_opt("agents").await.unwrap().is_some());

    // on_list rules do not fire on a namespace GET.
    server.inject(Fault::on_list(
        "/namespaces/agents",
        FaultAction::Status(500, None),
    ));
    assert!(api.get_opt("agents").await.unwrap().is_some());
    assert!(pods.list(&ListParams::default()).await.is_err());
    server.clear_faults();

    // on_namespace_get targets exactly one Namespace: not the pods in it, not agents-2.
    server.inject(Fault::on_namespace_get("agents", FaultAction::Status(404, None)).once());
    assert!(pods.get_opt("p").await.unwrap().is_some());
    assert!(pods.list(&ListParams::default()).await.is_ok());
    assert!(api.get_opt("agents-2").await.unwrap().is_some());
    let status = api_status(api.get("agents").await.unwrap_err());
    assert_eq!(
        (status.code, status.message.as_str()),
        (404, "namespaces \"agents\" not found")
    );
    assert!(api.get_opt("agents").await.unwrap().is_some());

    server.inject(Fault::on_namespace_get("kube-system", FaultAction::Status(403, None)).once());
    let status = api_status(api.get("kube-system").await.unwrap_err());
    assert!(
        status.message.ends_with("in the namespace \"kube-system\""),
        "{}",
        status.message
    );
    server.inject(Fault::on_get("/namespaces/kube-system", FaultAction::MalformedJson).once());
    assert!(matches!(
        api.get("kube-system").await,
        Err(kube::Error::SerdeError(_))
    ));
    let codes: Vec<_> = server
        .requests()
        .iter()
        .filter(|r| r.path == "/api/v1/namespaces/kube-system")
        .map(|r| r.status)
        .collect();
    assert_eq!(codes, [Some(403), Some(200)]);
}
