//! The fake API server's protocol, checked with a raw HTTP client (no root needed): it has to
//! behave like kube-apiserver for the end-to-end tests to mean anything.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::TcpStream,
    time::Duration,
};

use serde_json::{json, Value};

use super::{objects, FakeApiServer, Resource, TokenSpec};

const T: Duration = Duration::from_secs(5);

/// One connection to the server; reads responses, including chunked watch streams event by event.
struct Client {
    r: BufReader<TcpStream>,
}

struct Head {
    status: u16,
    chunked: bool,
    length: usize,
}

impl Client {
    fn new(s: &FakeApiServer) -> Client {
        let stream = TcpStream::connect(s.addr()).unwrap();
        stream.set_read_timeout(Some(T)).unwrap();
        Client {
            r: BufReader::new(stream),
        }
    }

    fn send(&mut self, target: &str) -> Head {
        write!(
            self.r.get_mut(),
            "GET {target} HTTP/1.1\r\nHost: x\r\nAccept: application/json\r\n\r\n"
        )
        .unwrap();
        self.head()
    }

    /// A POST with a JSON body: status and JSON body.
    fn post(&mut self, target: &str, body: &Value) -> (u16, Value) {
        let body = serde_json::to_vec(body).unwrap();
        write!(
            self.r.get_mut(),
            "POST {target} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .unwrap();
        self.r.get_mut().write_all(&body).unwrap();
        let head = self.head();
        let mut body = vec![0; head.length];
        self.r.read_exact(&mut body).unwrap();
        (head.status, serde_json::from_slice(&body).unwrap())
    }

    fn head(&mut self) -> Head {
        let mut line = String::new();
        self.r.read_line(&mut line).unwrap();
        let status = line.split(' ').nth(1).unwrap().parse().unwrap();
        let (mut chunked, mut length) = (false, 0);
        loop {
            line.clear();
            self.r.read_line(&mut line).unwrap();
            if line == "\r\n" {
                break;
            }
            let (k, v) = line.split_once(':').unwrap();
            match k.to_ascii_lowercase().as_str() {
                "transfer-encoding" => chunked = v.trim() == "chunked",
                "content-length" => length = v.trim().parse().unwrap(),
                _ => {}
            }
        }
        Head {
            status,
            chunked,
            length,
        }
    }

    /// A plain request: status and JSON body.
    fn get(&mut self, target: &str) -> (u16, Value) {
        let head = self.send(target);
        assert!(!head.chunked);
        let mut body = vec![0; head.length];
        self.r.read_exact(&mut body).unwrap();
        (head.status, serde_json::from_slice(&body).unwrap())
    }

    /// Starts a watch; read its events with [`Client::event`].
    fn watch(&mut self, target: &str) {
        let head = self.send(target);
        assert_eq!(head.status, 200);
        assert!(head.chunked, "a watch is streamed");
    }

    /// The next event; `None` at the clean end of the stream. Panics if the connection is cut.
    fn event(&mut self) -> Option<Value> {
        let mut size = String::new();
        self.r.read_line(&mut size).unwrap();
        assert!(!size.is_empty(), "connection closed mid-stream");
        let n = usize::from_str_radix(size.trim(), 16).unwrap();
        let mut data = vec![0; n + 2];
        self.r.read_exact(&mut data).unwrap();
        if n == 0 {
            return None;
        }
        assert!(data[..n].ends_with(b"\n"), "one event per line");
        // kube-apiserver's field order: clients decode the object as it streams.
        assert!(data.starts_with(br#"{"type":""#), "`type` comes first: {}", String::from_utf8_lossy(&data));
        Some(serde_json::from_slice(&data[..n]).unwrap())
    }

    /// Whether the server closed the connection without ending the response.
    fn is_cut(&mut self) -> bool {
        let mut buf = [0u8; 1];
        matches!(self.r.read(&mut buf), Ok(0) | Err(_))
    }
}

fn pod(name: &str, node: &str, ip: &str) -> Value {
    objects::pod(&objects::PodSpec {
        namespace: "shop",
        name,
        uid: None,
        node: Some(node),
        ip: Some(ip.parse().unwrap()),
        labels: [("app".to_string(), "web".to_string())].into(),
        service_account: "web",
    })
}

fn names(list: &Value) -> Vec<&str> {
    list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["metadata"]["name"].as_str().unwrap())
        .collect()
}

fn rv(v: &Value) -> u64 {
    v["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn discovery_and_lists_look_like_the_real_server() {
    let s = FakeApiServer::start_local().unwrap();
    let mut c = Client::new(&s);
    assert_eq!(c.get("/version").1["gitVersion"], "v1.35.1");
    assert_eq!(c.get("/api").1["versions"], json!(["v1"]));
    let groups = c.get("/apis").1;
    let names_of = |g: &Value| {
        g["groups"]
            .as_array()
            .unwrap()
            .iter()
            .map(|g| g["name"].as_str().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        names_of(&groups),
        [
            "authentication.k8s.io",
            "discovery.k8s.io",
            "gateway.networking.k8s.io",
            "networking.istio.io",
            "security.istio.io",
            "sluice.dev"
        ]
    );
    assert!(c.get("/api/v1").1["resources"]
        .as_array()
        .unwrap()
        .iter()
        .any(|r| r["name"] == "pods"));

    let stored = s.apply(pod("web-1", "n1", "10.244.1.10")).unwrap();
    assert!(
        stored["metadata"]["uid"]
            .as_str()
            .is_some_and(|u| u.len() == 36),
        "uid assigned"
    );
    s.apply(pod("web-2", "n2", "10.244.2.10")).unwrap();
    s.apply(objects::namespace("shop", &[])).unwrap();
    let (code, list) = c.get("/api/v1/pods?limit=500");
    assert_eq!(code, 200);
    assert_eq!(list["kind"], "PodList");
    assert_eq!(rv(&list), s.resource_version());
    assert_eq!(names(&list), ["web-1", "web-2"]);
    assert!(
        list["items"][0].get("kind").is_none(),
        "built-in list items carry no kind"
    );

    // Field selectors, = and !=, as sluice uses them; and what the real server refuses.
    assert_eq!(
        names(&c.get("/api/v1/pods?fieldSelector=spec.nodeName%3Dn1").1),
        ["web-1"]
    );
    assert_eq!(
        names(&c.get("/api/v1/pods?fieldSelector=spec.nodeName%21%3Dn1").1),
        ["web-2"]
    );
    assert_eq!(c.get("/api/v1/pods?fieldSelector=spec.bogus%3Dx").0, 400);
    assert_eq!(
        names(
            &c.get("/api/v1/namespaces/shop/pods?labelSelector=app%3Dweb")
                .1
        ),
        ["web-1", "web-2"]
    );
    assert_eq!(
        c.get("/api/v1/namespaces/shop/pods/web-2").1["spec"]["nodeName"],
        "n2"
    );
    assert_eq!(c.get("/api/v1/namespaces/shop/pods/nope").0, 404);

    // Pagination: two pages at the first page's revision.
    let (_, page1) = c.get("/api/v1/pods?limit=1");
    assert_eq!(names(&page1), ["web-1"]);
    assert_eq!(page1["metadata"]["remainingItemCount"], 1);
    let token = page1["metadata"]["continue"].as_str().unwrap().to_string();
    let (_, page2) = c.get(&format!("/api/v1/pods?limit=1&continue={token}"));
    assert_eq!(names(&page2), ["web-2"]);
    assert_eq!(rv(&page2), rv(&page1));
    assert!(page2["metadata"].get("continue").is_none());
    assert_eq!(
        s.stats(Resource::Pods).lists,
        6,
        "the refused request is not a list"
    );
}

#[test]
fn watch_resumes_from_a_resource_version_with_selector_transitions() {
    let s = FakeApiServer::start_local().unwrap();
    s.apply(pod("a", "n1", "10.244.1.10")).unwrap();
    let list_rv = s.resource_version();
    s.apply(pod("b", "n1", "10.244.1.11")).unwrap(); // after the list: replayed
    let mut c = Client::new(&s);
    c.watch(&format!("/api/v1/pods?watch=true&resourceVersion={list_rv}&fieldSelector=spec.nodeName%3Dn1&allowWatchBookmarks=true&timeoutSeconds=290"));
    let e = c.event().unwrap();
    assert_eq!(
        (e["type"].as_str(), e["object"]["metadata"]["name"].as_str()),
        (Some("ADDED"), Some("b"))
    );
    assert_eq!(e["object"]["kind"], "Pod", "watch events carry the kind");
    s.wait_stats(Resource::Pods, T, "the watch", |st| st.open_watches == 1)
        .unwrap();

    let mut moved = pod("a", "n2", "10.244.1.10"); // stops matching spec.nodeName=n1
    moved["metadata"]["labels"]["v"] = json!("2");
    s.apply(moved).unwrap();
    assert_eq!(c.event().unwrap()["type"], "DELETED");
    s.apply(pod("c", "n2", "10.244.2.12")).unwrap(); // never matches: no event
    s.delete("Pod", "shop", "b").unwrap();
    let e = c.event().unwrap();
    assert_eq!(
        (e["type"].as_str(), e["object"]["metadata"]["name"].as_str()),
        (Some("DELETED"), Some("b"))
    );
    assert_eq!(
        rv(&e["object"]),
        s.resource_version(),
        "a deletion has its own revision"
    );

    assert_eq!(s.bookmark(Resource::Pods), 1);
    let b = c.event().unwrap();
    assert_eq!(b["type"], "BOOKMARK");
    assert_eq!(rv(&b["object"]), s.resource_version());
}

#[test]
fn expired_history_is_410_gone_and_timeouts_end_cleanly() {
    let s = FakeApiServer::start_local().unwrap();
    s.apply(pod("a", "n1", "10.244.1.10")).unwrap();
    let old = s.resource_version();
    s.apply(pod("b", "n1", "10.244.1.11")).unwrap();
    s.compact(Resource::Pods);

    // Resuming from before the compaction: an ERROR event with 410 in a 200, then the end.
    let mut c = Client::new(&s);
    c.watch(&format!("/api/v1/pods?watch=1&resourceVersion={old}"));
    let e = c.event().unwrap();
    assert_eq!(e["type"], "ERROR");
    assert_eq!(
        (e["object"]["code"].as_u64(), e["object"]["reason"].as_str()),
        (Some(410), Some("Expired"))
    );
    assert!(c.event().is_none(), "the stream ends cleanly");

    // Same connection (keep-alive): a watch from now works, and times out cleanly.
    c.watch(&format!(
        "/api/v1/pods?watch=1&resourceVersion={}&timeoutSeconds=1",
        s.resource_version()
    ));
    assert!(c.event().is_none(), "timeoutSeconds ends the stream");

    // An open watch whose history expires under it, with changes it never sees.
    c.watch(&format!(
        "/api/v1/pods?watch=1&resourceVersion={}",
        s.resource_version()
    ));
    s.wait_stats(Resource::Pods, T, "the watch", |st| st.open_watches == 1)
        .unwrap();
    let expired = s
        .expire(Resource::Pods, |u| u.delete("Pod", "shop", "a"))
        .unwrap();
    assert_eq!(expired, 1);
    assert_eq!(c.event().unwrap()["object"]["code"], 410);
    assert!(c.event().is_none());
    assert_eq!(s.stats(Resource::Pods).gone, 2);
    assert!(
        s.get("Pod", "shop", "a").is_none(),
        "the unseen change is in force"
    );
}

#[test]
fn dropped_watches_are_cut_and_crds_can_be_absent() {
    let s = FakeApiServer::start_local().unwrap();
    let mut c = Client::new(&s);
    c.watch("/apis/discovery.k8s.io/v1/endpointslices?watch=true&resourceVersion=1");
    s.wait_stats(Resource::EndpointSlices, T, "the watch", |st| {
        st.open_watches == 1
    })
    .unwrap();
    assert_eq!(s.drop_watches(), 1);
    assert!(
        c.is_cut(),
        "no terminating chunk, the connection just closes"
    );

    // security.istio.io disappears from discovery once none of its kinds is installed.
    let security = [Resource::AuthorizationPolicies, Resource::PeerAuthentications, Resource::RequestAuthentications];
    for r in security {
        s.set_installed(r, false);
    }
    let mut c = Client::new(&s);
    let (code, body) = c.get("/apis/security.istio.io/v1/authorizationpolicies?limit=500");
    assert_eq!((code, body["reason"].as_str()), (404, Some("NotFound")));
    // Five groups with authentication.k8s.io, less security.istio.io.
    assert_eq!(c.get("/apis").1["groups"].as_array().unwrap().len(), 5);
    assert!(s
        .apply(objects::authorization_policy("shop", "p", json!({})))
        .is_err());
    for r in security {
        s.set_installed(r, true);
    }
    s.apply(objects::authorization_policy(
        "shop",
        "p",
        json!({"action": "DENY", "rules": [{}]}),
    ))
    .unwrap();
    let (code, list) = c.get("/apis/security.istio.io/v1beta1/authorizationpolicies");
    assert_eq!(code, 200);
    assert_eq!(
        list["items"][0]["apiVersion"], "security.istio.io/v1beta1",
        "custom resources are listed with their version"
    );
    assert_eq!(list["items"][0]["metadata"]["generation"], 1);
}

#[test]
fn gateway_routes_are_served_like_the_gateway_api_crds() {
    let s = FakeApiServer::start_local().unwrap();
    let mut c = Client::new(&s);
    let gateway = |groups: &Value| {
        groups["groups"]
            .as_array()
            .unwrap()
            .iter()
            .find(|g| g["name"] == "gateway.networking.k8s.io")
            .cloned()
    };
    let g = gateway(&c.get("/apis").1).expect("the group is served");
    assert_eq!(g["preferredVersion"]["version"], "v1");
    assert_eq!(
        g["versions"],
        json!([
            {"groupVersion": "gateway.networking.k8s.io/v1", "version": "v1"},
            {"groupVersion": "gateway.networking.k8s.io/v1beta1", "version": "v1beta1"},
        ])
    );
    let resources = |c: &mut Client, gv: &str| -> Vec<String> {
        let (code, list) = c.get(&format!("/apis/{gv}"));
        if code != 200 {
            return Vec::new();
        }
        list["resources"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["name"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(
        resources(&mut c, "gateway.networking.k8s.io/v1"),
        ["httproutes", "grpcroutes"]
    );
    assert_eq!(
        resources(&mut c, "gateway.networking.k8s.io/v1beta1"),
        ["httproutes"]
    );

    let spec = json!({"parentRefs": [{"group": "", "kind": "Service", "name": "web", "port": 80}],
                      "rules": [{"backendRefs": [{"name": "web", "port": 80}]}]});
    let stored = s
        .apply(objects::http_route("shop", "web", spec.clone()))
        .unwrap();
    assert_eq!(stored["metadata"]["generation"], 1);
    assert!(stored["metadata"]["creationTimestamp"].is_string());
    assert_eq!(
        stored["status"]["parents"][0]["parentRef"]["name"], "web",
        "a mesh controller's status"
    );
    s.apply(objects::grpc_route(
        "shop",
        "web",
        json!({"parentRefs": spec["parentRefs"]}),
    ))
    .unwrap();
    let (code, list) = c.get("/apis/gateway.networking.k8s.io/v1beta1/namespaces/shop/httproutes");
    assert_eq!(code, 200);
    assert_eq!(list["kind"], "HTTPRouteList");
    assert_eq!(
        list["items"][0]["apiVersion"],
        "gateway.networking.k8s.io/v1beta1"
    );
    assert_eq!(
        c.get("/apis/gateway.networking.k8s.io/v1beta1/grpcroutes")
            .0,
        404,
        "GRPCRoute is v1 only"
    );
    let (_, list) = c.get("/apis/gateway.networking.k8s.io/v1/grpcroutes");
    assert_eq!(names(&list), ["web"]);

    // Without the Gateway API's CRDs: 404, and the group is gone from discovery.
    s.set_installed(Resource::HttpRoutes, false);
    s.set_installed(Resource::GrpcRoutes, false);
    assert_eq!(
        c.get("/apis/gateway.networking.k8s.io/v1/httproutes").0,
        404
    );
    assert!(gateway(&c.get("/apis").1).is_none());
    assert!(resources(&mut c, "gateway.networking.k8s.io/v1").is_empty());
    assert!(s.apply(objects::http_route("shop", "x", spec)).is_err());
}

#[test]
fn traffic_policies_and_service_entries_are_served_like_their_crds() {
    let s = FakeApiServer::start_local().unwrap();
    let mut c = Client::new(&s);
    let group = |groups: &Value, name: &str| {
        groups["groups"]
            .as_array()
            .unwrap()
            .iter()
            .find(|g| g["name"] == name)
            .cloned()
    };
    let apis = c.get("/apis").1;
    let sluice = group(&apis, "sluice.dev").expect("sluice.dev is served");
    assert_eq!(sluice["preferredVersion"]["version"], "v1alpha1");
    let istio = group(&apis, "networking.istio.io").expect("networking.istio.io is served");
    assert_eq!(
        istio["versions"],
        json!([
            {"groupVersion": "networking.istio.io/v1", "version": "v1"},
            {"groupVersion": "networking.istio.io/v1beta1", "version": "v1beta1"},
            {"groupVersion": "networking.istio.io/v1alpha3", "version": "v1alpha3"},
        ])
    );
    let (code, list) = c.get("/apis/sluice.dev/v1alpha1");
    assert_eq!(code, 200);
    assert_eq!(list["resources"][0]["name"], "trafficpolicies");
    assert_eq!(list["resources"][0]["shortNames"], json!(["tp"]));

    let stored = s
        .apply(objects::traffic_policy(
            "shop",
            "web",
            json!({"targetRefs": [{"group": "", "kind": "Service", "name": "web"}],
                   "timeouts": {"request": "5s"}}),
        ))
        .unwrap();
    assert_eq!(stored["metadata"]["generation"], 1);
    assert!(stored["metadata"]["creationTimestamp"].is_string());
    s.apply(objects::service_entry(
        "shop",
        "api",
        json!({"hosts": ["api.example.com"], "ports": [{"number": 443, "name": "https", "protocol": "HTTPS"}],
               "resolution": "DNS"}),
    ))
    .unwrap();
    let (code, list) = c.get("/apis/sluice.dev/v1alpha1/namespaces/shop/trafficpolicies");
    assert_eq!(code, 200);
    assert_eq!(list["kind"], "TrafficPolicyList");
    assert_eq!(names(&list), ["web"]);
    let (code, list) = c.get("/apis/networking.istio.io/v1beta1/serviceentries");
    assert_eq!(code, 200);
    assert_eq!(
        list["items"][0]["apiVersion"],
        "networking.istio.io/v1beta1"
    );
    assert_eq!(
        list["items"][0]["spec"]["hosts"],
        json!(["api.example.com"])
    );

    // Without the CRDs: 404, and the groups are gone from discovery.
    s.set_installed(Resource::TrafficPolicies, false);
    s.set_installed(Resource::ServiceEntries, false);
    s.set_installed(Resource::VirtualServices, false);
    s.set_installed(Resource::DestinationRules, false);
    assert_eq!(c.get("/apis/sluice.dev/v1alpha1/trafficpolicies").0, 404);
    assert_eq!(c.get("/apis/networking.istio.io/v1/serviceentries").0, 404);
    let apis = c.get("/apis").1;
    assert!(group(&apis, "sluice.dev").is_none());
    assert!(group(&apis, "networking.istio.io").is_none());
    assert!(s
        .apply(objects::service_entry("shop", "x", json!({})))
        .is_err());
}

#[test]
fn timestamps_are_rfc3339() {
    assert_eq!(
        super::rfc3339(std::time::UNIX_EPOCH + Duration::from_secs(1_772_442_847)),
        "2026-03-02T09:14:07Z"
    );
    assert_eq!(
        super::rfc3339(std::time::UNIX_EPOCH),
        "1970-01-01T00:00:00Z"
    );
}

const TOKEN_REVIEWS: &str = "/apis/authentication.k8s.io/v1/tokenreviews";

fn token_review(token: &str, audiences: &[&str]) -> Value {
    json!({
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenReview",
        "spec": {"token": token, "audiences": audiences},
    })
}

/// A TokenReview over the wire as the CA service sends one: a projected token bound to the
/// node agent's pod (with its node), then the refusals a CA must tell apart only by
/// `authenticated`, and the requests the server refuses outright.
#[test]
fn token_reviews_answer_like_kube_apiserver() {
    let s = FakeApiServer::start_local().unwrap();
    let mut c = Client::new(&s);
    let groups = c.get("/apis").1;
    assert!(groups["groups"]
        .as_array()
        .unwrap()
        .iter()
        .any(|g| g["name"] == "authentication.k8s.io"
            && g["preferredVersion"]["groupVersion"] == "authentication.k8s.io/v1"));
    let (code, res) = c.get("/apis/authentication.k8s.io/v1");
    assert_eq!(code, 200);
    assert_eq!(res["resources"][0]["name"], "tokenreviews");
    assert_eq!(res["resources"][0]["verbs"], json!(["create"]));

    let mut agent = objects::pod(&objects::PodSpec {
        namespace: "sluice-system",
        name: "sluice-x7k2p",
        uid: None,
        node: Some("n1"),
        ip: Some("10.243.0.1".parse().unwrap()),
        labels: Default::default(),
        service_account: "sluice",
    });
    agent = s.apply(agent).unwrap();
    let uid = agent["metadata"]["uid"].as_str().unwrap().to_string();
    let token = s
        .mint_token(
            TokenSpec::new("sluice-system", "sluice")
                .node("n1")
                .pod("sluice-system", "sluice-x7k2p", &uid),
        )
        .unwrap();

    let (code, review) = c.post(TOKEN_REVIEWS, &token_review(&token, &["sluice-ca"]));
    assert_eq!(code, 201, "{review}");
    assert_eq!(review["kind"], "TokenReview");
    assert_eq!(review["spec"]["token"], token.as_str(), "the spec is echoed");
    let st = &review["status"];
    assert_eq!(st["authenticated"], true, "{review}");
    assert_eq!(
        st["user"]["username"],
        "system:serviceaccount:sluice-system:sluice"
    );
    let extra = &st["user"]["extra"];
    assert_eq!(extra["authentication.kubernetes.io/node-name"], json!(["n1"]));
    assert_eq!(
        extra["authentication.kubernetes.io/pod-name"],
        json!(["sluice-x7k2p"])
    );
    assert_eq!(extra["authentication.kubernetes.io/pod-uid"], json!([uid]));
    assert_eq!(st["audiences"], json!(["sluice-ca"]));

    // Another audience: refused, and the error says which audiences did not meet.
    let (code, review) = c.post(TOKEN_REVIEWS, &token_review(&token, &["istio-ca"]));
    assert_eq!(code, 201);
    assert!(review["status"].get("authenticated").is_none(), "{review}");
    assert_eq!(
        review["status"]["error"],
        r#"[invalid bearer token, token audiences ["sluice-ca"] is invalid for the target audiences ["istio-ca"]]"#
    );

    // The bound pod goes: its token dies with it.
    s.delete("Pod", "sluice-system", "sluice-x7k2p").unwrap();
    let (_, review) = c.post(TOKEN_REVIEWS, &token_review(&token, &["sluice-ca"]));
    assert_eq!(
        review["status"]["error"],
        "[invalid bearer token, service account token has been invalidated]"
    );

    // Node-bound only (no pod): authenticated with the node and no pod.
    let node_only = s
        .mint_token(TokenSpec::new("sluice-system", "sluice").node("n2"))
        .unwrap();
    let (_, review) = c.post(TOKEN_REVIEWS, &token_review(&node_only, &["sluice-ca"]));
    let extra = &review["status"]["user"]["extra"];
    assert_eq!(extra["authentication.kubernetes.io/node-name"], json!(["n2"]));
    assert!(extra.get("authentication.kubernetes.io/pod-name").is_none());
    assert!(s.expire_token(&node_only));
    let (_, review) = c.post(TOKEN_REVIEWS, &token_review(&node_only, &["sluice-ca"]));
    assert_eq!(
        review["status"]["error"],
        "[invalid bearer token, service account token has expired]"
    );
    let (_, review) = c.post(TOKEN_REVIEWS, &token_review("not-a-token", &["sluice-ca"]));
    assert_eq!(review["status"]["error"], "invalid bearer token");
    assert_eq!(review["status"]["user"], json!({}));

    // What the server refuses before reviewing anything.
    let (code, st) = c.post(TOKEN_REVIEWS, &token_review("", &["sluice-ca"]));
    assert_eq!(code, 400);
    assert_eq!(
        st["message"],
        "token is required for TokenReview in authentication"
    );
    let (code, _) = c.post(TOKEN_REVIEWS, &json!({"kind": "Pod", "apiVersion": "v1"}));
    assert_eq!(code, 400);
    assert_eq!(c.get(TOKEN_REVIEWS).0, 405);
    let (code, _) = c.post("/api/v1/pods", &json!({}));
    assert_eq!(code, 405, "only tokenreviews take a POST");

    // Every review is on record, in the request log too.
    let reviews = s.token_reviews();
    assert_eq!(reviews.len(), 6);
    assert_eq!(s.token_review_count(), 6);
    let authenticated: Vec<usize> = (0..6).filter(|&i| reviews[i].authenticated()).collect();
    assert_eq!(authenticated, [0, 3], "the bound token, then the node-only one");
    assert_eq!(
        reviews[0].username(),
        Some("system:serviceaccount:sluice-system:sluice")
    );
    assert!(reviews
        .iter()
        .all(|r| r.authenticated() != r.error().is_some()));
    assert_eq!(
        s.requests()
            .iter()
            .filter(|r| *r == &format!("POST {TOKEN_REVIEWS}"))
            .count(),
        8,
        "six reviews and the two bad requests"
    );
}
